"""TRPO's step (§9): Fisher-vector products of the exact KL, conjugate gradient, the KL line search.

TRPO (Schulman et al. 2015, "Trust Region Policy Optimization", §6 and appendix C) maximises the
surrogate L(θ) = E[ρ·A] subject to the mean KL(π_old ‖ π_θ) ≤ δ. One step:

1. g = ∇L at θ_old; x ≈ (F + λI)⁻¹ g by ``conjugate_gradient``, where F is the Fisher matrix of
   the policy at θ_old (the Hessian of the mean KL there) and λ = ``cg_damping``. CG needs only
   products F·v (``FisherVectorProduct``), never F.
2. s = sqrt(2δ / xᵀ(F + λI)x) · x, the step whose quadratic model of the KL is exactly δ.
3. ``kl_line_search``: backtrack s until the *measured* mean KL (``fastalign.linear_kl``, exact
   over the vocabulary) is within δ and the surrogate improved by at least ``accept_ratio`` of the
   first-order prediction gᵀ(α·s); or give up and keep the old parameters.

``trpo_step`` does the three with ``TRPOOptions``. The KL and the surrogate are callables that
read the parameters' current values (e.g. by running the model), so any model works.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from fastalign.ops._checks import (
    check_field_choice,
    check_field_int,
    check_field_number,
    check_positive,
)

__all__ = ["CGResult", "FisherVectorProduct", "LineSearchResult", "TRPOOptions", "TRPOResult",
           "conjugate_gradient", "kl_line_search", "trpo_step"]

# A KL or surrogate callable returns a 0-d tensor, or its parts (0-d tensors summing to it),
# computed one at a time as they are iterated so that one micro-batch's graph lives at a time.
ScalarFn = Callable[[], "torch.Tensor | Iterable[torch.Tensor]"]
FVP_DIFFERENCES = ("central", "forward")


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
    expected_improvement: float | None = None,
    accept_ratio: float = 0.0,
) -> LineSearchResult:
    """Backtracking line search that enforces mean KL ≤ ``max_kl`` (Schulman et al. 2015; §9).

    Tries ``params ← params_0 + α·step`` for α = 1, r, r², …, r^max_backtracks (r =
    ``backtrack_ratio``) and accepts the first α where

    * ``kl_fn()`` — the mean KL of the updated policy against the old one — is finite and
      ≤ ``max_kl``, and
    * if ``surrogate_fn`` is given, the surrogate (an objective to *maximise*, e.g. E[ρ·A]) is
      finite and strictly larger than at ``params_0``, and, with ``expected_improvement`` (the
      first-order prediction gᵀ·step of the full step), larger by more than ``accept_ratio ·
      α · expected_improvement`` (TRPO's acceptance ratio: a step much worse than its linear
      model predicts is shrunk further).

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
        expected_improvement: gᵀ·step, the surrogate's predicted gain of the full step (needs
            ``surrogate_fn``); None: any improvement will do.
        accept_ratio: the fraction, in [0, 1), of the predicted gain a step must achieve.

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
    if expected_improvement is not None:
        if surrogate_fn is None:
            raise ValueError("expected_improvement is the surrogate's predicted gain: it needs "
                             "surrogate_fn")
        expected_improvement = float(expected_improvement)
        if not math.isfinite(expected_improvement):
            raise ValueError(f"expected_improvement must be finite, got {expected_improvement}")
    check_field_number("accept_ratio", accept_ratio, low=0.0, high=1.0, inclusive=True)

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
                wanted = 0.0 if expected_improvement is None else \
                    accept_ratio * fraction * expected_improvement
                if math.isfinite(improvement) and improvement > max(wanted, 0.0):
                    result = LineSearchResult(True, fraction, kl, n_backtracks, improvement)
                    break
        finally:
            if result is None:  # rejected, or a callable raised: put everything back exactly
                for p, p0 in zip(params, originals):
                    p.copy_(p0)
    return result if result is not None else LineSearchResult(False, 0.0, kl, max_backtracks)


