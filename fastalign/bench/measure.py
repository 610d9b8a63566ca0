"""How the harness measures a provider: timing (CUDA events / ``do_bench``, or a CPU timer),
the workspace memory a call adds, the device's own matrix rate, and the machine it ran on."""

from __future__ import annotations

import gc
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastalign.bench.memory import measure_peak_memory

_MiB = 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Modes and timing
# ----------------------------------------------------------------------------------------------


def _no_setup() -> None:
    return None


@dataclass(frozen=True)
class ModeFn:
    """One call of a mode is ``run(setup())``; only ``run`` is timed and memory-measured."""

    run: Callable[[object], object]
    setup: Callable[[], object] = _no_setup

    @property
    def has_setup(self) -> bool:
        return self.setup is not _no_setup

    def __call__(self) -> object:
        return self.run(self.setup())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class TimingOptions:
    """CPU: ``warmup`` + ``reps`` timed calls. CUDA: ``triton.testing.do_bench`` budgets in ms.

    ``interleave`` (CPU): time the providers of a shape in rounds, each round one call of every
    (provider, mode) in turn, instead of one provider's calls after another's. A CPU's speed
    drifts over minutes (shared hosts, clocks, other load); interleaved, the drift falls on every
    provider alike instead of on whichever ran during a slow minute.
    """

    warmup: int = 1
    reps: int = 5
    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100
    interleave: bool = True


def time_fn(fn: Callable[[], object] | ModeFn, device: torch.device | str,
            options: TimingOptions = TimingOptions()) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of ``fn()``, or of ``fn.run`` for a ModeFn
    with a setup (the setup runs before every call, untimed)."""
    device = torch.device(device)
    setup = fn.setup if isinstance(fn, ModeFn) and fn.has_setup else None
    run = fn.run if setup is not None else (lambda _: fn())
    if device.type == "cuda" and setup is None:
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=options.cuda_warmup_ms, rep=options.cuda_rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(median), float(p20), float(p80)
    if device.type == "cuda":
        times = _cuda_times_with_setup(run, setup or _no_setup, device, options)
    else:
        for _ in range(options.warmup):
            run((setup or _no_setup)())
        times = []
        for _ in range(max(1, options.reps)):
            state = (setup or _no_setup)()
            start = time.perf_counter()
            run(state)
            times.append((time.perf_counter() - start) * 1e3)
            del state
    return _quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8)


def time_interleaved(fns: Sequence[Callable[[], object] | ModeFn],
                     options: TimingOptions = TimingOptions()) -> list[tuple[float, float, float]]:
    """CPU: (median, 20th, 80th percentile) milliseconds of each of ``fns``, timed in rounds:
    ``options.warmup`` untimed rounds, then ``options.reps`` rounds that call every fn once in
    turn (a ModeFn's setup untimed, as in ``time_fn``)."""
    calls = [(fn.setup, fn.run) if isinstance(fn, ModeFn) else (_no_setup, lambda _, f=fn: f())
             for fn in fns]
    for _ in range(options.warmup):
        for setup, run in calls:
            run(setup())
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(max(1, options.reps)):
        for index, (setup, run) in enumerate(calls):
            state = setup()
            start = time.perf_counter()
            run(state)
            times[index].append((time.perf_counter() - start) * 1e3)
            del state
    return [(_quantile(t, 0.5), _quantile(t, 0.2), _quantile(t, 0.8)) for t in times]


def _cuda_times_with_setup(run: Callable[[object], object], setup: Callable[[], object],
                           device: torch.device, options: TimingOptions) -> list[float]:
    """do_bench's recipe (flush L2, warm up and repeat for time budgets) with CUDA events around
    ``run`` only; ``setup`` is enqueued before the start event, so its GPU work is not counted."""
    flush = torch.empty(256 * _MiB, dtype=torch.int8, device=device)

    def once() -> float:
        state = setup()
        flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run(state)
        end.record()
        del state
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)

    estimate = statistics.median(once() for _ in range(5))
    for _ in range(max(1, int(options.cuda_warmup_ms / max(estimate, 1e-3)))):
        once()
    return [once() for _ in range(max(1, int(options.cuda_rep_ms / max(estimate, 1e-3))))]


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (as ``torch.quantile`` / ``do_bench``)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def matmul_tflops(device: torch.device | str, dtype: torch.dtype, size: int | None = None,
                  options: TimingOptions = TimingOptions()) -> float:
    """The device's own matrix-product rate: a square ``torch.mm`` of random data in ``dtype``."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    median, _, _ = time_fn(lambda: torch.mm(a, b), device, options)
    return 2 * size**3 / (median * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def _tensor_bytes(value: object) -> int:
    """Bytes held by the tensors in ``value`` (a tensor or nested tuples/lists of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def measure_mode_memory(fn: ModeFn, device: torch.device | str) -> int:
    """Workspace: the peak bytes that ``fn.run`` adds on top of the memory in use after
    ``fn.setup`` (the inputs, and for ``backward`` the saved graph), beyond what it returns.

    What a call returns (the op's value; the gradients of its inputs) is the same for every
    provider and is needed by the caller anyway, so it is left out: the number is the memory the
    op itself costs. For ``full`` that excludes the inputs and the returned gradients.
    """
    state = fn.setup()
    synchronize(torch.device(device))
    result, peak_bytes = measure_peak_memory(lambda: fn.run(state), device)
    state = None  # noqa: F841 - drop the graph now
    return max(0, peak_bytes - _tensor_bytes(result))


def timing_metrics(times: tuple[float, float, float], n_flops: int,
                   matmul_rate: float | None = None) -> dict:
    """The row fields of a (median, p20, p80) ms timing of ``n_flops`` of work."""
    ms_median, ms_p20, ms_p80 = times
    tflops = n_flops / (ms_median * 1e-3) / 1e12
    return {"ms_median": ms_median, "ms_p20": ms_p20, "ms_p80": ms_p80, "tflops": tflops,
            "frac_of_matmul": tflops / matmul_rate if matmul_rate else math.nan}


def measure_mode_fn(fn: ModeFn, device: torch.device, n_flops: int, timing: TimingOptions,
                    matmul_rate: float | None = None) -> dict:
    """Peak memory (one separate, un-timed call) then time of ``fn``; returns the metrics."""
    peak_bytes = measure_mode_memory(fn, device)
    return {**timing_metrics(time_fn(fn, device, timing), n_flops, matmul_rate),
            "peak_mem_mb": peak_bytes / _MiB}


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            match = re.search(r"^model name\s*:\s*(.+)$", info.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_name(device: torch.device | str) -> str:
    """GPU name, or the CPU model string with the number of cores this process may use."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({cpu_cores()} cores)"


def device_slug(device: torch.device | str) -> str:
    """File-name-safe form of ``device_name``: "nvidia-h100-80gb-hbm3", "cpu-intel-xeon-2c"."""
    device = torch.device(device)
    if device.type == "cuda":
        text = torch.cuda.get_device_name(device)
    else:
        text = f"cpu {cpu_model()} {cpu_cores()}c"
    text = re.sub(r"\((r|tm|c)\)|\b(cpu @|processor)\b", " ", text.lower())
    return re.sub(r"[^a-z0-9.]+", "-", text).strip("-.") or device.type


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version}
