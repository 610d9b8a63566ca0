"""Masked statistics over per-token tensors and the reduction of a per-token loss to a scalar.

Shared by the PPO family of losses (``ppo``, ``grpo``), the fused modules and the trainers.
Conventions (``docs/ALGORITHMS.md`` §8): per-token tensors are ``[B, T]`` floating point;
``mask`` is ``[B, T]``, bool or 0/1. Padding may hold anything, even inf or NaN: masked out
positions are replaced by 0 before any arithmetic that could spread them, so they get neither
value nor gradient. A masked mean over no tokens is 0, never NaN. Arithmetic runs in float32
(float64 when any input is float64).
"""

from __future__ import annotations

import torch

from fastalign.losses._common import compute_dtype
from fastalign.ops._checks import (
    check_choice,
    check_float_tensor,
    check_max_len,
    check_per_token,
    check_positive,
    check_token_mask,
)

# Canonical token-aggregation modes and the names other libraries use for the same thing
# (verl's ``loss_agg_mode`` spellings, with underscores).
AGGREGATION_MODES = ("grpo", "dapo", "dr_grpo")
_AGGREGATION_ALIASES = {
    "grpo": "grpo",
    "seq_mean_token_mean": "grpo",
    "dapo": "dapo",
    "token_mean": "dapo",
    "dr_grpo": "dr_grpo",
    "seq_mean_token_sum_norm": "dr_grpo",
}
# Every accepted spelling of a mode.
AGGREGATION_NAMES = tuple(_AGGREGATION_ALIASES)


def zero_outside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where ``mask``, else 0; a NaN/inf in padding reaches neither value nor gradient."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def check_aggregation(name: str, value) -> str:
    """An ``aggregate_token_loss`` mode given to a loss as ``name``: the error names that argument
    (the caller's), not ``mode``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if value not in _AGGREGATION_ALIASES:
        raise ValueError(f"{name}: unknown mode {value!r}; valid values are: "
                         f"{', '.join(_AGGREGATION_ALIASES)}")
    return value


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set; 0 where no position is set.

    Args:
        x: floating-point tensor of any shape (usually ``[B, T]``).
        mask: bool or 0/1 tensor with the shape of ``x``.
        dim: reduce over this dimension only (e.g. ``dim=1``: one mean per sequence); ``None``
            reduces everything to a 0-d tensor.

    Returns:
        float32 (float64 for float64 ``x``); 0-d, or ``x``'s shape without ``dim``.
    """
    check_float_tensor("x", x)
    mask = check_token_mask(mask, x, "x")
    if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool)):
        raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
    x = x.to(compute_dtype(x))
    total = zero_outside(x, mask).sum() if dim is None else zero_outside(x, mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (a 0-d tensor).

    With ``unbiased`` the Bessel factor n / (n − 1) is applied when n > 1 masked positions exist;
    for n ≤ 1 the (biased) value is returned instead of NaN: 0 for a single token or for none.

    Args:
        x: floating-point tensor; mask: bool or 0/1 with the same shape.

    Returns:
        0-d float32 (float64 for float64 ``x``).
    """
    mean = masked_mean(x, mask)
    mask = check_token_mask(mask, x, "x")
    # Zeroed outside the mask before squaring: a NaN/inf in padding must not reach the gradient
    # through the square (masked_mean's where() blocks only the value of a non-finite square).
    centred = zero_outside(x.to(mean.dtype) - mean, mask)
    var = masked_mean(centred * centred, mask)
    if unbiased:
        n = mask.sum().to(var.dtype)
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, *, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` over the masked tokens: (x − mean) / sqrt(var + eps) (§8, "whiten A").

    Mean and (unbiased) variance are taken over the masked positions of the whole tensor, as in
    TRL's PPO. With ``shift_mean=False`` the mean is added back (only the scale changes), the
    usual choice for rewards. Positions outside ``mask`` are set to 0 in the output.

    Args:
        x: floating-point tensor of any shape, e.g. advantages ``[B, T]``.
        mask: bool or 0/1 tensor with the shape of ``x``.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance; > 0.

    Returns:
        Same shape as ``x``, float32 (float64 for float64 ``x``). Differentiable.
    """
    eps = check_positive("eps", eps)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    mask = check_token_mask(mask, x, "x")
    xf = zero_outside(x.to(mean.dtype), mask)  # padding's NaN/inf stays out of every gradient
    whitened = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_outside(whitened, mask)


def aggregate_token_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "grpo",
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar, one of three normalisations (§8).

    * ``"grpo"`` (alias ``"seq_mean_token_mean"``): the masked mean of each sequence, then the
      mean over all B sequences (Shao et al. 2024). A sequence with no tokens counts as 0.
    * ``"dapo"`` (alias ``"token_mean"``): the mean over every masked token of the batch, so long
      sequences weigh more (Yu et al. 2025, DAPO "token-level policy gradient loss").
    * ``"dr_grpo"`` (alias ``"seq_mean_token_sum_norm"``): sum over masked tokens divided by the
      constant B · max_len, removing the length bias (Liu et al. 2025, Dr. GRPO).

    Args:
        per_token_loss: ``[B, T]`` floating point.
        mask: ``[B, T]`` bool or 0/1.
        mode: see above.
        max_len: the "dr_grpo" constant; defaults to T. Ignored by the other modes.

    Returns:
        0-d tensor, float32 (float64 for float64 input). All-masked input gives 0.
    """
    check_per_token("per_token_loss", per_token_loss)
    mask = check_token_mask(mask, per_token_loss, "per_token_loss")
    mode = _AGGREGATION_ALIASES[check_choice("mode", mode, tuple(_AGGREGATION_ALIASES))]
    max_len = check_max_len(max_len)
    loss = zero_outside(per_token_loss.to(compute_dtype(per_token_loss)), mask)
    batch, length = loss.shape
    if mode == "grpo":
        per_sequence = loss.sum(1) / mask.sum(1).clamp(min=1).to(loss.dtype)
        return per_sequence.sum() / max(batch, 1)
    if mode == "dapo":
        return loss.sum() / mask.sum().clamp(min=1).to(loss.dtype)
    return loss.sum() / max(batch * (length if max_len is None else max_len), 1)
