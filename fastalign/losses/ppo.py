"""PPO for language models: the clipped policy loss, the value loss and their sum.

Layer 3 of fastalign (`docs/STYLE.md`): loss math in plain PyTorch on the per-token outputs of the
ops (log-probabilities, values, entropies), following `docs/ALGORITHMS.md` §4 and §8.

Conventions shared by every function here:

* Per-token tensors are ``[B, T]`` floating point; ``mask`` is ``[B, T]``, bool or 0/1 (any
  nonzero entry counts as one response token). Padding may hold anything, even inf or NaN: masked
  out positions are replaced by 0 before any arithmetic that could spread them, so they get
  neither value nor gradient.
* Arithmetic runs in float32 (float64 when any input is float64); half-precision inputs are
  upcast, so losses and statistics come back in float32 (or float64).
* A masked mean over no tokens is 0, never NaN.
* Losses return ``(loss, metrics)``: ``loss`` a 0-d tensor carrying the gradient, ``metrics`` a
  dict of detached 0-d float32 tensors.

Masked statistics and token aggregation live in ``fastalign.losses.masked``, KL estimators and
controllers in ``fastalign.losses.kl``, GAE in the ``fastalign.gae`` op.
"""

from __future__ import annotations

import torch

from fastalign.losses._common import compute_dtype, metric
from fastalign.losses.masked import (
    aggregate_token_loss,
    check_aggregation,
    masked_mean,
    zero_outside,
)
from fastalign.ops._checks import (
    check_float_tensor,
    check_non_negative,
    check_per_token,
    check_positive,
    check_token_mask,
)

__all__ = [
    "check_clip",
    "check_dual_clip",
    "clip_ratio_metrics",
    "ppo_policy_loss",
    "ppo_total_loss",
    "ppo_value_loss",
]

Metrics = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Clip options (shared with grpo.py and the fused PPO module)
# ----------------------------------------------------------------------------------------------


def check_clip(clip, clip_high) -> tuple[float, float]:
    """(ε_low, ε_high): ε_low in (0, 1) so that 1 − ε_low stays positive; ε_high > 0."""
    low = check_positive("clip", clip)
    if low >= 1:
        raise ValueError(f"clip must lie in (0, 1) (the ratio is clipped to [1 - clip, ...]), "
                         f"got {low}")
    high = low if clip_high is None else check_positive("clip_high", clip_high)
    return low, high


def clip_ratio_metrics(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       low: float, high: float) -> Metrics:
    """TRL's ``clip_ratio/*`` metrics of the clipped surrogate (GRPO and PPO alike).

    A token is *low-clipped* when A < 0 and ρ < 1 − ε_low, *high-clipped* when A > 0 and
    ρ > 1 + ε_high: exactly where the clipped branch of the surrogate is active (its gradient is
    0). ``low_mean``, ``high_mean`` and ``region_mean`` (either) are masked token means;
    ``low_min`` is the smallest and ``high_max`` the largest per-sequence fraction over the
    sequences that have tokens (0 when none has).
    """
    dtype = ratio.dtype
    low_clipped = ((ratio < 1.0 - low) & (advantages < 0)).to(dtype)
    high_clipped = ((ratio > 1.0 + high) & (advantages > 0)).to(dtype)
    has_tokens = mask.sum(-1) > 0
    zero = torch.zeros((), dtype=dtype, device=ratio.device)

    def per_sequence(clipped: torch.Tensor) -> torch.Tensor:
        return masked_mean(clipped, mask, dim=-1)[has_tokens]

    low_per_sequence, high_per_sequence = per_sequence(low_clipped), per_sequence(high_clipped)
    return {
        "clip_ratio/low_mean": metric(masked_mean(low_clipped, mask)),
        "clip_ratio/low_min": metric(low_per_sequence.min() if len(low_per_sequence) else zero),
        "clip_ratio/high_mean": metric(masked_mean(high_clipped, mask)),
        "clip_ratio/high_max": metric(high_per_sequence.max() if len(high_per_sequence)
                                      else zero),
        "clip_ratio/region_mean": metric(masked_mean(low_clipped + high_clipped, mask)),
    }


def check_dual_clip(dual_clip) -> float | None:
    if dual_clip is None:
        return None
    value = check_positive("dual_clip", dual_clip)
    if value <= 1:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020), got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# PPO losses