# ----------------------------------------------------------------------------------------------
# The step: options, Fisher-vector products, conjugate gradient
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TRPOOptions:
    """The options of ``trpo_step``, checked once here (each error names its option).

    Attributes:
        max_kl: δ > 0, the bound on the mean KL(π_old ‖ π_θ) per token.
        cg_iters: conjugate-gradient iterations (Fisher-vector products), ≥ 1.
        cg_damping: λ ≥ 0 added to the Fisher matrix (F + λI): keeps CG well posed where F is
            singular (always, for a network with more parameters than its outputs constrain).
        cg_residual_tol: CG stops early once the squared residual ‖g − (F + λI)x‖² is below it.
        max_backtracks: shrinkings the line search may try (``kl_line_search``).
        backtrack_ratio: the line search's shrink factor, in (0, 1).
        accept_ratio: the fraction, in [0, 1), of the predicted surrogate gain a step must
            achieve (TRPO's 0.1).
        fvp_difference: "central" or "forward" differences in ``FisherVectorProduct``.
    """

    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 0.1
    cg_residual_tol: float = 1e-10
    max_backtracks: int = 10
    backtrack_ratio: float = 0.5
    accept_ratio: float = 0.1
    fvp_difference: str = "central"

    def __post_init__(self) -> None:
        check_field_number("max_kl", self.max_kl, low=0.0)
        check_field_int("cg_iters", self.cg_iters, minimum=1)
        check_field_number("cg_damping", self.cg_damping, low=0.0, inclusive=True)
        check_field_number("cg_residual_tol", self.cg_residual_tol, low=0.0, inclusive=True)
        check_field_int("max_backtracks", self.max_backtracks, minimum=0)
        check_field_number("backtrack_ratio", self.backtrack_ratio, low=0.0, high=1.0)
        check_field_number("accept_ratio", self.accept_ratio, low=0.0, high=1.0, inclusive=True)
        check_field_choice("fvp_difference", self.fvp_difference, FVP_DIFFERENCES)


def _parts(name: str, value) -> Iterable[torch.Tensor]:
    """The 0-d tensors a KL or surrogate callable returned (one tensor, or an iterable)."""
    for part in (value,) if isinstance(value, torch.Tensor) else value:
        if not isinstance(part, torch.Tensor) or part.numel() != 1:
            raise TypeError(f"{name} must return a 0-d tensor or an iterable of them, got "
                            f"{type(part).__name__} {tuple(getattr(part, 'shape', ()))}")
        yield part.reshape(())


def _total(name: str, fn: ScalarFn) -> torch.Tensor:
    """fn's value (its parts summed) without a graph."""
    with torch.no_grad():
        return sum((part.double() for part in _parts(name, fn())), torch.zeros((),
                                                                             dtype=torch.float64))


def _value_and_gradient(name: str, fn: ScalarFn, params: list[torch.Tensor]
                        ) -> tuple[float, list[torch.Tensor]]:
    """fn's value and its gradient with respect to ``params`` (zeros where it does not depend
    on one), part by part; ``.grad`` is left alone."""
    total = 0.0
    grads = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for part in _parts(name, fn()):
            if part.requires_grad:
                for grad, part_grad in zip(grads, torch.autograd.grad(part, params,
                                                                      allow_unused=True)):
                    if part_grad is not None:
                        grad.add_(part_grad)
            total += float(part.detach())
    return total, grads


def _flat_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    pieces = vector.split([t.numel() for t in like])
    return [piece.view(t.shape).to(t.dtype) for piece, t in zip(pieces, like)]


def _check_params(params) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params must contain at least one tensor")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.dtype.is_floating_point:
            raise TypeError(f"params[{i}] must be a floating-point tensor, got "
                            f"{getattr(p, 'dtype', type(p).__name__)}")
        if torch.finfo(p.dtype).bits < 32:
            raise TypeError(f"params[{i}] is {p.dtype}: TRPO's Fisher-vector products are finite "
                            f"differences of gradients, which need float32 or float64 "
                            f"parameters (keep float32 master weights; bf16 autocast is fine)")
    return params


# Retries allowed to bring the perturbation's KL near its target (the first product usually
# needs one or two; later ones start from the curvature already measured).
_MAX_PERTURBATIONS = 6
# The measured KL of a perturbation is accepted within this factor of the target.
_KL_TOLERANCE = 100.0


