"""Training metrics: one JSON line per step while training, then a CSV table and PNG curves.

``metrics.jsonl`` is appended to and flushed step by step, so a killed run keeps what it
logged; a resumed run drops the lines after its checkpoint and writes them again.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Metrics", "MetricsLog", "as_floats", "mean_metrics"]

Metrics = dict[str, float]


class MetricsLog:
    """Per-step metrics: ``metrics.jsonl`` during training, ``metrics.csv`` and plots after."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []

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

    def reset(self) -> None:
        self.records = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")

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
        """One PNG per metric family (the part of the name before '/'), one line per metric."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        families: dict[str, list[str]] = {}
        for key in sorted({key for record in self.records for key in record} - {"step"}):
            families.setdefault(key.split("/")[0] if "/" in key else key, []).append(key)
        plots_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for family, keys in families.items():
            figure, axes = plt.subplots(figsize=(6, 3.5))
            for key in keys:
                points = [(r["step"], r[key]) for r in self.records if key in r]
                if points:
                    steps, values = zip(*points)
                    axes.plot(steps, values, marker="." if len(points) < 40 else None, label=key)
            axes.set_xlabel("step")
            axes.set_title(f"{title}: {family}")
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8)
            figure.tight_layout()
            path = plots_dir / f"{family.replace('/', '_')}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            paths.append(path)
        return paths


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