# ----------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    loss_agg: str = "token_mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate policy loss (Schulman et al. 2017, eq. 7; §8).

    Per token, with ρ = exp(logp − logp_old):

        ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε_high))

    and with a dual clip c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games with
    Deep RL", eq. 5), for A < 0 only: ℓ ← min(ℓ, −A·c), which bounds the loss when ρ ≫ 1.
    Asymmetric ``clip_high`` is DAPO's "clip-higher" (Yu et al. 2025). The per-token loss is
    aggregated by ``aggregate_token_loss`` (``loss_agg``, masked token mean by default).

    Args:
        logps: ``[B, T]`` log-probabilities under the current policy (carries the gradient).
        old_logps: ``[B, T]`` log-probabilities at rollout time (treated as constants).
        advantages: ``[B, T]`` advantages (treated as constants), e.g. whitened GAE.
        mask: ``[B, T]`` bool or 0/1, response tokens.
        clip: ε in (0, 1).
        clip_high: upper ε (> 0); defaults to ``clip``.
        dual_clip: c > 1 or None (off).
        loss_agg: an ``aggregate_token_loss`` mode; "token_mean" (= "dapo") by default.
        max_len: the constant of the "dr_grpo" / "seq_mean_token_sum_norm" mode.

    Returns:
        ``(loss, metrics)``; loss 0-d float32 (float64 for float64 inputs). Metrics:
        ``policy/approx_kl`` (½·masked mean (logp − logp_old)²), TRL's ``clip_ratio/low_mean``,
        ``clip_ratio/low_min``, ``clip_ratio/high_mean``, ``clip_ratio/high_max`` and
        ``clip_ratio/region_mean`` (``clip_ratio_metrics``: where the clipped branch is
        strictly active), ``policy/ratio_mean``,
        ``policy/dual_clipfrac`` (only with ``dual_clip``).
    """
    check_per_token("logps", logps)
    check_per_token("old_logps", old_logps, like=logps, like_name="logps")
    check_per_token("advantages", advantages, like=logps, like_name="logps")
    mask = check_token_mask(mask, logps, "logps")
    low, high = check_clip(clip, clip_high)
    dual_clip = check_dual_clip(dual_clip)
    check_aggregation("loss_agg", loss_agg)

    dtype = compute_dtype(logps, old_logps, advantages)
    log_ratio = zero_outside(logps.to(dtype) - old_logps.detach().to(dtype), mask)
    adv = zero_outside(advantages.detach().to(dtype), mask)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    metrics = {
        "policy/approx_kl": metric(0.5 * masked_mean(log_ratio.detach() ** 2, mask)),
        **clip_ratio_metrics(ratio.detach(), adv, mask, low, high),
        "policy/ratio_mean": metric(masked_mean(ratio.detach(), mask)),
    }
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (per_token > bound)
        per_token = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
        metrics["policy/dual_clipfrac"] = metric(masked_mean(dual_active.to(dtype), mask))
    loss = aggregate_token_loss(per_token, mask, mode=loss_agg, max_len=max_len)
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    loss_agg: str = "token_mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss of PPO (Schulman et al. 2017; the OpenAI baselines / Ziegler 2019 form).

    Per token, with V_clip = clip(V, V_old − ε, V_old + ε):

        ℓ = ½ · max((V − R)², (V_clip − R)²)

    aggregated by ``aggregate_token_loss`` (masked token mean by default, as in §8).

    Args:
        values: ``[B, T]`` current value predictions (carries the gradient).
        old_values: ``[B, T]`` values at rollout time (constants).
        returns: ``[B, T]`` return targets R = A + V_old (constants).
        mask: ``[B, T]`` bool or 0/1.
        clip: ε_v > 0, or None for the plain squared error ½·(V − R)².
        loss_agg, max_len: as in ``ppo_policy_loss``.

    Returns:
        ``(loss, metrics)`` with metrics ``value/clipfrac`` (fraction of masked tokens where the
        clipped error is the larger), ``value/mean`` (masked mean V), ``value/error`` (masked mean
        of (V − R)²).
    """
    check_per_token("values", values)
    check_per_token("old_values", old_values, like=values, like_name="values")
    check_per_token("returns", returns, like=values, like_name="values")
    mask = check_token_mask(mask, values, "values")
    if clip is not None:
        clip = check_positive("clip", clip)
    check_aggregation("loss_agg", loss_agg)

    dtype = compute_dtype(values, old_values, returns)
    v = zero_outside(values.to(dtype), mask)
    v_old = zero_outside(old_values.detach().to(dtype), mask)
    ret = zero_outside(returns.detach().to(dtype), mask)
    error = (v - ret) ** 2
    if clip is None:
        per_token = error
        clipfrac = torch.zeros((), dtype=dtype, device=v.device)
    else:
        v_clipped = v_old + (v - v_old).clamp(-clip, clip)
        error_clipped = (v_clipped - ret) ** 2
        per_token = torch.maximum(error, error_clipped)
        clipfrac = masked_mean((error_clipped > error).to(dtype), mask)
    loss = 0.5 * aggregate_token_loss(per_token, mask, mode=loss_agg, max_len=max_len)
    metrics = {
        "value/clipfrac": metric(clipfrac),
        "value/mean": metric(masked_mean(v.detach(), mask)),
        "value/error": metric(masked_mean(error.detach(), mask)),
    }
    return loss, metrics


def ppo_total_loss(
    policy_loss: torch.Tensor,
    value_loss: torch.Tensor,
    entropy: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    vf_coef: float = 0.1,
    ent_coef: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """The PPO objective to minimise: L_pg + c_v·L_v − c_ent·(masked mean entropy) (§8; Schulman
    et al. 2017, eq. 9).

    Args:
        policy_loss, value_loss: 0-d losses from ``ppo_policy_loss`` and ``ppo_value_loss``.
        entropy: ``[B, T]`` per-token entropies, or None (no bonus; then ``ent_coef`` is unused).
        mask: ``[B, T]`` bool or 0/1; required with ``entropy``.
        vf_coef: c_v ≥ 0 (0.1 as in TRL's PPO).
        ent_coef: c_ent ≥ 0.

    Returns:
        ``(loss, metrics)`` with ``loss/policy``, ``loss/value``, ``loss/total`` and, with
        ``entropy``, ``policy/entropy``.
    """
    for name, value in (("policy_loss", policy_loss), ("value_loss", value_loss)):
        check_float_tensor(name, value)
        if value.dim() != 0:
            raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(value.shape)}")
    vf_coef = check_non_negative("vf_coef", vf_coef)
    ent_coef = check_non_negative("ent_coef", ent_coef)
    total = policy_loss + vf_coef * value_loss
    metrics = {"loss/policy": metric(policy_loss), "loss/value": metric(value_loss)}
    if entropy is not None:
        check_per_token("entropy", entropy)
        if mask is None:
            raise ValueError("mask is required when entropy is given")
        mean_entropy = masked_mean(entropy, mask)
        total = total - ent_coef * mean_entropy
        metrics["policy/entropy"] = metric(mean_entropy)
    metrics["loss/total"] = metric(total)
    return total, metrics
