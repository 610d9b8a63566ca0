"""A training run killed with SIGKILL and resumed ends exactly where an uninterrupted one does.

Every run here is the real command line, ``python -m fastalign.cli train sft``, in a subprocess:
the tiny shipped model and data, a checkpoint every step (the newest two kept). A run is killed
with SIGKILL as soon as its checkpoint of a step drawn by a seeded ``random.Random`` is on disk,
then resumed with ``--resume``; its final weights must equal the uninterrupted run's bit for bit,
and so must its metrics log.

Which checkpoint a resumed run started from is read off ``metrics.jsonl``: before resuming, the
killed run's records get a marker; a resumed run keeps the records up to its checkpoint's step
and rewrites the rest, a run that started from scratch would keep none.

Damage on disk: a leftover ``.tmp-step-*`` directory (what a kill during a checkpoint write
leaves), the newest checkpoint truncated (as a full disk or a crash during a copy leaves it), and
every checkpoint damaged.

A kill right after a checkpoint is published may leave one checkpoint too many (the old one not
yet deleted) or a ``.tmp-delete-*`` directory (deleted checkpoints are renamed out of the way
first), never a half-deleted ``step-*``; the next save removes both.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastalign.trainers.checkpoint import checkpoint_dirs, load_latest

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 10
TRAIN_ARGS = [
    "--max-steps", str(MAX_STEPS), "--save-steps", "1", "--save-total-limit", "2",
    "--batch-size", "4", "--seed", "0", "--max-length", "64", "--max-prompt-length", "32",
    "--no-progress", "--no-plots",
]
RUN_TIMEOUT = 300  # seconds; a run takes a few
KILL_STEPS = random.Random(20261121)  # the step after whose checkpoint each run is killed

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")


def _command(output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastalign.cli", "train", "sft", "--output", str(output),
            *TRAIN_ARGS, *extra]


def _run(output: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(output, *extra), cwd=REPO, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def _finish(output: Path, *extra: str) -> subprocess.CompletedProcess:
    result = _run(output, *extra)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return result


def _newest_step(output: Path) -> int:
    found = checkpoint_dirs(output / "checkpoints")
    return found[-1][0] if found else 0


def _start_and_kill(output: Path, kill_after: int) -> int:
    """Start a run, SIGKILL it once the checkpoint of step ``kill_after`` (or a later one) is
    complete on disk, and return the newest checkpoint's step."""
    log = output.parent / f"{output.name}-killed-run.log"  # a file: a full pipe would block it
    with open(log, "w") as stderr:
        process = subprocess.Popen(_command(output), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while _newest_step(output) < kill_after:
            assert process.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    newest = _newest_step(output)
    assert kill_after <= newest < MAX_STEPS, newest
    assert not (output / "model.safetensors").exists(), "killed, yet the final model was written"
    return newest


def _mark_metrics(output: Path) -> list[int]:
    """Add a marker to each record of the killed run's metrics log; return their steps."""
    path = output / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(dict(r, killed_run=True)) + "\n" for r in records))
    return [r["step"] for r in records]


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _assert_resumed_from(output: Path, step: int) -> None:
    kept = [r["step"] for r in _metrics(output) if r.get("killed_run")]
    assert kept == list(range(1, step + 1)), (
        f"expected a resume from step {step}: the records of steps 1..{step} kept, got {kept}")


def _assert_same_run(output: Path, uninterrupted: Path) -> None:
    ours, theirs = load_file(output / "model.safetensors"), load_file(
        uninterrupted / "model.safetensors")
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, f"weights differ from the uninterrupted run: {different}"
    strip = [{k: v for k, v in r.items() if k != "killed_run"} for r in _metrics(output)]
    assert strip == _metrics(uninterrupted)
    assert [r["step"] for r in strip] == list(range(1, MAX_STEPS + 1))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted")
    _finish(output)
    assert [step for step, _ in checkpoint_dirs(output / "checkpoints")] == [MAX_STEPS - 1,
                                                                             MAX_STEPS]
    return output


def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_weights(
        tmp_path, uninterrupted):
    """Killed after a random step's checkpoint; resumed. A kill inside ``save_checkpoint``
    leaves ``.tmp-step-N`` with a partial ``state.pt`` and no manifest (the rename to ``step-N``
    is what publishes a checkpoint): one is planted if the kill did not leave one, and must be
    ignored on resume and cleared when step N is saved again."""
    newest = _start_and_kill(tmp_path, KILL_STEPS.randint(1, MAX_STEPS - 2))
    root = tmp_path / "checkpoints"
    leftover = root / f".tmp-step-{newest + 1:06d}"
    if not leftover.exists():
        leftover.mkdir()
        complete = (root / f"step-{newest:06d}" / "state.pt").read_bytes()
        (leftover / "state.pt").write_bytes(complete[: len(complete) // 3])
    _mark_metrics(tmp_path)

    result = _finish(tmp_path, "--resume")
    assert "falling back" not in result.stderr, result.stderr
    _assert_resumed_from(tmp_path, newest)
    _assert_same_run(tmp_path, uninterrupted)
    assert not list(root.glob(".tmp-*")), sorted(p.name for p in root.iterdir())


def test_truncated_newest_checkpoint_is_named_and_the_previous_one_is_used(
        tmp_path, uninterrupted):
    newest = _start_and_kill(tmp_path, KILL_STEPS.randint(2, MAX_STEPS - 2))
    # A kill just after a checkpoint's rename may leave the oldest one half deleted (module
    # docstring): only the newest two matter here.
    (previous, _), (last, damaged) = checkpoint_dirs(tmp_path / "checkpoints")[-2:]
    assert (previous, last) == (newest - 1, newest)
    state = damaged / "state.pt"
    with open(state, "r+b") as file:  # cut in the middle, as a full disk would
        file.truncate(state.stat().st_size // 2)
    _mark_metrics(tmp_path)

    result = _finish(tmp_path, "--resume")
    assert f"checkpoint {damaged}: state.pt has" in result.stderr, result.stderr
    assert "(truncated or overwritten); falling back to the previous checkpoint" in result.stderr
    _assert_resumed_from(tmp_path, newest - 1)
    _assert_same_run(tmp_path, uninterrupted)
    with warnings.catch_warnings():  # what the resumed run left behind is whole
        warnings.simplefilter("error")
        step, _ = load_latest(tmp_path / "checkpoints")
    assert step == MAX_STEPS


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, uninterrupted):
    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    checkpoints = checkpoint_dirs(tmp_path / "checkpoints")
    for _, path in checkpoints:
        (path / "state.pt").write_bytes(b"")
    result = _run(tmp_path, "--resume")
    assert result.returncode != 0
    assert "no usable checkpoint" in result.stderr, result.stderr
    for _, path in checkpoints:
        assert f"checkpoint {path}: state.pt has 0 bytes" in result.stderr, result.stderr
    assert not (tmp_path / "model.safetensors").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [p.name for _, p in
                                                                     checkpoints]
    assert "Traceback (most recent call last)" not in result.stderr, result.stderr
    assert result.returncode == 2
    assert "fastalign train sft: error: no usable checkpoint" in result.stderr, result.stderr
