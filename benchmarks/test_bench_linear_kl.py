"""pytest-benchmark suite for ``linear_kl``: providers × modes (forward, full) at a small and a
default shape.

Uses ``fastalign.bench`` (``linear_kl`` on the harness) for the inputs, providers, modes, ground
truth, FLOP count and memory measurement; only the timing loop is pytest-benchmark's. Each
provider is checked against the float64 (CPU) / float32 (CUDA) ground truth before it is timed;
peak memory, TFLOP/s and the fraction of the device's matmul rate go to ``benchmark.extra_info``.
See ``conftest.py``.
"""

from __future__ import annotations

BENCH_OP = "linear_kl"


def test_linear_kl(op_bench, shape_id, provider_name, mode):
    """Parametrized by conftest.pytest_generate_tests over shapes × providers × modes."""
    op_bench(BENCH_OP, shape_id, provider_name, mode)
