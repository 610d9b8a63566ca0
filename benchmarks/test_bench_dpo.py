"""pytest-benchmark suite for one DPO step's loss work (``FusedDPOLoss`` against TRL-style eager
PyTorch and ``torch.compile``): providers × modes (forward, full) at a small and a default shape.

Uses ``fastalign.bench`` (``dpo`` on the harness) for the inputs (B pairs of T tokens, prompts and
padding masked with -100), providers, modes, ground truth, FLOP count and memory measurement; only
the timing loop is pytest-benchmark's. Each provider's loss and gradients are checked against the
ground truth before it is timed. See ``conftest.py``.
"""

from __future__ import annotations

BENCH_OP = "dpo"


def test_dpo(op_bench, shape_id, provider_name, mode):
    """Parametrized by conftest.pytest_generate_tests over shapes × providers × modes."""
    op_bench(BENCH_OP, shape_id, provider_name, mode)
