"""Small helpers shared by the loss functions: dtype promotion, metric packing, log1mexp.

Everything here is generic (no loss formula lives in this file) so that any loss module can use it.
The losses' argument checks live with every other check, in ``fastalign.ops._checks``.
"""

from __future__ import annotations

import math

import torch

Metrics = dict[str, torch.Tensor]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def metric(value: torch.Tensor) -> torch.Tensor:
    """A logged metric: detached, 0-d, float32."""
    return value.detach().reshape(()).to(torch.float32)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate everywhere (Mächler, 2012).

    For x near 0, ``log(-expm1(x))``; for x far below, ``log1p(-exp(x))``; switch at −log 2.
    Returns −inf at x = 0. Both branches are evaluated on safe arguments so that no NaN reaches
    the gradient through the unused side of the ``where``.
    """
    near_zero = x > -math.log(2.0)
    safe_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    safe_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(
        near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far))
    )
