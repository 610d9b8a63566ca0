"""What a benchmark run writes: ``<op>_<device>_<date>.csv`` (with the hardware and versions),
the markdown table it prints, and the PNG plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from fastalign.bench.harness import BenchResult, dtype_name
from fastalign.bench.measure import device_slug, versions

# ----------------------------------------------------------------------------------------------
# Outputs: CSV, table, plot
# ----------------------------------------------------------------------------------------------

_CSV_FORMATS = {"ms_median": "{:.4f}", "ms_p20": "{:.4f}", "ms_p80": "{:.4f}", "tflops": "{:.4f}",
                "frac_of_matmul": "{:.4f}", "peak_mem_mb": "{:.1f}"}


def write_csv(result: BenchResult, path: str | Path) -> None:
    """One row per (shape, provider, mode), columns ``result.csv_columns``."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=result.csv_columns, extrasaction="ignore")
        writer.writeheader()
        for row in result.rows:
            writer.writerow({key: _CSV_FORMATS[key].format(value) if key in _CSV_FORMATS else value
                             for key, value in row.items()})


def _shapes_in_order(result: BenchResult) -> list:
    seen = {}
    for row in result.rows:
        seen.setdefault(row["shape"], None)
    for item in result.skipped:
        seen.setdefault(item.shape, None)
    return list(seen)


def format_table(result: BenchResult) -> str:
    """A markdown table (one block per shape) with time and memory ratios against eager."""
    cfg = result.config
    lines = [
        f"## `{result.op}` on {result.device}, {dtype_name(cfg.dtype)} "
        f"(torch {torch.__version__}, triton {versions()['triton']}, {result.date})",
        "",
        f"Matmul rate (`torch.mm`, {dtype_name(cfg.dtype)}): {result.matmul_tflops:.2f} TFLOP/s. "
        f"{result.flops_note} "
        "Ratios are provider ÷ eager (lower is better).",
    ]
    if torch.device(cfg.device).type == "cpu":
        how = ("in interleaved rounds (each round one call of every provider and mode in turn)"
               if cfg.timing.interleave else "one provider after another")
        lines[-1] += (f" Timed on CPU {how}: {cfg.timing.warmup} warm-up and "
                      f"{cfg.timing.reps} timed calls each.")
    for shape in _shapes_in_order(result):
        rows = [row for row in result.rows if row["shape"] == shape]
        eager = {row["mode"]: row for row in rows if row["provider"] == "eager"}
        lines += ["", f"### {shape}", "",
                  "| provider | mode | ms median [p20, p80] | TFLOP/s | % of matmul | peak MB "
                  "| time ÷ eager | mem ÷ eager |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        skips = [item for item in result.skipped if item.shape == shape]
        order = dict.fromkeys([row["provider"] for row in rows] + [item.provider for item in skips])
        for name in order:
            for row in (row for row in rows if row["provider"] == name):
                base = eager.get(row["mode"])
                time_ratio = _ratio(row["ms_median"], base and base["ms_median"])
                # Below 1 MB, CPU peaks are page-level noise: no memory ratio.
                mem_ratio = _ratio(row["peak_mem_mb"], base and base["peak_mem_mb"], floor=1.0)
                lines.append(
                    f"| {name} | {row['mode']} | {row['ms_median']:.2f} "
                    f"[{row['ms_p20']:.2f}, {row['ms_p80']:.2f}] | {row['tflops']:.3g} "
                    f"| {100 * row['frac_of_matmul']:.1f} | {_format_mb(row['peak_mem_mb'])} "
                    f"| {time_ratio} | {mem_ratio} |")
            for item in (item for item in skips if item.provider == name):
                modes = "all modes" if item.mode == "*" else item.mode
                lines.append(f"| {name} | {modes} | skipped: {item.reason} | | | | | |")
    if result.notes:
        lines += ["", "Providers: " + "; ".join(
            f"`{name}`: {note}" for name, note in result.notes.items() if note) + "."]
    return "\n".join(lines)


def _format_mb(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _ratio(value: float, base: float | None, floor: float = 0.0) -> str:
    if not base or not math.isfinite(base) or base <= floor:
        return "–"
    return f"{value / base:.2f}×"


def plot(result: BenchResult, path: str | Path) -> None:
    """One row of two panels per shape: median ms (with p20–p80 whiskers) and peak memory, as
    bars grouped by mode, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [shape for shape in _shapes_in_order(result)
              if any(row["shape"] == shape for row in result.rows)]
    if not shapes:
        return
    providers = list(dict.fromkeys(row["provider"] for row in result.rows))
    modes = list(result.config.modes)
    width = 0.8 / max(1, len(providers))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 3.6 * len(shapes)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, shape in enumerate(shapes):
        rows = {(row["provider"], row["mode"]): row for row in result.rows
                if row["shape"] == shape}
        for j, provider in enumerate(providers):
            xs, ms, lo, hi, mem = [], [], [], [], []
            for k, mode in enumerate(modes):
                row = rows.get((provider, mode))
                if row is None:
                    continue
                xs.append(k + (j - (len(providers) - 1) / 2) * width)
                ms.append(row["ms_median"])
                lo.append(row["ms_median"] - row["ms_p20"])
                hi.append(row["ms_p80"] - row["ms_median"])
                mem.append(row["peak_mem_mb"])
            color = colors[j % len(colors)]
            axes[i, 0].bar(xs, ms, width, yerr=[lo, hi], capsize=2, color=color, label=provider)
            axes[i, 1].bar(xs, mem, width, color=color, label=provider)
        for ax, ylabel in zip(axes[i], ("ms (median, p20–p80)", "peak memory (MB)")):
            ax.set_xticks(range(len(modes)), modes)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{shape} {dtype_name(result.config.dtype)}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.set_ylim(bottom=0)
    # Outside the axes, right of the memory plot: inside, it would cover eager's tall bar.
    axes[0, 1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{result.op} on {result.device} — torch {torch.__version__}, "
                 f"triton {versions()['triton']}, {result.date}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: BenchResult, output_dir: str | Path) -> dict[str, Path]:
    """Write ``<dir>/<op>_<device-slug>_<date>.{csv,png,md}``; returns the paths.

    A second run on the same day gets ``..._<date>-2.*`` (then ``-3``, ...): earlier results are
    never overwritten."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base = f"{result.op}_{device_slug(result.config.device)}_{result.date}"
    stem, number = base, 1
    while any((output_dir / f"{stem}.{ext}").exists() for ext in ("csv", "png", "md")):
        number += 1
        stem = f"{base}-{number}"
    paths = {ext: output_dir / f"{stem}.{ext}" for ext in ("csv", "png", "md")}
    write_csv(result, paths["csv"])
    paths["md"].write_text(format_table(result) + "\n")
    if result.rows:
        plot(result, paths["png"])
    else:
        del paths["png"]
    return paths
