"""The TRPO trust-region check: a backtracking line search on the measured KL (§9).

TRPO (Schulman et al. 2015, "Trust Region Policy Optimization", §6 and appendix C) maximises the
surrogate E[ρ·A] subject to mean KL(π_old ‖ π_θ) ≤ δ. Whatever proposes the step (natural
gradient, a penalised first-order step), the constraint is enforced the same way: shrink the step
geometrically until the *measured* mean KL of the updated policy against the old one is within δ
(and, optionally, the surrogate improved), or give up and keep the old parameters. In fastalign
the measured KL is normally the exact per-token KL of ``fastalign.linear_kl`` (§2), but any
callable returning a 0-d tensor will do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastalign.ops._checks import check_positive

__all__ = ["LineSearchResult", "kl_line_search"]


@dataclass(frozen=True)
class LineSearchResult:
    """Outcome of ``kl_line_search``.

    Attributes:
        accepted: whether a step was taken (the parameters were moved).
        step_fraction: α of the accepted step ``params + α·step``; 0.0 when rejected.
        kl: the KL measured at the accepted step, or at the last (smallest) step tried when
            rejected (the parameters are then back where they were).
        n_backtracks: how many times the step was shrunk (``max_backtracks`` when rejected).
        surrogate_improvement: surrogate(accepted) − surrogate(start), or None without
            ``surrogate_fn`` or when rejected.
    """

    accepted: bool
    step_fraction: float
    kl: float
    n_backtracks: int
    surrogate_improvement: float | None = None


def _scalar(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must return a scalar, got shape {tuple(value.shape)}")
        return float(value.detach())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must return a 0-d tensor or a float, got {type(value).__name__}")


def kl_line_search(
    params: Sequence[torch.Tensor],
    step: Sequence[torch.Tensor],
    kl_fn: Callable[[], torch.Tensor],
    max_kl: float,
    *,
    surrogate_fn: Callable[[], torch.Tensor] | None = None,
    backtrack_ratio: float = 0.5,
    max_backtracks: int = 10,
) -> LineSearchResult:
    """Backtracking line search that enforces mean KL ≤ ``max_kl`` (Schulman et al. 2015; §9).

    Tries ``params ← params_0 + α·step`` for α = 1, r, r², …, r^max_backtracks (r =
    ``backtrack_ratio``) and accepts the first α where

    * ``kl_fn()`` — the mean KL of the updated policy against the old one — is finite and
      ≤ ``max_kl``, and
    * if ``surrogate_fn`` is given, the surrogate (an objective to *maximise*, e.g. E[ρ·A]) is
      finite and strictly larger than at ``params_0``.

    If no α passes, the parameters are restored bit for bit. Parameter updates and every call of
    ``kl_fn`` / ``surrogate_fn`` run under ``torch.no_grad()``; the callables read the current
    values of ``params`` (e.g. by running the model).

    Args:
        params: the tensors to update in place (typically ``nn.Parameter``s), floating point.
        step: update directions, one per parameter with the same shape (e.g. the natural-gradient
            step already scaled to the trust region).
        kl_fn: callable returning the measured mean KL as a 0-d tensor (or a float).
        max_kl: δ > 0.
        surrogate_fn: optional callable returning the surrogate objective (0-d tensor or float).
        backtrack_ratio: r in (0, 1).
        max_backtracks: number of shrinkings allowed, ≥ 0 (so ``max_backtracks + 1`` tries).

    Returns:
        A ``LineSearchResult``.
    """
    params, step = list(params), list(step)
    if len(params) != len(step):
        raise ValueError(f"step must have one tensor per parameter: got {len(step)} step tensors "
                         f"for {len(params)} params")
    if not params:
        raise ValueError("params must contain at least one tensor")
    for i, (p, s) in enumerate(zip(params, step)):
        for name, t in ((f"params[{i}]", p), (f"step[{i}]", s)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if s.shape != p.shape:
            raise ValueError(f"step[{i}] must have the shape of params[{i}] {tuple(p.shape)}, "
                             f"got {tuple(s.shape)}")
    if not callable(kl_fn):
        raise TypeError(f"kl_fn must be callable, got {type(kl_fn).__name__}")
    if surrogate_fn is not None and not callable(surrogate_fn):
        raise TypeError(f"surrogate_fn must be callable, got {type(surrogate_fn).__name__}")
    max_kl = check_positive("max_kl", max_kl)
    ratio = check_positive("backtrack_ratio", backtrack_ratio)
    if ratio >= 1:
        raise ValueError(f"backtrack_ratio must lie in (0, 1), got {ratio}")
    if not isinstance(max_backtracks, int) or isinstance(max_backtracks, bool):
        raise TypeError(f"max_backtracks must be an int, got {type(max_backtracks).__name__}")
    if max_backtracks < 0:
        raise ValueError(f"max_backtracks must be >= 0, got {max_backtracks}")

    with torch.no_grad():
        originals = [p.detach().clone() for p in params]
        baseline = None if surrogate_fn is None else _scalar("surrogate_fn", surrogate_fn())
        kl, result = math.nan, None
        try:
            for n_backtracks in range(max_backtracks + 1):
                fraction = ratio**n_backtracks
                for p, p0, s in zip(params, originals, step):
                    p.copy_(p0 + fraction * s.to(p0.dtype))
                kl = _scalar("kl_fn", kl_fn())
                if not (math.isfinite(kl) and kl <= max_kl):
                    continue
                if baseline is None:
                    result = LineSearchResult(True, fraction, kl, n_backtracks)
                    break
                improvement = _scalar("surrogate_fn", surrogate_fn()) - baseline
                if math.isfinite(improvement) and improvement > 0:
                    result = LineSearchResult(True, fraction, kl, n_backtracks, improvement)
                    break
        finally:
            if result is None:  # rejected, or a callable raised: put everything back exactly
                for p, p0 in zip(params, originals):
                    p.copy_(p0)
    return result if result is not None else LineSearchResult(False, 0.0, kl, max_backtracks)