class FisherVectorProduct:
    """v ↦ (F + λI)·v at the parameters' values when constructed (θ_old), F the Hessian there of
    the mean KL(π_old ‖ π_θ) that ``kl_fn`` measures, i.e. the Fisher matrix
    mean_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t of the policy (J_t: the Jacobian of token t's logits).

    **Method: finite differences of exact KL gradients.** F·v = ∇_θ(∇_θKL · v) would need the
    gradient of a gradient, and ``fastalign.linear_kl``'s backward is a fused kernel that autograd
    cannot differentiate again (it runs outside autograd, so a second backward sees no graph).
    Instead the KL's gradient — one ordinary backward through ``linear_kl``, logits never
    materialised — is differentiated numerically along u = v/‖v‖::

        central:  F·v ≈ ‖v‖ · [∇KL(θ_old + t·u) − ∇KL(θ_old − t·u)] / (2t)
        forward:  F·v ≈ ‖v‖ · ∇KL(θ_old + t·u) / t          (∇KL(θ_old) = 0: the KL's minimum)

    **Error.** Truncation: relative O(t²) for central differences (the cubic terms cancel),
    O(t) for forward ones; in terms of κ = KL(θ_old + t·u) ≈ t²·uᵀFu/2, about κ and √κ.
    Rounding: the gradient at distance t holds about ε/√κ relative noise (ε: the parameters'
    machine epsilon). t is therefore chosen for κ = ε^(2/3) (central) or ε (forward), which
    balances the two: a relative error near ε^(2/3) (3e-5 in float32, 4e-11 in float64) or √ε
    (3e-4, 1.5e-8). t comes from the measured KL: the first product starts at t = √(2κ) and
    rescales t by √(κ/KL) (the KL is quadratic in t) until the KL is within a factor 100 of κ;
    each later product starts from the curvature the previous one measured.

    **Cost.** Two gradient passes per product (central) or one (forward), plus the rare retry;
    ``gradient_passes`` counts them. The parameters are moved in place and put back bit for bit.

    Args:
        params: the tensors the KL depends on (a model's trainable parameters), float32/64.
        kl_fn: returns the mean KL(π_old ‖ π_θ) with its graph, as a 0-d tensor or as parts
            summing to it (each computed as it is iterated, so one graph lives at a time).
        damping: λ ≥ 0.
        difference: "central" or "forward".
    """

    def __init__(self, params: Sequence[torch.Tensor], kl_fn: ScalarFn, *, damping: float = 0.1,
                 difference: str = "central") -> None:
        self.params = _check_params(params)
        if not callable(kl_fn):
            raise TypeError(f"kl_fn must be callable, got {type(kl_fn).__name__}")
        check_field_number("damping", damping, low=0.0, inclusive=True)
        check_field_choice("difference", difference, FVP_DIFFERENCES)
        self.kl_fn, self.damping, self.difference = kl_fn, float(damping), difference
        epsilon = max(torch.finfo(p.dtype).eps for p in self.params)
        self.target_kl = epsilon ** (2 / 3) if difference == "central" else epsilon
        self.dtype = _flat_dtype(self.params)
        self.origin = [p.detach().clone() for p in self.params]
        self.curvature: float | None = None  # uᵀFu measured by the last product
        self.gradient_passes = 0

    def _gradient_at(self, distance: float, direction: list[torch.Tensor]
                     ) -> tuple[float, torch.Tensor]:
        """(KL, ∇KL flattened) at θ_old + distance·direction; the parameters are put back."""
        try:
            with torch.no_grad():
                for p, p0, d in zip(self.params, self.origin, direction):
                    p.copy_(p0 + distance * d)
            kl, grads = _value_and_gradient("kl_fn", self.kl_fn, self.params)
            self.gradient_passes += 1
        finally:
            with torch.no_grad():
                for p, p0 in zip(self.params, self.origin):
                    p.copy_(p0)
        return kl, _flatten(grads, self.dtype)

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """(F + λI)·vector; ``vector`` is flat, in the parameters' order (``torch.cat`` of their
        flattened values), and so is the result (float64 if any parameter is, else float32)."""
        vector = vector.to(self.dtype)
        norm = float(vector.norm())
        if norm == 0.0 or not math.isfinite(norm):
            return self.damping * vector
        direction = _unflatten(vector / norm, self.origin)
        distance = math.sqrt(2 * self.target_kl / self.curvature) if self.curvature else \
            math.sqrt(2 * self.target_kl)
        for attempt in range(_MAX_PERTURBATIONS):
            kl, plus = self._gradient_at(distance, direction)
            if math.isfinite(kl) and kl > 0:
                ratio = self.target_kl / kl
                if 1 / _KL_TOLERANCE <= ratio <= _KL_TOLERANCE or attempt == _MAX_PERTURBATIONS - 1:
                    break
                distance *= math.sqrt(ratio)
            elif attempt == _MAX_PERTURBATIONS - 1:
                break
            else:  # no measurable KL (a perturbation lost in rounding), or an overflowing one
                distance *= 1e3 if kl == 0 else 1e-3
        if math.isfinite(kl) and kl > 0:
            self.curvature = 2 * kl / distance**2
        if self.difference == "central":
            _, minus = self._gradient_at(-distance, direction)
            product = (plus - minus) / (2 * distance)
        else:
            product = plus / distance
        return norm * product + self.damping * vector


