"""pytest-benchmark suite for ``linear_nll`` (mean NLL and its gradients, mode full) at a small
and a default shape: the harness's inputs, providers, float32 ground truth, FLOP count (6·N·H·V)
and memory measurement, pytest-benchmark's timing loop. See ``conftest.py``."""

from __future__ import annotations

BENCH_OP = "linear_nll"


def test_linear_nll(op_bench, shape_id, provider_name, mode):
    """Parametrized by conftest.pytest_generate_tests over shapes × providers × modes."""
    op_bench(BENCH_OP, shape_id, provider_name, mode)
