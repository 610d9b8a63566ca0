"""Alignment losses on per-sequence (and per-token) log-probabilities: layer 3 of fastalign.

Each loss is plain, documented PyTorch that returns ``(loss, metrics)`` with TRL's metric names.
"""

from fastalign.losses.dpo import (
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    ld_sequence_logps,
    orpo_loss,
    simpo_loss,
    wpo_sequence_weights,
)
from fastalign.losses.grpo import (
    GRPO_LOSS_TYPES,
    REWARD_SCALINGS,
    grpo_advantages,
    grpo_loss,
    normalize_then_sum_advantages,
    rloo_advantages,
)
from fastalign.losses.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    KLController,
    ShapedRewards,
    kl_penalty,
    kl_shaped_rewards,
)
from fastalign.losses.kto import kto_loss, kto_mismatched_indices
from fastalign.losses.masked import (
    AGGREGATION_MODES,
    aggregate_token_loss,
    masked_mean,
    masked_var,
    masked_whiten,
)
from fastalign.losses.options import (
    CPOOptions,
    DPOOptions,
    KTOOptions,
    ORPOOptions,
    PPOOptions,
    SimPOOptions,
)
from fastalign.losses.ppo import ppo_policy_loss, ppo_total_loss, ppo_value_loss
from fastalign.losses.reward import reward_loss, votes_to_score
from fastalign.losses.trpo import (
    LineSearchResult,
    TRPOOptions,
    TRPOResult,
    conjugate_gradient,
    kl_line_search,
    trpo_step,
)

__all__ = [
    "AGGREGATION_MODES",
    "AdaptiveKLController",
    "GRPO_LOSS_TYPES",
    "CPOOptions",
    "DPOOptions",
    "KTOOptions",
    "ORPOOptions",
    "PPOOptions",
    "SimPOOptions",
    "TRPOOptions",
    "TRPOResult",
    "DPO_LOSS_TYPES",
    "FixedKLController",
    "KLController",
    "KL_ESTIMATORS",
    "LineSearchResult",
    "REWARD_SCALINGS",
    "ShapedRewards",
    "aggregate_token_loss",
    "conjugate_gradient",
    "cpo_loss",
    "dpo_loss",
    "grpo_advantages",
    "grpo_loss",
    "kl_line_search",
    "kl_penalty",
    "kl_shaped_rewards",
    "kto_loss",
    "kto_mismatched_indices",
    "ld_sequence_logps",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_total_loss",
    "ppo_value_loss",
    "reward_loss",
    "normalize_then_sum_advantages",
    "rloo_advantages",
    "simpo_loss",
    "trpo_step",
    "votes_to_score",
    "wpo_sequence_weights",
]