@dataclass(frozen=True)
class CGResult:
    """Outcome of ``conjugate_gradient``.

    Attributes:
        solution: x, flat.
        product: A·x from CG's own recurrence (b − r), which spares TRPO a product to scale x.
        iterations: products of A taken (≤ ``iters``).
        residual: ‖b − A·x‖², the quantity ``residual_tol`` bounds.
    """

    solution: torch.Tensor
    product: torch.Tensor
    iterations: int
    residual: float


def conjugate_gradient(fvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       iters: int = 10, residual_tol: float = 1e-10) -> CGResult:
    """Solve A·x = b for a symmetric positive-definite A given only v ↦ A·v (Hestenes & Stiefel
    1952; TRPO appendix C), from x = 0.

    Stops after ``iters`` products, once ‖r‖² < ``residual_tol``, or when a direction shows no
    positive curvature (pᵀAp ≤ 0: A is not positive definite there, e.g. undamped and singular),
    keeping the x reached so far.

    Args:
        fvp: A·v for a flat vector v (``FisherVectorProduct``).
        b: [n] floating point (the surrogate's gradient g).
        iters: at most this many products, ≥ 1.
        residual_tol: ≥ 0.
    """
    if not callable(fvp):
        raise TypeError(f"fvp must be callable, got {type(fvp).__name__}")
    if not isinstance(b, torch.Tensor) or b.dim() != 1 or not b.dtype.is_floating_point:
        raise TypeError(f"b must be a 1-D floating-point tensor, got "
                        f"{getattr(b, 'shape', type(b).__name__)}")
    check_field_int("iters", iters, minimum=1)
    check_field_number("residual_tol", residual_tol, low=0.0, inclusive=True)
    x = torch.zeros_like(b)
    residual, direction = b.clone(), b.clone()
    residual_sq = float(residual @ residual)
    iterations = 0
    while iterations < iters and residual_sq >= residual_tol:
        product = fvp(direction).to(b.dtype)
        curvature = float(direction @ product)
        if not (math.isfinite(curvature) and curvature > 0):
            break
        alpha = residual_sq / curvature
        x.add_(direction, alpha=alpha)
        residual.sub_(product, alpha=alpha)
        new_residual_sq = float(residual @ residual)
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
        iterations += 1
    return CGResult(x, b - residual, iterations, residual_sq)


@dataclass(frozen=True)
class TRPOResult:
    """Outcome of ``trpo_step`` (the parameters are moved only when ``accepted``).

    Attributes:
        accepted: whether the line search took a step.
        kl: the measured mean KL at the accepted step (at the last one tried when rejected;
            0.0 when no step was tried: the policy did not move).
        surrogate: the surrogate at θ_old.
        surrogate_improvement: its gain at the accepted step (0.0 when rejected).
        expected_improvement: gᵀs, the first-order prediction of the full step's gain.
        step_fraction: α of the accepted step α·s (0.0 when rejected).
        n_backtracks: shrinkings the line search made.
        cg_iterations: Fisher-vector products CG took.
        cg_residual: CG's final ‖g − (F + λI)x‖² (‖g‖² when CG did not run).
        grad_norm: ‖g‖, the surrogate gradient's norm.
        gradient_passes: backward passes taken (the surrogate's and the products').
    """

    accepted: bool
    kl: float
    surrogate: float
    surrogate_improvement: float
    expected_improvement: float
    step_fraction: float
    n_backtracks: int
    cg_iterations: int
    cg_residual: float
    grad_norm: float
    gradient_passes: int


