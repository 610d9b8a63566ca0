"""Group-relative policy optimisation: GRPO and RLOO advantages and the GRPO loss (§8).

Layer 3 of fastalign: plain PyTorch on per-token ``[B, T]`` tensors with a ``[B, T]`` mask, in
the conventions of ``fastalign.losses.masked`` (float32 arithmetic, masked means of nothing are 0,
losses return ``(loss, metrics)`` with detached 0-d float32 metrics).

A batch holds G completions per prompt, grouped consecutively: rows ``[k·G, (k + 1)·G)`` answer
prompt k.
"""

from __future__ import annotations

import torch

from fastalign.losses._common import compute_dtype, metric
from fastalign.losses.kl import KL_ESTIMATORS, kl_penalty
from fastalign.losses.masked import (
    aggregate_token_loss,
    check_aggregation,
    masked_mean,
    zero_outside,
)
from fastalign.losses.ppo import Metrics, check_clip, clip_ratio_metrics
from fastalign.ops._checks import (
    check_choice,
    check_float_tensor,
    check_non_negative,
    check_per_token,
    check_positive,
    check_token_mask,
)

__all__ = ["REWARD_SCALINGS", "grpo_advantages", "grpo_loss", "rloo_advantages"]

REWARD_SCALINGS = ("group", "batch", "none")


