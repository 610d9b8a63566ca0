"""Training metrics: one JSON line per step while training, then a CSV table and PNG curves.

``metrics.jsonl`` is appended to and flushed step by step, so a killed run keeps what it
logged; a resumed run drops the lines after its checkpoint and writes them again. With
``report_to="tensorboard"`` every record also goes to TensorBoard event files, under the same
names and steps.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastalign.ops.linear_argmax import linear_logit_stats

__all__ = ["LOGGED_METRICS", "LOOP_METRICS", "REPORT_TO", "Metrics", "MetricsLog", "as_floats",
           "ScoredMeanLogits", "mean_logits_by_side", "mean_metrics", "metric_panels",
           "report_targets", "scored_mean_logits"]

Metrics = dict[str, float]
REPORT_TO = ("none", "tensorboard")

# What each trainer logs at every step of a run with its default options (TRL's names wherever
# TRL 1.16 logs the same quantity); the README's table of metrics is checked against it. Every
# trainer also logs the loop's own: loss, grad_norm, learning_rate and epoch. ``{reward_fn}``
# stands for the name of each reward function.
_PREFERENCE = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
_ROLLOUT = ("reward", "reward_std", "rewards/{reward_fn}/mean", "rewards/{reward_fn}/std", "kl",
            "kl/sequence", "kl_coef", "entropy", "num_tokens", "completions/mean_length",
            "completions/min_length", "completions/max_length", "completions/clipped_ratio",
            "completions/mean_terminated_length", "completions/min_terminated_length",
            "completions/max_terminated_length")
_ONLINE = (*_ROLLOUT, "loss/policy", "clip_ratio/low_mean", "clip_ratio/low_min",
           "clip_ratio/high_mean", "clip_ratio/high_max", "clip_ratio/region_mean",
           "policy/approx_kl", "policy/ratio_mean", "policy/kl")
LOOP_METRICS = ("loss", "grad_norm", "learning_rate", "epoch")
LOGGED_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("num_tokens", "entropy", "mean_token_accuracy"),
    "rm": ("num_tokens", "accuracy", "margin", "min_reward", "mean_reward", "max_reward",
           "rewards/chosen", "rewards/rejected"),
    "dpo": ("num_tokens", *_PREFERENCE),
    "kto": ("num_tokens", "kl", *_PREFERENCE[:2], "rewards/margins", *_PREFERENCE[4:],
            "count/chosen", "count/rejected", "rewards/chosen_sum", "rewards/rejected_sum",
            "logps/chosen_sum", "logps/rejected_sum"),
    "simpo": (*_PREFERENCE, "nll_loss"),
    "cpo": (*_PREFERENCE, "nll_loss"),
    "orpo": (*_PREFERENCE, "nll_loss", "log_odds_ratio", "log_odds_chosen"),
    "ppo": (*_ONLINE, "loss/value", "value/clipfrac", "value/mean", "value/error",
            "value/returns", "reward/non_score", "reward/rlhf"),
    "grpo": (*_ONLINE, "frac_reward_zero_std"),
    "online-dpo": ("objective/kl", "objective/entropy", "objective/non_score_reward",
                   "objective/rlhf_reward", "objective/scores", "objective/scores_margin",
                   *_PREFERENCE, "val/contain_eos_token", "beta"),
    "rloo": (*_ONLINE, "frac_reward_zero_std"),
    "trpo": (*_ROLLOUT, "frac_reward_zero_std", "trpo/kl", "trpo/step_fraction", "trpo/accepted",
             "trpo/cg_residual", "trpo/surrogate_improvement"),
}


def report_targets(report_to: str) -> tuple[str, ...]:
    """The trackers a ``report_to`` value names ("none", "tensorboard" or a comma list), checked:
    an unknown name, or a tracker whose package is missing, is a ValueError naming the option."""
    if not isinstance(report_to, str):
        raise ValueError(f"report_to must be a string such as 'none' or 'tensorboard', got "
                         f"{report_to!r}")
    names = tuple(dict.fromkeys(name.strip() for name in report_to.split(",") if name.strip()))
    unknown = [name for name in names if name not in REPORT_TO]
    if unknown or not names or ("none" in names and len(names) > 1):
        raise ValueError(f"report_to must be 'none' or a comma list of {', '.join(REPORT_TO[1:])}, "
                         f"got {report_to!r}")
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("report_to (--report-to) tensorboard needs the tensorboard package: "
                         "pip install tensorboard (or report to none)")
    return tuple(name for name in names if name != "none")


class MetricsLog:
    """Per-step metrics: ``metrics.jsonl`` during training, ``metrics.csv`` and plots after."""

    def __init__(self, output_dir: Path, *, tensorboard_dir: Path | None = None):
        self.path = output_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self.tensorboard_dir = tensorboard_dir
        self._tensorboard = None

    def _open_tensorboard(self, purge_step: int) -> None:
        """A TensorBoard writer that first hides the events at steps >= ``purge_step`` of earlier
        writers in the same directory (TensorBoard's own purge), as ``metrics.jsonl`` drops them."""
        self.close()
        if self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.tensorboard_dir), purge_step=purge_step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def restore(self, up_to_step: int) -> None:
        """Keep the records of steps ≤ ``up_to_step`` (a resumed run rewrites the ones after)."""
        self.records = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record["step"] <= up_to_step:
                        self.records.append(record)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in self.records))
        os.replace(tmp, self.path)
        self._open_tensorboard(purge_step=up_to_step + 1)

    def reset(self) -> None:
        self.records = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._open_tensorboard(purge_step=0)  # a fresh run: none of an earlier one's curves

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self._tensorboard.add_scalar(key, value, global_step=record["step"])
            self._tensorboard.flush()  # like metrics.jsonl: a killed run keeps what it logged

    def write_csv(self) -> Path:
        path = self.path.with_suffix(".csv")
        keys = sorted({key for record in self.records for key in record},
                      key=lambda key: (key != "step", key))
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.records)
        return path

    def plot(self, plots_dir: Path, title: str) -> list[Path]:
        """One PNG per metric family (``rewards.png`` holds every ``rewards/...``; see
        :func:`metric_panels`), one panel per metric, each with its own y axis."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        plots_dir.mkdir(parents=True, exist_ok=True)
        keys = {key for record in self.records for key in record} - {"step"}
        paths = []
        for family, panels in metric_panels(keys).items():
            columns = min(len(panels), 3)
            rows = -(-len(panels) // columns)
            figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3 * rows),
                                        squeeze=False)
            for axes, (metric, lines) in zip(grid.flat, panels.items()):
                for key in lines:
                    points = [(r["step"], r[key]) for r in self.records if key in r]
                    steps, values = zip(*points)
                    axes.plot(steps, values, marker="." if len(points) < 40 else None, label=key)
                axes.set_title(metric, fontsize=9)
                axes.grid(alpha=0.3)
                axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
                if len(lines) > 1:
                    axes.legend(fontsize=7)
            for axes in grid.flat[len(panels):]:
                axes.set_visible(False)
            figure.suptitle(f"{title}: {family}")
            figure.supxlabel("step", fontsize=9)
            figure.tight_layout()
            path = plots_dir / f"{family}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            paths.append(path)
        return paths


def metric_panels(keys: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """How the plots lay out metrics: {family: {metric: [keys drawn on its panel]}}.

    Metrics of one family (the part of the name before the first '/') share a figure but never
    an axis, since they differ in scale (log-probs near −70 beside accuracies in [0, 1], a
    probability ratio near 1 beside KLs near 0). A training metric and its ``eval/`` twin are
    the same quantity on the same scale, so they share a panel; an ``eval/`` metric without a
    training twin gets a panel of its own in its family.
    """
    panels: dict[str, dict[str, list[str]]] = {}
    for key in sorted(keys, key=lambda key: (key.startswith("eval/"), key)):
        metric = key.removeprefix("eval/")
        family = metric.split("/")[0]
        panels.setdefault(family, {}).setdefault(metric, []).append(key)
    return panels


def mean_metrics(parts: Sequence[tuple[dict[str, float], int]]) -> Metrics:
    """Average metric dicts, each weighted by its number of examples."""
    totals: dict[str, float] = {}
    weights: dict[str, int] = {}
    for metrics, weight in parts:
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value) * weight
            weights[key] = weights.get(key, 0) + weight
    return {key: totals[key] / weights[key] for key in totals}


def as_floats(metrics: dict[str, Any]) -> Metrics:
    return {key: float(value) for key, value in metrics.items()}


@dataclass(frozen=True)
class ScoredMeanLogits:
    """The mean over the vocabulary of the next-token logits at each scored position ([S, T − 1],
    0 elsewhere), the positions, and each sequence's count: what ``mean_logits_by_side`` reads
    (a ``SequenceLogprobs`` with ``token_mean_logits`` has the same three)."""

    token_mean_logits: torch.Tensor
    token_mask: torch.Tensor
    lengths: torch.Tensor


@torch.no_grad()
def scored_mean_logits(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                       bias: torch.Tensor | None = None, temperature: float = 1.0,
                       softcap: float | None = None,
                       ignore_index: int = -100) -> ScoredMeanLogits:
    """TRL's logits metrics for a step whose loss gave no ``SequenceLogprobs`` (a fused loss
    module): from padded ``hidden`` [S, T, H] and HF-aligned ``labels`` [S, T]. Without a softcap
    the mean logit is linear in h (no pass over the vocabulary); with one, one streaming pass
    without gradient over the scored positions."""
    mask = labels[:, 1:] != ignore_index
    stats = linear_logit_stats(hidden[:, :-1][mask], weight, bias=bias, temperature=temperature,
                               softcap=softcap, mean_logits=True)
    values = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    values[mask] = stats.mean_logits.float()
    return ScoredMeanLogits(values, mask, mask.sum(-1))


@torch.no_grad()
def mean_logits_by_side(result, chosen_rows: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                        *, across_ranks=None) -> dict[str, torch.Tensor]:
    """TRL's ``logits/chosen`` and ``logits/rejected``: the mean over the vocabulary of the
    next-token logits, averaged over the scored tokens of the chosen (``chosen_rows`` [S] bool)
    and of the other sequences of a ``SequenceLogprobs`` with ``token_mean_logits`` or a
    ``ScoredMeanLogits`` (``cu_seqlens`` for a padding-free row). ``across_ranks`` (a
    trainer's ``all_ranks_mean``) makes them the means over every rank's tokens, as one process
    with the global batch would log them. A side without tokens is left out, as TRL does."""
    values = torch.where(result.token_mask, result.token_mean_logits, 0.0)
    if cu_seqlens is None:
        sums = values.sum(-1)
    else:
        sequence = torch.repeat_interleave(
            torch.arange(len(result.lengths), device=values.device),
            (cu_seqlens[1:] - cu_seqlens[:-1]).to(values.device))
        sums = values.new_zeros(len(result.lengths)).index_add(0, sequence, values)
    lengths = result.lengths.to(sums.dtype)
    totals = torch.stack([sums[chosen_rows].sum(), lengths[chosen_rows].sum(),
                          sums[~chosen_rows].sum(), lengths[~chosen_rows].sum()])
    if across_ranks is not None:  # the ratios of the ranks' mean sums are those of the totals
        totals = across_ranks(totals)
    return {f"logits/{side}": total / tokens
            for side, total, tokens in (("chosen", *totals[:2]), ("rejected", *totals[2:]))
            if tokens > 0}