def trpo_step(params: Sequence[torch.Tensor], surrogate_fn: ScalarFn, kl_fn: ScalarFn,
              options: TRPOOptions | None = None) -> TRPOResult:
    """One TRPO update of ``params`` in place (Schulman et al. 2015; ALGORITHMS.md §9).

    g = ∇surrogate at θ_old; x = CG solution of (F + λI)x = g with ``FisherVectorProduct``;
    s = √(2δ / xᵀ(F + λI)x)·x; then ``kl_line_search`` on s with the measured KL and the
    surrogate, requiring ``accept_ratio`` of the predicted gain gᵀ(α·s). Nothing moves unless the
    line search accepts (a zero gradient or a direction without positive curvature is rejected
    outright).

    Args:
        params: the tensors to update (a model's trainable parameters), float32 or float64.
        surrogate_fn: the objective to maximise, e.g. the mean of ρ·A with ρ = π_θ/π_old, with
            its graph: a 0-d tensor or parts summing to it (see ``FisherVectorProduct``).
        kl_fn: the mean KL(π_old ‖ π_θ), exact (``fastalign.linear_kl(..., reverse=True)``
            against the old policy's hidden states and head), same form.
        options: ``TRPOOptions`` (default: δ = 0.01, 10 CG iterations, damping 0.1).

    Raises:
        FloatingPointError: the surrogate or its gradient is not finite.
    """
    options = TRPOOptions() if options is None else options
    if not isinstance(options, TRPOOptions):
        raise TypeError(f"options must be a TRPOOptions, got {type(options).__name__}")
    params = _check_params(params)
    for name, fn in (("surrogate_fn", surrogate_fn), ("kl_fn", kl_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    surrogate, grads = _value_and_gradient("surrogate_fn", surrogate_fn, params)
    gradient = _flatten(grads, _flat_dtype(params))
    grad_norm = float(gradient.norm())
    if not (math.isfinite(surrogate) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"the TRPO surrogate is {surrogate} with gradient norm "
                                 f"{grad_norm}: stopping rather than stepping")

    def rejected(cg: CGResult | None = None, passes: int = 1) -> TRPOResult:
        return TRPOResult(False, 0.0, surrogate, 0.0, 0.0, 0.0, 0,
                          0 if cg is None else cg.iterations,
                          grad_norm**2 if cg is None else cg.residual, grad_norm, passes)

    if grad_norm == 0.0:
        return rejected()
    fvp = FisherVectorProduct(params, kl_fn, damping=options.cg_damping,
                              difference=options.fvp_difference)
    cg = conjugate_gradient(fvp, gradient, iters=options.cg_iters,
                            residual_tol=options.cg_residual_tol)
    passes = 1 + fvp.gradient_passes
    quadratic = float(cg.solution @ cg.product)  # xᵀ(F + λI)x
    if not (math.isfinite(quadratic) and quadratic > 0):
        return rejected(cg, passes)
    scale = math.sqrt(2 * options.max_kl / quadratic)
    expected = scale * float(gradient @ cg.solution)
    search = kl_line_search(
        params, _unflatten(scale * cg.solution, params), lambda: _total("kl_fn", kl_fn),
        options.max_kl, surrogate_fn=lambda: _total("surrogate_fn", surrogate_fn),
        backtrack_ratio=options.backtrack_ratio, max_backtracks=options.max_backtracks,
        expected_improvement=expected, accept_ratio=options.accept_ratio)
    return TRPOResult(search.accepted, search.kl, surrogate, search.surrogate_improvement or 0.0,
                      expected, search.step_fraction, search.n_backtracks, cg.iterations,
                      cg.residual, grad_norm, passes)
