"""Group-relative policy optimisation: GRPO and RLOO advantages and the GRPO loss (§8).

Layer 3 of fastalign: plain PyTorch on per-token ``[B, T]`` tensors with a ``[B, T]`` mask, in
the conventions of ``fastalign.losses.masked`` (float32 arithmetic, masked means of nothing are 0,
losses return ``(loss, metrics)`` with detached 0-d float32 metrics).

A batch holds G completions per prompt, grouped consecutively: rows ``[k·G, (k + 1)·G)`` answer
prompt k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

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
    check_bool,
    check_choice,
    check_finite,
    check_float_tensor,
    check_in_range,
    check_non_negative,
    check_per_token,
    check_positive,
    check_token_mask,
)

__all__ = [
    "GRPO_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "MULTI_OBJECTIVE_AGGREGATIONS",
    "REWARD_SCALINGS",
    "GRPOVariant",
    "grpo_advantages",
    "grpo_loss",
    "normalize_then_sum_advantages",
    "rloo_advantages",
]

REWARD_SCALINGS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


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


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased (n − 1) standard deviation of the non-NaN entries (keepdim along ``dim``); 0 where
    fewer than two are left (a lone reward is its own mean: its advantage is 0 either way)."""
    present = ~x.isnan()
    count = present.sum() if dim is None else present.sum(dim, keepdim=True)
    mean = x.nanmean() if dim is None else x.nanmean(dim, keepdim=True)
    centred = torch.where(present, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    squares = centred * centred
    squares = squares.sum() if dim is None else squares.sum(dim, keepdim=True)
    return torch.where(count > 1, squares / (count - 1).clamp(min=1).to(x.dtype), 0.0).sqrt()


def _scored(advantages: torch.Tensor) -> torch.Tensor:
    """A NaN reward's advantage is 0: the completion was left out of its baseline, and it must
    not move the policy."""
    return torch.nan_to_num(advantages, nan=0.0).reshape(-1)


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
    its advantage is 0. A NaN reward (a completion no reward function could score) is left out of
    its group's mean and std, and its advantage is 0, as in TRL.

    Args:
        rewards: ``[B·G]`` floating-point scalar rewards, G consecutive completions per prompt;
            NaN where a completion has no reward.
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
    if grouped.numel() == 0:
        return grouped.reshape(-1)

    centred = grouped - grouped.nanmean(dim=1, keepdim=True)
    if scale_rewards == "none":
        return _scored(centred)
    std = _nanstd(grouped, dim=1) if scale_rewards == "group" else _nanstd(grouped)
    return _scored(centred / (std + eps))


def normalize_then_sum_advantages(
    rewards_per_function: torch.Tensor,
    group_size: int,
    *,
    weights: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """GDPO's advantages of several reward functions, TRL's ``multi_objective_aggregation=
    "normalize_then_sum"`` (2026, "GDPO: Group reward-Decoupled Normalization Policy Optimization
    for Multi-reward RL Optimization", arXiv 2601.05242).

    Each function's rewards are normalised within each group, (r_k − mean_k) / (std_k + eps);
    their weighted sum s (NaN entries left out) is then normalised over the whole batch,
    A = (s − mean(s)) / (std(s) + eps). A completion that no function scored (all NaN) is left
    out of the batch statistics and gets advantage 0.

    Args:
        rewards_per_function: ``[B·G, F]`` rewards of F functions; NaN where a function gave none.
        group_size: G ≥ 1, dividing the batch.
        weights: ``[F]`` weights of the functions (default 1 each).
        eps: > 0, added to both stds.

    Returns:
        ``[B·G]`` detached advantages, float32 (float64 for float64 rewards).
    """
    check_float_tensor("rewards_per_function", rewards_per_function)
    if rewards_per_function.dim() != 2:
        raise ValueError(f"rewards_per_function must be 2-D [B·G, F] (one column per reward "
                         f"function), got shape {tuple(rewards_per_function.shape)}")
    eps = check_positive("eps", eps)
    count, functions = rewards_per_function.shape
    columns = [_grouped(column, group_size, min_group=1)
               for column in rewards_per_function.unbind(1)]
    if weights is None:
        weights = torch.ones(functions)
    check_float_tensor("weights", weights)
    if weights.shape != (functions,):
        raise ValueError(f"weights must have one entry per reward function, [{functions}], got "
                         f"shape {tuple(weights.shape)}")
    dtype = compute_dtype(rewards_per_function)
    summed = torch.zeros(count, dtype=dtype, device=rewards_per_function.device)
    if count == 0:
        return summed
    for column, weight in zip(columns, weights.tolist()):
        normalised = (column - column.nanmean(1, keepdim=True)) / (_nanstd(column, dim=1) + eps)
        summed = summed + torch.nan_to_num(normalised.reshape(-1), nan=0.0) * weight
    summed = torch.where(rewards_per_function.isnan().all(1), torch.nan, summed)
    return _scored((summed - summed.nanmean()) / (_nanstd(summed) + eps))


def rloo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    normalize_advantages: bool = False,
    reward_clip_range: tuple[float, float] | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics", eq. 6):

        A_i = r_i − (1 / (G − 1)) · Σ_{j ≠ i} r_j

    the baseline of each completion being the mean reward of the other G − 1 of its group. A NaN
    reward is left out of its siblings' baselines (which then average the other scored ones) and
    its advantage is 0, as is that of a group's only scored completion (TRL's RLOO does so).

    Args:
        rewards: ``[B·G]`` floating-point scalar rewards, G consecutive completions per prompt.
        group_size: G ≥ 2, dividing the batch.
        normalize_advantages: then normalise the advantages over the batch, (A − mean) /
            (std + eps), NaN rewards left out (TRL's RLOO ``normalize_advantages``).
        reward_clip_range: ``(low, high)``: clamp the rewards to it first (TRL's RLOO
            ``reward_clip_range``), or None.
        eps: > 0, added to the std of ``normalize_advantages``.

    Returns:
        ``[B·G]`` detached advantages, float32 (float64 for float64 rewards).
    """
    grouped = _grouped(rewards, group_size, min_group=2)
    check_bool("normalize_advantages", normalize_advantages)
    eps = check_positive("eps", eps)
    if reward_clip_range is not None:
        low, high = check_clip_range("reward_clip_range", reward_clip_range)
        grouped = grouped.clamp(low, high)
    scored = (~grouped.isnan()).sum(dim=1, keepdim=True)
    others = (grouped.nansum(dim=1, keepdim=True) - grouped) / (scored - 1).to(grouped.dtype)
    advantages = grouped - others  # 0 / 0 = NaN for a group's only scored completion
    if normalize_advantages and advantages.numel():
        advantages = (advantages - advantages.nanmean()) / (_nanstd(advantages) + eps)
    return _scored(advantages)


def check_clip_range(name: str, value) -> tuple[float, float]:
    """A ``(low, high)`` pair of finite numbers with low <= high."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    low, high = (check_finite(f"{name}[{i}]", v) for i, v in enumerate(value))
    if low > high:
        raise ValueError(f"{name} must have low <= high, got {tuple(value)}")
    return low, high


# ----------------------------------------------------------------------------------------------
# TRL's GRPO loss types and their options
# ----------------------------------------------------------------------------------------------

# TRL's ``loss_type`` values: each names a surrogate and the token aggregation that goes with it.
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo", "vespo")
LOSS_TYPE_AGGREGATION = {
    "grpo": "grpo", "bnpo": "bnpo", "dapo": "dapo", "dr_grpo": "dr_grpo", "cispo": "dapo",
    "sapo": "grpo", "luspo": "luspo", "vespo": "dapo",
}
# The loss types whose surrogate is PPO's clipped ratio (they differ only in the aggregation).
_CLIPPED = ("grpo", "bnpo", "dapo", "dr_grpo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# VESPO clamps log-weights to [log 1e-8, 20], as the paper's code does, so exp() stays finite.
_VESPO_LOG_MIN, _VESPO_LOG_MAX = math.log(1e-8), 20.0


@dataclass(frozen=True, kw_only=True)
class GRPOVariant:
    """The options that choose a GRPO-family surrogate, validated once (TRL's names).

    loss_type: one of ``GRPO_LOSS_TYPES`` or None (PPO's clipped surrogate with the caller's
    aggregation); importance_sampling_level: "token" or "sequence" (GSPO);
    off_policy_mask_threshold: δ > 0 or None; top_entropy_quantile: ρ in [0, 1] (1: off);
    sapo_temperature_pos / _neg: τ > 0; vespo_k_pos / _neg ≥ 0 and vespo_lambda_pos / _neg > 0.
    Keyword-only, so that ``PPOOptions``, which adds these fields to its own, keeps its positional
    order.
    """

    loss_type: str | None = None
    importance_sampling_level: str = "token"
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        if self.loss_type is not None:
            check_choice("loss_type", self.loss_type, GRPO_LOSS_TYPES)
        check_choice("importance_sampling_level", self.importance_sampling_level,
                     IMPORTANCE_SAMPLING_LEVELS)
        if self.off_policy_mask_threshold is not None:
            check_positive("off_policy_mask_threshold", self.off_policy_mask_threshold)
        check_in_range("top_entropy_quantile", self.top_entropy_quantile, 0.0, 1.0,
                       high_inclusive=True)
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos",
                     "vespo_lambda_neg"):
            check_positive(name, getattr(self, name))
        for name in ("vespo_k_pos", "vespo_k_neg"):
            check_non_negative(name, getattr(self, name))

    @property
    def plain(self) -> bool:
        """True when nothing here changes PPO's clipped, token-level surrogate."""
        return (self.loss_type is None and self.importance_sampling_level == "token"
                and self.off_policy_mask_threshold is None and self.top_entropy_quantile == 1.0)

    def aggregation_for(self, default: str) -> str:
        """The token aggregation: the loss type's, else ``default`` (the caller's ``loss_agg``)."""
        return default if self.loss_type is None else LOSS_TYPE_AGGREGATION[self.loss_type]


class PolicyTerms(NamedTuple):
    """What :func:`grpo_policy_terms` returns: the per-token policy loss ``[B, T]`` (zero outside
    the mask and the masks of the options, not aggregated), the importance ratio ``[B, T]`` with
    its gradient (for the bias-corrected KL), the entropy mask (``mask``, or its high-entropy
    tokens with ``top_entropy_quantile`` < 1: where an entropy bonus applies, as in TRL) and the
    surrogate's metrics."""

    per_token: torch.Tensor
    ratio: torch.Tensor
    entropy_mask: torch.Tensor
    metrics: Metrics


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor,
                      quantile: float) -> torch.Tensor:
    """The tokens of the top-ρ entropy quantile (Wang et al. 2025, "Beyond the 80/20 Rule:
    High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM Reasoning").

    The threshold is the (1 − ρ) quantile (linear interpolation) of the entropies of every masked
    token of the batch; a token is kept when its entropy reaches it. ρ = 0 keeps the highest
    entropy only, ρ = 1 every token. Returns a ``[B, T]`` bool mask inside ``mask``."""
    entropies = entropies.detach().to(compute_dtype(entropies))  # quantile() takes no halves
    values = entropies[mask]
    if values.numel() == 0:
        return torch.zeros_like(mask)
    return mask & (entropies >= torch.quantile(values, 1.0 - quantile))


def _by_sign(condition: torch.Tensor, positive: float, negative: float,
             like: torch.Tensor) -> torch.Tensor:
    """``positive`` where ``condition`` holds, else ``negative``, in ``like``'s dtype (a Python
    float given to where() would pass through float32)."""
    values = torch.tensor([negative, positive], dtype=like.dtype, device=like.device)
    return values[condition.long()]


def vespo_weights(log_ratio: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                  variant: GRPOVariant) -> torch.Tensor:
    """VESPO's detached sequence weights φ(w) = e^λ·w^k·e^{−λw} (φ(1) = 1), of the sequence
    importance weight w = Π_t ρ_t, with (k, λ) chosen by the sign of the advantage (A ≥ 0:
    the "pos" pair). Computed in log space; ``[B, T]`` (one value per sequence, broadcast)."""
    clamped = log_ratio.detach().clamp(-20.0, 20.0)
    log_w = zero_outside(clamped, mask).sum(1, keepdim=True).clamp(_VESPO_LOG_MIN, _VESPO_LOG_MAX)
    non_negative = advantages >= 0
    k = _by_sign(non_negative, variant.vespo_k_pos, variant.vespo_k_neg, log_w)
    lam = _by_sign(non_negative, variant.vespo_lambda_pos, variant.vespo_lambda_neg, log_w)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def grpo_policy_terms(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    variant: GRPOVariant,
    entropies: torch.Tensor | None = None,
) -> PolicyTerms:
    """The per-token policy loss of a GRPO-family surrogate, before the KL term and aggregation.

    Shared by :func:`grpo_loss` and ``FusedPPOLoss``; inputs already checked and in the compute
    dtype, ``advantages`` ``[B, T]`` zero outside ``mask``, ``mask`` bool. With ρ the importance
    ratio (per token, or with ``importance_sampling_level="sequence"`` the per-sequence
    exp(mean_t log ρ_t) of GSPO, Zheng et al. 2025, "Group Sequence Policy Optimization",
    broadcast over the tokens), per token:

    * clipped types (grpo, bnpo, dapo, dr_grpo, luspo): −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A);
    * ``"cispo"`` (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with
      Lightning Attention"): −sg(min(ρ, ε_high))·A·log π, the clipped ratio a detached weight
      (ε_high is the bound of ρ itself here, TRL's ``epsilon_high``, not 1 + ε_high);
    * ``"sapo"`` (Gao et al. 2025, "Soft Adaptive Policy Optimization"):
      −(4/τ)·σ(τ·(ρ − 1))·A, τ = τ_pos where A > 0, else τ_neg: a smooth gate of slope 1 at ρ = 1;
    * ``"vespo"`` (2026, "Variational Sequence-Level Soft Policy Optimization", arXiv 2602.10693):
      −φ(w)·A·log π with the detached weights of :func:`vespo_weights`.

    Then the off-policy sequence mask (DeepSeek-AI 2025, "DeepSeek-V3.2: Pushing the Frontier of
    Open Large Language Models", eq. 9) drops a sequence with A < 0 whose mean sampled KL,
    mean_t (log π_old − log π), exceeds δ; and ``top_entropy_quantile`` < 1 keeps only the
    high-entropy tokens (:func:`high_entropy_mask`, which needs ``entropies``).
    """
    log_ratio = zero_outside(logps - old_logps, mask)
    if variant.importance_sampling_level == "sequence":
        lengths = mask.sum(1, keepdim=True).clamp(min=1).to(logps.dtype)
        log_weight = (log_ratio.sum(1, keepdim=True) / lengths).expand_as(logps)
    else:
        log_weight = log_ratio
    ratio = torch.exp(log_weight)
    loss_type = variant.loss_type
    metrics: Metrics = {}
    if loss_type == "cispo":
        weight = ratio.clamp(max=clip_high).detach()
        per_token = -weight * advantages * logps
        metrics["cispo_clip_ratio"] = metric(masked_mean(
            ((ratio > clip_high) & (advantages > 0)).to(logps.dtype), mask))
    elif loss_type == "sapo":
        temperature = _by_sign(advantages > 0, variant.sapo_temperature_pos,
                               variant.sapo_temperature_neg, logps)
        per_token = -(4.0 / temperature) * torch.sigmoid(temperature * (ratio - 1.0)) * advantages
    elif loss_type == "vespo":
        phi = vespo_weights(log_ratio, mask, advantages, variant)
        per_token = -phi * advantages * logps
        metrics["vespo/phi_seq_mean"] = metric(masked_mean(phi, mask))
    else:
        clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
        per_token = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
        if variant.importance_sampling_level == "sequence":  # one ratio a sequence, as TRL counts
            has_tokens = mask.any(1, keepdim=True)
            sequence_advantage = (zero_outside(advantages, mask).sum(1, keepdim=True)
                                  / mask.sum(1, keepdim=True).clamp(min=1))
            metrics |= clip_ratio_metrics(ratio[:, :1].detach(), sequence_advantage, has_tokens,
                                          clip_low, clip_high)
        else:
            metrics |= clip_ratio_metrics(ratio.detach(), advantages, mask, clip_low, clip_high)
    metrics["ratio_mean"] = metric(masked_mean(ratio.detach(), mask))

    entropy_mask = mask
    if variant.top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("top_entropy_quantile < 1 needs the per-token entropies "
                             "(entropies=)")
        entropy_mask = high_entropy_mask(entropies, mask, variant.top_entropy_quantile)
    policy_mask = entropy_mask
    if variant.off_policy_mask_threshold is not None:
        sampled_kl = masked_mean(-log_ratio.detach(), mask, dim=1)[:, None]
        keep = (advantages >= 0) | (sampled_kl <= variant.off_policy_mask_threshold)
        policy_mask = policy_mask & keep
    return PolicyTerms(zero_outside(per_token, policy_mask), ratio, entropy_mask, metrics)


def aggregate_policy_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, *,
                          max_len: int | None = None) -> torch.Tensor:
    """``aggregate_token_loss`` plus two of TRL's loss types' aggregations: ``"bnpo"`` (the token
    mean of this batch, which is "dapo" for one batch; a trainer weighs its micro-batches per
    sequence instead of per token) and ``"luspo"`` (LUSPO, 2026, "Length-Unbiased Sequence Policy
    Optimization", arXiv 2602.05261: each sequence's token *sum*, then the mean over sequences,
    so a sequence weighs by its length)."""
    if mode == "luspo":
        summed = zero_outside(per_token, mask).sum(1)
        return summed.sum() / max(summed.shape[0], 1)
    return aggregate_token_loss(per_token, mask, mode="dapo" if mode == "bnpo" else mode,
                                max_len=max_len)


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
    importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = False,
    off_policy_mask_threshold: float | None = None,
    top_entropy_quantile: float = 1.0,
    entropies: torch.Tensor | None = None,
    **variant_options,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO loss (Shao et al. 2024, eq. 3) with the DAPO / Dr. GRPO normalisations and TRL's other
    loss types.

    Per token, with ρ = exp(logp − logp_old) and k3 = e^{logr} − 1 − logr, logr = ref − logp:

        ℓ = −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·k3

    then aggregated by ``loss_type``: "grpo" (per-sequence mean, then batch mean), "dapo" (token
    mean over the batch; Yu et al. 2025, also the source of ``clip_high``), "bnpo" (the same for
    one batch), "dr_grpo" (sum / (B·max_len); Liu et al. 2025), or any ``aggregate_token_loss``
    mode. The loss types "cispo", "sapo", "vespo" and "luspo" change the surrogate and bring their
    own aggregation; :func:`grpo_policy_terms` gives their formulas and papers, as well as those
    of ``importance_sampling_level``, ``off_policy_mask_threshold`` and ``top_entropy_quantile``.

    ``use_bias_correction_kl`` multiplies the KL term by ρ (DeepSeek-AI 2025, "DeepSeek-V3.2",
    §3.1): its value is unchanged on-policy (ρ = 1) but its gradient gains k·∇log π, which makes
    it an unbiased gradient of KL(π‖π_ref) for samples of π_old. TRL turns it on by default, as
    ``GRPOConfig`` / ``fastalign train grpo`` do; here it is off unless asked for.

    Args:
        logps: ``[B, T]`` log-probabilities under the current policy (carries the gradient).
        old_logps: ``[B, T]`` log-probabilities at generation time, or None for the single-update
            case: then ``logps.detach()`` is used, so ρ = 1 in value but its gradient is ∇logp.
        ref_logps: ``[B, T]`` reference log-probabilities; may be None only when ``beta == 0``.
        advantages: ``[B]`` (one per completion, broadcast over tokens) or ``[B, T]``; constants.
        mask: ``[B, T]`` bool or 0/1, completion tokens.
        clip: ε in (0, 1); clip_high: upper ε > 0, defaults to ``clip`` ("cispo": the bound of ρ).
        beta: KL coefficient β ≥ 0 (0.04 as in DeepSeekMath).
        loss_type: one of ``GRPO_LOSS_TYPES`` or an ``aggregate_token_loss`` mode.
        max_len: the "dr_grpo" constant; defaults to T.
        kl_estimator: estimator of ``kl_penalty`` for the β term; "k3" as in the paper.
        importance_sampling_level: "token" or "sequence" (GSPO).
        use_bias_correction_kl: multiply the KL term by ρ (see above).
        off_policy_mask_threshold: δ > 0 of the off-policy sequence mask, or None.
        top_entropy_quantile: ρ in [0, 1]; < 1 keeps the policy loss of the high-entropy tokens
            only, and needs ``entropies`` ``[B, T]``.
        variant_options: ``sapo_temperature_pos`` / ``_neg``, ``vespo_k_pos``,
            ``vespo_lambda_pos``, ``vespo_k_neg``, ``vespo_lambda_neg`` (see ``GRPOVariant``).

    Returns:
        ``(loss, metrics)``; loss 0-d float32 (float64 for float64 inputs). Metrics: ``kl``
        (masked token mean of the KL estimate, only when ``ref_logps`` is given), for the
        clipped types TRL's ``clip_ratio/low_mean``, ``clip_ratio/low_min``,
        ``clip_ratio/high_mean``, ``clip_ratio/high_max``, ``clip_ratio/region_mean``
        (``clip_ratio_metrics``), ``cispo_clip_ratio`` (cispo: A > 0 and ρ > ε_high),
        ``vespo/phi_seq_mean`` (vespo), and ``ratio_mean``.
    """
    check_per_token("logps", logps)
    if old_logps is not None:
        check_per_token("old_logps", old_logps, like=logps, like_name="logps")
    if ref_logps is not None:
        check_per_token("ref_logps", ref_logps, like=logps, like_name="logps")
    if entropies is not None:
        check_per_token("entropies", entropies, like=logps, like_name="logps")
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
    check_bool("use_bias_correction_kl", use_bias_correction_kl)
    if loss_type in GRPO_LOSS_TYPES:
        aggregation = LOSS_TYPE_AGGREGATION[loss_type]
    else:
        aggregation = check_aggregation("loss_type", loss_type)
        loss_type = None  # the clipped surrogate, with that aggregation
    variant = GRPOVariant(loss_type=loss_type, importance_sampling_level=importance_sampling_level,
                          off_policy_mask_threshold=off_policy_mask_threshold,
                          top_entropy_quantile=top_entropy_quantile, **variant_options)
    if variant.top_entropy_quantile < 1.0 and entropies is None:
        raise ValueError("top_entropy_quantile < 1 needs the per-token entropies (entropies=)")

    dtype = compute_dtype(logps, old_logps, ref_logps, advantages)
    logp = zero_outside(logps.to(dtype), mask)
    old = logp.detach() if old_logps is None else zero_outside(old_logps.detach().to(dtype), mask)
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1).expand_as(logp)
    terms = grpo_policy_terms(logp, old, zero_outside(adv, mask), mask, clip_low=low,
                              clip_high=high, variant=variant, entropies=entropies)
    per_token, metrics = terms.per_token, dict(terms.metrics)
    if ref_logps is not None:
        # Padding may hold garbage log-probs: zero both sides there so k(t) is 0, not NaN.
        kl = kl_penalty(logp, zero_outside(ref_logps.to(dtype), mask), estimator=kl_estimator)
        if beta > 0:
            per_token = per_token + beta * (kl * terms.ratio if use_bias_correction_kl else kl)
        metrics = {"kl": metric(masked_mean(kl.detach(), mask)), **metrics}
    loss = aggregate_policy_loss(per_token, mask, aggregation, max_len=max_len)
    return loss, metrics
