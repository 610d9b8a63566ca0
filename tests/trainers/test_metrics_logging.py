"""Training curves and TensorBoard: what ``MetricsLog`` draws and writes, read back."""

from __future__ import annotations

import math

import matplotlib.figure

from fastalign.trainers.metrics import MetricsLog


def _records(steps: int = 6) -> list[dict]:
    """Metrics shaped like a DPO run with evaluation plus GRPO's policy statistics, with the
    scales of a real run: log-probs near −70, accuracies in [0, 1], a ratio near 1, KLs near 0."""
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 0.69 - 0.01 * step, "rewards/accuracies": 0.5 + step / 20,
                  "rewards/margins": 0.02 * step, "logps/chosen": -80.0 + step,
                  "logps/rejected": -65.0 - step, "grad_norm": 1.5, "lr": 1e-4,
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
    assert sorted(names) == ["grad_norm.png", "logps.png", "loss.png", "lr.png", "policy.png",
                             "rewards.png"]


def test_an_eval_metric_without_a_training_twin_gets_its_own_panel(tmp_path, monkeypatch):
    records = [{"step": 1, "loss": 1.0, "eval/perplexity": math.e}]
    names, axes = _plotted_axes(tmp_path, monkeypatch, records)
    assert sorted(names) == ["loss.png", "perplexity.png"]
    assert axes == [{"loss"}, {"eval/perplexity"}]
