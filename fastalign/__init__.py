"""fastalign: fused kernels for LLM alignment losses that never materialise the logits."""

from fastalign.fused import (
    FusedCPOLoss,
    FusedDPOLoss,
    FusedKTOLoss,
    FusedORPOLoss,
    FusedPPOLoss,
    FusedSimPOLoss,
)
from fastalign.integrations import patch_model, unpatch_model
from fastalign.losses import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_token_loss,
    cpo_loss,
    dpo_loss,
    grpo_advantages,
    grpo_loss,
    kl_line_search,
    kl_penalty,
    kl_shaped_rewards,
    kto_loss,
    masked_whiten,
    orpo_loss,
    ppo_policy_loss,
    ppo_total_loss,
    ppo_value_loss,
    reward_loss,
    rloo_advantages,
    simpo_loss,
    votes_to_score,
)
from fastalign.ops import (
    IMPLEMENTATIONS,
    SequenceLogprobs,
    available_implementations,
    gae,
    gae_reference,
    linear_kl,
    linear_kl_reference,
    linear_logprobs,
    linear_logprobs_reference,
    next_token_targets,
    sequence_logprobs,
    sequence_logprobs_from_labels,
)

__version__ = "0.4.0"

__all__ = [
    # fused ops and their references
    "IMPLEMENTATIONS",
    "available_implementations",
    "gae",
    "gae_reference",
    "linear_kl",
    "linear_kl_reference",
    "linear_logprobs",
    "linear_logprobs_reference",
    # sequence reductions
    "SequenceLogprobs",
    "next_token_targets",
    "sequence_logprobs",
    "sequence_logprobs_from_labels",
    # losses (fastalign.losses has them all)
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_token_loss",
    "cpo_loss",
    "dpo_loss",
    "grpo_advantages",
    "grpo_loss",
    "kl_line_search",
    "kl_penalty",
    "kl_shaped_rewards",
    "kto_loss",
    "masked_whiten",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_total_loss",
    "ppo_value_loss",
    "reward_loss",
    "rloo_advantages",
    "simpo_loss",
    "votes_to_score",
    # fused loss modules: hidden states and head straight to the loss
    "FusedCPOLoss",
    "FusedDPOLoss",
    "FusedKTOLoss",
    "FusedORPOLoss",
    "FusedPPOLoss",
    "FusedSimPOLoss",
    # drop-in: a transformers model's labels= loss through the fused op
    "patch_model",
    "unpatch_model",
    "__version__",
]