def _grouped(rewards, group_size, *, min_group: int) -> torch.Tensor:
    """Check ``rewards`` [B·G] and ``group_size``; return them as ``[B, G]`` (compute dtype)."""
    check_float_tensor("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B·G] (groups of G consecutive completions), "
                         f"got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < min_group:
        raise ValueError(f"group_size must be >= {min_group}, got {group_size}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the batch of "
                         f"{rewards.shape[0]} rewards")
    return rewards.detach().to(compute_dtype(rewards)).view(-1, group_size)


def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale_rewards: bool | str = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-normalised advantages of GRPO (Shao et al. 2024, DeepSeekMath §4.1.2, "outcome
    supervision"):

        A_i = (r_i − mean(group)) / (std(group) + eps)

    with the unbiased (n − 1) standard deviation, as TRL. A group of one has std 0 (not NaN), so
    its advantage is 0.

    Args:
        rewards: ``[B·G]`` floating-point scalar rewards, G consecutive completions per prompt.
        group_size: G ≥ 1, dividing the batch.
        scale_rewards: ``True`` / ``"group"``: divide by the group's std; ``"batch"``: by the std of
            all rewards of the batch; ``False`` / ``"none"``: do not divide (Dr. GRPO, Liu et al.
            2025, which shows the std division biases towards too easy / too hard prompts).
        eps: > 0, added to the std.

    Returns:
        ``[B·G]`` detached advantages, float32 (float64 for float64 rewards), one per completion;
        broadcast them over tokens (``grpo_loss`` accepts them as they are).
    """
    grouped = _grouped(rewards, group_size, min_group=1)
    if isinstance(scale_rewards, bool):
        scale_rewards = "group" if scale_rewards else "none"
    scale_rewards = check_choice("scale_rewards", scale_rewards, REWARD_SCALINGS)
    eps = check_positive("eps", eps)

    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "none" or grouped.numel() == 0:
        return centred.reshape(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
    else:
        std = grouped.std() if grouped.numel() > 1 else torch.zeros((), dtype=grouped.dtype)
    return (centred / (std + eps)).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics", eq. 6):

        A_i = r_i − (1 / (G − 1)) · Σ_{j ≠ i} r_j

    the baseline of each completion being the mean reward of the other G − 1 of its group.

    Args:
        rewards: ``[B·G]`` floating-point scalar rewards, G consecutive completions per prompt.
        group_size: G ≥ 2, dividing the batch.

    Returns:
        ``[B·G]`` detached advantages, float32 (float64 for float64 rewards).
    """
    grouped = _grouped(rewards, group_size, min_group=2)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    clip_high: float | None = None,
    beta: float = 0.04,
    loss_type: str = "grpo",
    max_len: int | None = None,
    kl_estimator: str = "k3",
) -> tuple[torch.Tensor, Metrics]:
    """GRPO loss (Shao et al. 2024, eq. 3) with the DAPO / Dr. GRPO normalisations.

    Per token, with ρ = exp(logp − logp_old) and k3 = e^{logr} − 1 − logr, logr = ref − logp:

        ℓ = −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·k3

    then aggregated by ``aggregate_token_loss(mode=loss_type)``: "grpo" (per-sequence mean, then
    batch mean), "dapo" (token mean over the batch; Yu et al. 2025, also the source of
    ``clip_high``), "dr_grpo" (sum / (B·max_len); Liu et al. 2025).

    Args:
        logps: ``[B, T]`` log-probabilities under the current policy (carries the gradient).
        old_logps: ``[B, T]`` log-probabilities at generation time, or None for the single-update
            case: then ``logps.detach()`` is used, so ρ = 1 in value but its gradient is ∇logp.
        ref_logps: ``[B, T]`` reference log-probabilities; may be None only when ``beta == 0``.
        advantages: ``[B]`` (one per completion, broadcast over tokens) or ``[B, T]``; constants.
        mask: ``[B, T]`` bool or 0/1, completion tokens.
        clip: ε in (0, 1); clip_high: upper ε > 0, defaults to ``clip``.
        beta: KL coefficient β ≥ 0 (0.04 as in DeepSeekMath).
        loss_type: an ``aggregate_token_loss`` mode ("grpo", "dapo", "dr_grpo" or an alias).
        max_len: the "dr_grpo" constant; defaults to T.
        kl_estimator: estimator of ``kl_penalty`` for the β term; "k3" as in the paper.

    Returns:
        ``(loss, metrics)``; loss 0-d float32 (float64 for float64 inputs). Metrics: ``kl``
        (masked token mean of the KL estimate, only when ``ref_logps`` is given),
        TRL's ``clip_ratio/low_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_mean``,
        ``clip_ratio/high_max``, ``clip_ratio/region_mean`` (``clip_ratio_metrics``), and
        ``ratio_mean``.
    """
    check_per_token("logps", logps)
    if old_logps is not None:
        check_per_token("old_logps", old_logps, like=logps, like_name="logps")
    if ref_logps is not None:
        check_per_token("ref_logps", ref_logps, like=logps, like_name="logps")
    check_float_tensor("advantages", advantages)
    if advantages.shape != logps.shape[:1] and advantages.shape != logps.shape:
        raise ValueError(f"advantages must have shape [B] = {tuple(logps.shape[:1])} or "
                         f"[B, T] = {tuple(logps.shape)}, got {tuple(advantages.shape)}")
    mask = check_token_mask(mask, logps, "logps")
    low, high = check_clip(clip, clip_high)
    beta = check_non_negative("beta", beta)
    if ref_logps is None and beta > 0:
        raise ValueError(f"ref_logps is required when beta > 0 (beta={beta})")
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    check_aggregation("loss_type", loss_type)

    dtype = compute_dtype(logps, old_logps, ref_logps, advantages)
    logp = logps.to(dtype)
    old = logp.detach() if old_logps is None else old_logps.detach().to(dtype)
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1).expand_as(logp)
    adv = zero_outside(adv, mask)
    ratio = torch.exp(zero_outside(logp - old, mask))
    clipped_ratio = ratio.clamp(1.0 - low, 1.0 + high)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)

    metrics: Metrics = {}
    if ref_logps is not None:
        # Padding may hold garbage log-probs: zero both sides there so k(t) is 0, not NaN.
        kl = kl_penalty(zero_outside(logp, mask), zero_outside(ref_logps.to(dtype), mask),
                        estimator=kl_estimator)
        if beta > 0:
            per_token = per_token + beta * kl
        metrics["kl"] = metric(masked_mean(kl.detach(), mask))
    loss = aggregate_token_loss(per_token, mask, mode=loss_type, max_len=max_len)

    metrics |= clip_ratio_metrics(ratio.detach(), adv, mask, low, high)
    metrics["ratio_mean"] = metric(masked_mean(ratio.detach(), mask))
    return loss, metrics
