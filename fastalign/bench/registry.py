"""Every benchmarked op, by name: the one table that ``fastalign bench`` and the pytest-benchmark
suite in ``benchmarks/`` read. A new op is a module with a ``Benchmark`` and a line here."""

from __future__ import annotations

from fastalign.bench import dpo, linear_kl, linear_logprobs, linear_nll
from fastalign.bench.harness import MODES, Benchmark

BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (linear_logprobs.BENCHMARK, linear_nll.BENCHMARK, linear_kl.BENCHMARK,
                      dpo.BENCHMARK)
}
DEFAULT = linear_logprobs.BENCHMARK.name  # what `fastalign bench` runs without --op


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown op {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def all_providers() -> tuple[str, ...]:
    """Every op's providers, each once, in the table's order."""
    return tuple(dict.fromkeys(name for benchmark in BENCHMARKS.values()
                               for name in benchmark.providers))


def all_modes() -> tuple[str, ...]:
    """The modes some op has, in ``MODES`` order."""
    return tuple(mode for mode in MODES
                 if any(mode in benchmark.modes for benchmark in BENCHMARKS.values()))
