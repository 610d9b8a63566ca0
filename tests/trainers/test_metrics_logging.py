"""Training curves and TensorBoard: what ``MetricsLog`` draws and writes, read back."""

from __future__ import annotations

import json
import math
import sys

import matplotlib.figure
import pytest

from fastalign import assets
from fastalign.cli import main as cli_main
from fastalign.data import encode_sft, load_jsonl
from fastalign.trainers import SFTConfig, SFTTrainer
from fastalign.trainers.metrics import MetricsLog, report_targets


def _records(steps: int = 6) -> list[dict]:
    """Metrics shaped like a DPO run with evaluation plus GRPO's policy statistics, with the
    scales of a real run: log-probs near −70, accuracies in [0, 1], a ratio near 1, KLs near 0."""
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 0.69 - 0.01 * step, "rewards/accuracies": 0.5 + step / 20,
                  "rewards/margins": 0.02 * step, "logps/chosen": -80.0 + step,
                  "logps/rejected": -65.0 - step, "grad_norm": 1.5, "learning_rate": 1e-4,
                  "policy/ratio_mean": 1.0 + 1e-3 * step, "policy/approx_kl": 1e-5 * step,
                  "policy/kl": 2e-5 * step}
        if step % 3 == 0:
            record |= {"eval/loss": 0.68 - 0.01 * step, "eval/rewards/accuracies": 0.75,
                       "eval/logps/chosen": -82.0, "eval/logps/rejected": -64.0}
        records.append(record)
    return records


def _plotted_axes(tmp_path, monkeypatch, records) -> tuple[list[str], list[set[str]]]:
    """The PNG names ``plot`` writes and, for every axes it draws, the labels of its lines."""
    figures = []
    save = matplotlib.figure.Figure.savefig

    def record_and_save(figure, *args, **kwargs):
        figures.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record_and_save)
    log = MetricsLog(tmp_path)
    log.reset()
    for record in records:
        log.log(record)
    paths = log.plot(tmp_path / "plots", "test")
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in paths)
    axes = [{line.get_label() for line in ax.get_lines()}
            for figure in figures for ax in figure.axes if ax.get_lines()]
    return [path.name for path in paths], axes


def _axes_of(key: str, axes: list[set[str]]) -> set[str]:
    (found,) = [labels for labels in axes if key in labels]
    return found


def test_plots_keep_scales_apart_and_overlay_train_and_eval(tmp_path, monkeypatch):
    records = _records()
    names, axes = _plotted_axes(tmp_path, monkeypatch, records)
    keys = {key for record in records for key in record} - {"step"}
    drawn = [label for labels in axes for label in labels]
    assert sorted(drawn) == sorted(keys)  # every metric once
    # A training metric and its evaluation share one panel...
    for key in ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert _axes_of(key, axes) == {key, f"eval/{key}"}
    # ...and metrics of different scales never share one.
    assert "eval/logps/chosen" not in _axes_of("eval/rewards/accuracies", axes)
    assert _axes_of("policy/ratio_mean", axes) == {"policy/ratio_mean"}
    assert _axes_of("policy/kl", axes) == {"policy/kl"}
    # One figure per family, under the family's name as before; no separate eval figure.
    assert sorted(names) == ["grad_norm.png", "learning_rate.png", "logps.png", "loss.png",
                             "policy.png", "rewards.png"]


def test_an_eval_metric_without_a_training_twin_gets_its_own_panel(tmp_path, monkeypatch):
    records = [{"step": 1, "loss": 1.0, "eval/perplexity": math.e}]
    names, axes = _plotted_axes(tmp_path, monkeypatch, records)
    assert sorted(names) == ["loss.png", "perplexity.png"]
    assert axes == [{"loss"}, {"eval/perplexity"}]


# ------------------------------------------------------------------------------------ TensorBoard


@pytest.fixture(scope="module")
def sft_data():
    tokenizer = assets.load_default_tokenizer()
    records = load_jsonl(assets.default_data_path("sft"), "sft")[:24]
    return tokenizer, encode_sft(records, tokenizer, max_length=48, max_prompt_length=24)


def _train_sft(tmp_path, sft_data, **options):
    tokenizer, examples = sft_data
    base = dict(output_dir=str(tmp_path / "out"), batch_size=4, lr=1e-3, device="cpu",
                progress=False, plots=False, report_to="tensorboard")
    config = SFTConfig(**(base | options))
    trainer = SFTTrainer(assets.build_default_model(seed=0), tokenizer, examples, config,
                         eval_examples=examples[:4])
    return trainer, trainer.train()


def _tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def _jsonl_scalars(path) -> dict[str, list[tuple[int, float]]]:
    scalars: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                scalars.setdefault(key, []).append((record["step"], value))
    return scalars


def _assert_same_scalars(tensorboard, jsonl):
    assert sorted(tensorboard) == sorted(jsonl)
    for key, points in jsonl.items():
        assert [step for step, _ in tensorboard[key]] == [step for step, _ in points], key
        assert [value for _, value in tensorboard[key]] == pytest.approx(
            [value for _, value in points], rel=1e-6), key


def test_report_to_tensorboard_writes_every_metric_with_its_step(tmp_path, sft_data):
    trainer, result = _train_sft(tmp_path, sft_data, max_steps=3, eval_steps=2)
    run_dir = tmp_path / "out" / "runs"
    assert result.files["tensorboard"] == run_dir
    scalars = _tensorboard_scalars(run_dir)
    assert {"loss", "entropy", "grad_norm", "learning_rate", "eval/loss"} <= set(scalars)
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3]
    assert [step for step, _ in scalars["eval/loss"]] == [2]
    _assert_same_scalars(scalars, _jsonl_scalars(trainer.metrics_log.path))


def test_a_resumed_run_replaces_the_tensorboard_steps_after_its_checkpoint(tmp_path, sft_data):
    _train_sft(tmp_path, sft_data, max_steps=3, save_steps=2)  # checkpoint at 2, then step 3
    trainer, _ = _train_sft(tmp_path, sft_data, max_steps=4, save_steps=2, resume=True)
    scalars = _tensorboard_scalars(tmp_path / "out" / "runs")
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4]  # step 3 once: the resumed one
    _assert_same_scalars(scalars, _jsonl_scalars(trainer.metrics_log.path))


def test_a_fresh_run_in_the_same_folder_hides_the_earlier_curves(tmp_path, sft_data):
    _train_sft(tmp_path, sft_data, max_steps=3)
    _train_sft(tmp_path, sft_data, max_steps=2, lr=1e-2, overwrite=True)
    scalars = _tensorboard_scalars(tmp_path / "out" / "runs")
    assert [step for step, _ in scalars["loss"]] == [1, 2]


def test_report_to_is_checked_and_off_by_default(tmp_path, monkeypatch, capsys):
    assert SFTConfig().report_to == "none" and report_targets("none") == ()
    assert report_targets(" tensorboard, tensorboard") == ("tensorboard",)
    for bad in ("wandb", "none,tensorboard", "", ["tensorboard"]):
        with pytest.raises(ValueError, match="report_to"):
            SFTConfig(report_to=bad)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    status = cli_main(["train", "sft", "--output", str(tmp_path / "out"), "--report-to",
                       "tensorboard", "--no-progress"])
    error = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in error
    assert error.startswith("fastalign train sft: error:")
    assert "--report-to" in error and "pip install tensorboard" in error
    assert not (tmp_path / "out").exists()
