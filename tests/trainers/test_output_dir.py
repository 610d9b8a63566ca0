"""A run never continues or mixes with another run by accident (issue 16, item 3).

An output directory holding an earlier run is refused unless ``--resume`` (continue it) or
``--overwrite`` (start over) is given; ``--resume`` with no checkpoint is an error, not a silent
fresh start; a checkpoint records the options and the data it was trained with, and a resume
that changes either is refused, naming what changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastalign import assets, data
from fastalign.cli import main as cli_main
from fastalign.trainers import SFTConfig, SFTTrainer
from fastalign.trainers.checkpoint import checkpoint_dirs

FAST = ["--batch-size", "2", "--max-length", "32", "--max-prompt-length", "16", "--no-progress",
        "--no-plots"]


def _train(output: Path, *options: str) -> int:
    return cli_main(["train", "sft", "--output", str(output), *FAST, *options])


def _steps(output: Path) -> list[int]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def _one_error_line(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert "Traceback" not in error
    assert len(error.splitlines()) == 1, error
    return error


def test_a_second_run_into_the_same_output_is_refused(tmp_path, capsys):
    output = tmp_path / "run"
    assert _train(output, "--max-steps", "4", "--save-steps", "2") == 0
    before = sorted(p.name for p in (output / "checkpoints").iterdir())
    capsys.readouterr()

    assert _train(output, "--max-steps", "2") == 2
    error = _one_error_line(capsys)
    assert f"--output {output} already holds a run (checkpoints up to step 4, " \
           "metrics.jsonl)" in error
    assert "--resume" in error and "--overwrite" in error
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == before
    assert _steps(output) == [1, 2, 3, 4]


def test_overwrite_starts_over_without_the_old_checkpoints(tmp_path):
    """The reported mix-up: the new run's metrics, then a resume from the old run's step 4."""
    output = tmp_path / "run"
    assert _train(output, "--max-steps", "4", "--save-steps", "2") == 0
    assert _train(output, "--max-steps", "2", "--save-steps", "1", "--overwrite") == 0
    assert [step for step, _ in checkpoint_dirs(output / "checkpoints")] == [1, 2]
    assert _steps(output) == [1, 2]
    assert _train(output, "--max-steps", "3", "--save-steps", "1", "--resume") == 0
    assert _steps(output) == [1, 2, 3]


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    output = tmp_path / "run"
    assert _train(output, "--max-steps", "1", "--resume") == 2
    assert "--resume: " in _one_error_line(capsys)
    assert not (output / "metrics.jsonl").exists()

    assert _train(output, "--max-steps", "1") == 0  # no --save-steps: metrics, no checkpoint
    capsys.readouterr()
    assert _train(output, "--max-steps", "2", "--resume") == 2
    error = _one_error_line(capsys)
    assert f"{output / 'checkpoints'} holds no checkpoint to continue from" in error
    assert "--overwrite" in error


@pytest.mark.parametrize("changed, message", [
    (["--batch-size", "3"], "--batch-size was 2, now 3"),
    (["--lr", "0.001"], "--lr was 0.0001, now 0.001"),
    (["--completion-only-loss"], None),
])
def test_resume_with_other_options_is_refused_naming_them(tmp_path, capsys, changed, message):
    output = tmp_path / "run"
    assert _train(output, "--max-steps", "2", "--save-steps", "1", "--no-completion-only-loss"
                  ) == 0
    capsys.readouterr()
    assert _train(output, "--max-steps", "3", "--resume", "--no-completion-only-loss",
                  *changed) == 2
    error = _one_error_line(capsys)
    assert "the checkpoint of step 2" in error and "was trained with other options" in error
    assert (message or "--completion-only-loss was False, now True") in error
    # What may change on resume: how long, how often to save, where and how it runs.
    assert _train(output, "--max-steps", "3", "--resume", "--no-completion-only-loss",
                  "--save-steps", "3", "--impl", "reference", "--logging-steps", "2") == 0
    assert _steps(output) == [1, 2, 3]


def test_resume_on_other_data_is_refused(tmp_path, capsys):
    output = tmp_path / "run"
    records = data.load_jsonl(assets.default_data_path("sft"), "sft")
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in records[:8]))
    second.write_text("".join(json.dumps(r) + "\n" for r in records[8:16]))
    assert _train(output, "--data", str(first), "--max-steps", "2", "--save-steps", "1") == 0
    capsys.readouterr()
    assert _train(output, "--data", str(second), "--max-steps", "3", "--resume") == 2
    error = _one_error_line(capsys)
    assert "was trained on other data (8 examples, this run has 8" in error


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    assert _train(tmp_path / "run", "--resume", "--overwrite") == 2
    assert "resume and overwrite exclude each other" in _one_error_line(capsys)


def test_the_python_api_refuses_an_output_holding_a_run(tmp_path):
    tokenizer = assets.load_default_tokenizer()
    records = data.load_jsonl(assets.default_data_path("sft"), "sft")[:8]
    examples = data.encode_sft(records, tokenizer, max_length=32, max_prompt_length=16)
    config = SFTConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, progress=False,
                       plots=False)
    SFTTrainer(assets.build_default_model(seed=0), tokenizer, examples, config).train()
    with pytest.raises(ValueError, match="already holds a run"):
        SFTTrainer(assets.build_default_model(seed=0), tokenizer, examples, config).train()


# ----------------------------------------------------------------------------------------------
# A hub id with no hub to reach: a prompt one-line error, or the cached copy (issue 16, item 5)
# ----------------------------------------------------------------------------------------------


def _train_offline(tmp_path: Path, model: str) -> subprocess.CompletedProcess:
    """``fastalign train sft --model MODEL`` with the hub at a port where nothing listens (every
    request refused at once, as with no network) and the Hugging Face cache in ``tmp_path``."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-m", "fastalign", "train", "sft", "--model", model, "--output",
         str(tmp_path / "run"), *FAST, "--max-steps", "1"],
        capture_output=True, text=True, env=env, timeout=300)


def test_a_mistyped_hub_id_offline_fails_at_once(tmp_path):
    """transformers retries each file of an unreachable hub for about a minute (measured: 53 s
    for the tokenizer alone); one lookup decides instead. The bound is loose: a subprocess
    that imports torch and transformers takes a few seconds on a loaded machine."""
    started = time.monotonic()
    result = _train_offline(tmp_path, "my-org/tiny-llama-typo")
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "fastalign train sft: error: --model my-org/tiny-llama-typo: not a local directory, and "
        "the Hugging Face hub cannot be reached (" + result.stderr.split("reached (")[1]
        .split(") with")[0] + ") with no cached copy; give a model directory, or check the id "
        "and the network"]
    assert elapsed < 30, f"{elapsed:.0f} s before the error"


def test_a_cached_hub_model_trains_without_the_hub(tmp_path):
    snapshot = tmp_path / "hf" / "hub" / "models--my-org--tiny" / "snapshots" / ("0" * 40)
    assets.build_default_model(seed=0).save_pretrained(snapshot)
    assets.load_default_tokenizer().save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    result = _train_offline(tmp_path, "my-org/tiny")
    assert result.returncode == 0, result.stderr
    assert _steps(tmp_path / "run") == [1]
