"""Every trainer under ``torchrun`` (DDP and FSDP2) and ``accelerate launch``, on 2 gloo CPU
processes, against one process with the same global batch.

A run on 2 processes with ``--batch-size 2`` takes the same global micro-batches as one process
with ``--batch-size 4``, so the two loss trajectories (and gradient norms, and held-out metrics)
must agree up to float32 reduction order. PPO and GRPO sample with ``--top-k 1`` (sampling from
the most likely token only, so that which rank samples a prompt cannot change its completion) and
without advantage whitening (a per-rank statistic).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TIMEOUT = 600
STEPS = {"sft": 3, "rm": 3, "dpo": 3, "kto": 3, "ppo": 2, "grpo": 2}
OPTIONS = {
    "sft": [],
    "rm": [],
    "dpo": [],
    "kto": ["--kl-pairing", "dataset"],  # the same KL partners however the batch is split
    "ppo": ["--top-k", "1", "--no-whiten-advantages", "--loss-agg", "grpo",
            "--max-new-tokens", "6"],
    "grpo": ["--top-k", "1", "--max-new-tokens", "6", "--num-generations", "2"],
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


def _train(kind: str, output: Path, *, batch_size: int, launcher: list[str] | None = None,
           extra: list[str] = ()) -> str:
    command = [*(launcher or [sys.executable]), "-m", "fastalign.cli", "train", kind,
               "--output", str(output), "--max-steps", str(STEPS[kind]),
               "--batch-size", str(batch_size), "--seed", "0", "--no-progress", "--no-plots",
               *OPTIONS[kind], *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                            env=_env())
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-4000:]}"
    return result.stdout


def _torchrun() -> list[str]:
    """``torchrun --nproc_per_node 2`` (the script's ``-m fastalign.cli`` follows)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port())]


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _assert_same_trajectory(got: Path, expected: Path) -> None:
    got_records, expected_records = _records(got), _records(expected)
    assert [r["step"] for r in got_records] == [r["step"] for r in expected_records]
    for mine, theirs in zip(got_records, expected_records):
        keys = [key for key in theirs if key != "step"]
        assert set(keys) <= set(mine), f"metrics missing: {set(keys) - set(mine)}"
        for key in keys:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (
                f"step {theirs['step']} {key}: {mine[key]} on 2 processes, {theirs[key]} on one")


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """One-process runs with the global batch, made on first use."""
    root = tmp_path_factory.mktemp("single")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = root / kind
            _train(kind, made[kind], batch_size=4)
        return made[kind]

    return get


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", list(STEPS))
def test_torchrun_matches_one_process(kind, strategy, single_runs, tmp_path):
    output = tmp_path / f"{kind}-{strategy}"
    stdout = _train(kind, output, batch_size=2, launcher=_torchrun(),
                    extra=["--distributed", strategy])
    assert f"on 2 processes ({strategy})" in stdout
    _assert_same_trajectory(output, single_runs(kind))
    # The saved model is whole (gathered from the shards under FSDP) and is what one process
    # trained, up to reduction order.
    got = load_file(output / "model.safetensors")
    expected = load_file(single_runs(kind) / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    if kind == "ppo":
        assert (output / "value_head.pt").exists()


@pytest.mark.parametrize("mode", ["multi_gpu", "use_fsdp"])
def test_accelerate_launch(mode, single_runs, tmp_path):
    if shutil.which("accelerate") is None and not _accelerate_importable():
        pytest.skip("accelerate is not installed")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", f"--{mode}",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    output = tmp_path / "dpo"
    stdout = _train("dpo", output, batch_size=2, launcher=launcher)  # --distributed auto
    strategy = "fsdp" if mode == "use_fsdp" else "ddp"
    assert f"on 2 processes ({strategy})" in stdout
    _assert_same_trajectory(output, single_runs("dpo"))


def _accelerate_importable() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def test_fsdp_resume_is_exact(tmp_path):
    """Checkpoints gather the sharded model and optimizer; a resumed FSDP run ends where an
    uninterrupted one does."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    options = ["--distributed", "fsdp", "--save-steps", "1", "--max-steps", "2"]
    STEPS["dpo"], saved = 2, STEPS["dpo"]
    try:
        _train("dpo", whole, batch_size=2, launcher=_torchrun(), extra=options)
        _train("dpo", resumed, batch_size=2, launcher=_torchrun(), extra=options)
        shutil.rmtree(resumed / "checkpoints" / "step-000002")
        (resumed / "model.safetensors").unlink()
        _train("dpo", resumed, batch_size=2, launcher=_torchrun(),
               extra=[*options, "--resume"])
    finally:
        STEPS["dpo"] = saved
    got, expected = load_file(resumed / "model.safetensors"), load_file(whole /
                                                                         "model.safetensors")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_resume_with_another_world_size_is_refused(tmp_path):
    output = tmp_path / "run"
    STEPS["sft"], saved = 1, STEPS["sft"]
    try:
        _train("sft", output, batch_size=2, launcher=_torchrun(),
               extra=["--distributed", "ddp", "--save-steps", "1"])
        command = [sys.executable, "-m", "fastalign.cli", "train", "sft", "--output",
                   str(output), "--max-steps", "2", "--batch-size", "2", "--resume",
                   "--no-progress"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                                env=_env())
    finally:
        STEPS["sft"] = saved
    assert result.returncode != 0
    assert "written by 2 process(es); resume it with as many (this run has 1)" in result.stderr
