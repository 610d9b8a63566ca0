"""pytest-benchmark suite for ``linear_logprobs``: providers × modes (forward, backward, full) at a
small and a default shape.

Uses ``fastalign.bench`` (``linear_logprobs`` on the harness) for the inputs, providers, modes,
correctness check, FLOP count and memory measurement; only the timing loop is pytest-benchmark's.
Each test checks its provider against the float32 reference before timing it, and stores peak
memory, TFLOP/s and the fraction of the device's matmul rate in ``benchmark.extra_info``. See
``conftest.py`` for the options.
"""

from __future__ import annotations

BENCH_OP = "linear_logprobs"


def test_linear_logprobs(op_bench, shape_id, provider_name, mode):
    """Parametrized by conftest.pytest_generate_tests over shapes × providers × modes."""
    op_bench(BENCH_OP, shape_id, provider_name, mode)
