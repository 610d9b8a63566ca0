"""The options of online RL training: PPO, GRPO, RLOO and TRPO (``fastalign train ppo`` /
``grpo``).

:class:`PPOConfig` adds the rollout (sampling), advantage, loss and reward options to
:class:`~fastalign.trainers.config.TrainingConfig` and checks them together (a group of one
completion cannot give GRPO an advantage; a precomputed reference is impossible online);
:class:`GRPOConfig` only changes the defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastalign.losses.grpo import (
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    MULTI_OBJECTIVE_AGGREGATIONS,
    GRPOVariant,
    check_clip_range,
)
from fastalign.losses.kl import KL_ESTIMATORS
from fastalign.losses.masked import AGGREGATION_NAMES
from fastalign.losses.options import PPOOptions
from fastalign.losses.trpo import FVP_DIFFERENCES, TRPOOptions
from fastalign.ops._checks import (
    check_field_choice,
    check_field_int,
    check_field_number,
)
from fastalign.trainers.config import (
    TrainingConfig,
    option,
)
from fastalign.trainers.reward_functions import (
    BUILTIN_REWARDS,
    RewardFunctions,
)

__all__ = ["KL_ESTIMATOR_NAMES", "MODES", "ROLLOUT_REFERENCE_MODES", "GRPOConfig", "PPOConfig"]

MODES = ("ppo", "grpo", "rloo", "trpo")
# The options of the clipped updates, which mode trpo (one TRPO step per rollout) does not use.
_CLIPPED_UPDATE_OPTIONS = ("ppo_epochs", "num_minibatches", "clip", "clip_high", "ent_coef",
                           "loss_type", "importance_sampling_level", "off_policy_mask_threshold",
                           "top_entropy_quantile", "use_adaptive_entropy")
# TRPOOptions' fields that PPOConfig exposes under the same names.
_TRPO_OPTIONS = ("max_kl", "cg_iters", "cg_damping", "max_backtracks", "backtrack_ratio",
                 "fvp_difference")
KL_ESTIMATOR_NAMES = (*KL_ESTIMATORS, "exact")
ROLLOUT_REFERENCE_MODES = ("auto", "copy", "adapters")


@dataclass
class PPOConfig(TrainingConfig):
    """PPO / GRPO / RLOO options on top of :class:`TrainingConfig` (TRL's names where it has one).

    ``batch_size`` counts prompts; one step samples ``batch_size × num_generations`` completions.
    """

    mode: str = option("ppo", "ppo (value head, GAE, KL in the reward), grpo (group-normalised "
                       "advantages), rloo (leave-one-out advantages) or trpo (grpo's advantages, "
                       "one TRPO step per rollout within max-kl); grpo, rloo and trpo put the KL "
                       "in the loss")
    num_generations: int = option(1, "completions sampled per prompt (the group size of grpo and "
                                  "rloo, >= 2 there)")
    max_new_tokens: int = option(16, "longest completion in tokens (also capped by max-length)")
    top_k: int = option(0, "sample from the k most likely tokens only (0: the whole vocabulary)")
    top_p: float = option(1.0, "nucleus sampling: sample from the most likely tokens whose "
                          "probabilities reach top-p, applied after temperature and top-k, in "
                          "(0, 1] (1: off)")
    ppo_epochs: int = option(4, "passes over each rollout")
    num_minibatches: int = option(1, "optimizer steps per pass over a rollout")
    clip: float = option(0.2, "PPO clip range epsilon of the probability ratio, in (0, 1)")
    clip_high: float | None = option(None, "upper clip range (DAPO's clip-higher; 'none': "
                                     "the same as clip)")
    kl_coef: float = option(0.05, "KL coefficient beta (the start value with kl-target)")
    kl_estimator: str = option("k1", "KL to the reference: k1, k2, k3 or abs (sampled "
                               "estimates), or exact (the full-vocabulary KL, fused)")
    kl_target: float | None = option(None, "target KL per completion for the adaptive KL "
                                     "controller ('none': a fixed kl-coef)")
    kl_horizon: float = option(10000.0, "horizon of the adaptive KL controller, in completions")
    vf_coef: float = option(0.1, "value-loss coefficient (ppo)")
    vf_clip: float | None = option(0.2, "value clip range ('none': no clipping) (ppo)")
    gamma: float = option(1.0, "discount factor of GAE (ppo)")
    lam: float = option(0.95, "lambda of GAE (ppo)")
    whiten_advantages: bool = option(True, "whiten the advantages over the rollout (ppo: per "
                                     "token; grpo, rloo: per completion)")
    loss_agg: str = option("token_mean", "token aggregation of the loss: token_mean (= dapo), "
                           "grpo (per-sequence mean, then mean) or dr_grpo")
    ent_coef: float = option(0.0, "entropy bonus coefficient")
    reward_fn: str | None = option("polite", "reward functions, comma-separated: builtins (" +
        ", ".join(BUILTIN_REWARDS) + "), module:function (a module importable or in the working "
        "directory) or path/to/file.py:function, called TRL's way: fn(prompts=, completions=, "
        "completion_ids=, every other data column=, trainer_state=); see --reward-weights "
        "(replaced by --reward-model)")
    reward_weights: tuple[float, ...] | None = option(None, "weights of the reward functions, as "
                                                      "W1,W2,...: the reward is their weighted "
                                                      "sum ('none': 1 each)")
    missing_eos_penalty: float | None = option(None, "subtract this from the score of a "
                                               "completion that ends without eos ('none': no "
                                               "penalty)")
    reference: str = option("auto", "the reference model: copy (a frozen copy), adapters (a PEFT "
                            "policy with its adapters disabled) or auto (adapters for PEFT, else "
                            "copy)")
    # TRL's GRPO loss types and options (GRPOVariant in fastalign.losses.grpo).
    loss_type: str | None = option(None, "TRL's GRPO loss type, which sets the surrogate and the "
                                   "token aggregation: " + ", ".join(GRPO_LOSS_TYPES) + " ('none': "
                                   "the clipped surrogate aggregated by loss-agg)")
    importance_sampling_level: str = option("token", "importance ratio per token, or per sequence "
                                            "(GSPO: exp of the mean token log-ratio)")
    use_bias_correction_kl: bool = option(False, "multiply the KL term of the loss by the "
                                          "importance ratio (DeepSeek-V3.2), which changes its "
                                          "gradient even on-policy (grpo, rloo; a sampled "
                                          "kl-estimator)")
    off_policy_mask_threshold: float | None = option(None, "drop the policy loss of a "
                                                     "completion with a negative advantage whose "
                                                     "mean sampled KL to the rollout policy "
                                                     "exceeds this ('none': off)")
    top_entropy_quantile: float = option(1.0, "keep the policy loss of the top quantile of "
                                         "tokens by entropy only, in [0, 1] (1: every token)")
    sapo_temperature_pos: float = option(1.0, "sapo's gate temperature for positive advantages")
    sapo_temperature_neg: float = option(1.05, "sapo's gate temperature for other advantages")
    vespo_k_pos: float = option(2.0, "vespo's power k for non-negative advantages")
    vespo_lambda_pos: float = option(3.0, "vespo's decay lambda for non-negative advantages")
    vespo_k_neg: float = option(3.0, "vespo's power k for negative advantages")
    vespo_lambda_neg: float = option(2.0, "vespo's decay lambda for negative advantages")
    multi_objective_aggregation: str = option(
        "sum_then_normalize", "several reward functions (grpo): sum_then_normalize (the weighted "
        "sum, then the group advantage) or normalize_then_sum (GDPO: each function normalised "
        "per group, then the weighted sum normalised over the batch)")
    normalize_advantages: bool = option(False, "normalise the advantages over the batch to mean 0, "
                                        "std 1 (rloo)")
    reward_clip_range: tuple[float, float] | None = option(None, "clamp the rewards to LOW,HIGH "
                                                           "before the advantages ('none': no "
                                                           "clamp) (rloo)")
    use_adaptive_entropy: bool = option(False, "adaptive entropy control (Skywork-OR1): ent-coef "
                                        "is the start value, applied only while the entropy is "
                                        "at most entropy-target, and moved each step by "
                                        "entropy-coef-delta (up at or below the target, down "
                                        "above it)")
    entropy_coef_min: float = option(0.0, "lower bound of the adaptive entropy coefficient")
    entropy_coef_max: float = option(1.0, "upper bound of the adaptive entropy coefficient")
    entropy_coef_delta: float = option(0.005, "step of the adaptive entropy coefficient")
    entropy_target: float = option(0.2, "target mean token entropy (nats) of adaptive entropy "
                                   "control, over the tokens the bonus acts on")

    # TRPO (mode trpo; TRPOOptions in fastalign.losses.trpo).
    max_kl: float = option(0.01, "trpo: the trust region delta, the bound on the mean exact "
                           "KL(old policy || new policy) per completion token")
    cg_iters: int = option(10, "trpo: conjugate-gradient iterations, each a Fisher-vector product "
                           "(two gradient passes over the rollout with central differences)")
    cg_damping: float = option(0.1, "trpo: damping lambda added to the Fisher matrix")
    max_backtracks: int = option(10, "trpo: line-search shrinkings of the step before it is "
                                 "rejected")
    backtrack_ratio: float = option(0.5, "trpo: the line search's shrink factor, in (0, 1)")
    fvp_difference: str = option("central", "trpo: finite differences of the KL gradient for the "
                                 "Fisher-vector products: " + " or ".join(FVP_DIFFERENCES) +
                                 " (one gradient pass each, less exact)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_choice("mode", self.mode, MODES)
        for name in ("num_generations", "max_new_tokens", "ppo_epochs", "num_minibatches"):
            check_field_int(name, getattr(self, name), minimum=1)
        check_field_int("top_k", self.top_k, minimum=0)
        check_field_number("top_p", self.top_p, low=0.0, high=1.0, high_inclusive=True)
        if self.mode in ("grpo", "rloo", "trpo") and self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 for mode={self.mode!r} (the advantage "
                             f"compares the completions of a prompt), got {self.num_generations}")
        rollout = self.batch_size * self.num_generations
        if rollout < self.num_minibatches * self.grad_accum_steps:
            raise ValueError(
                f"num_minibatches × grad_accum_steps ({self.num_minibatches} × "
                f"{self.grad_accum_steps}) must not exceed the completions of a rollout, "
                f"batch_size × num_generations = {rollout}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than "
                             f"max_length ({self.max_length}) to leave room for the completion")
        check_field_number("clip", self.clip, low=0.0, high=1.0)
        if self.clip_high is not None:
            check_field_number("clip_high", self.clip_high, low=0.0)
        check_field_number("kl_coef", self.kl_coef, low=0.0, inclusive=True)
        check_field_choice("kl_estimator", self.kl_estimator, KL_ESTIMATOR_NAMES)
        if self.kl_target is not None:
            check_field_number("kl_target", self.kl_target, low=0.0)
            if self.kl_coef == 0:
                raise ValueError("kl_coef must be > 0 with kl_target (the adaptive controller "
                                 "scales it)")
        check_field_number("kl_horizon", self.kl_horizon, low=0.0)
        check_field_number("vf_coef", self.vf_coef, low=0.0, inclusive=True)
        if self.vf_clip is not None:
            check_field_number("vf_clip", self.vf_clip, low=0.0)
        for name in ("gamma", "lam"):
            check_field_number(name, getattr(self, name), low=0.0, high=1.0, inclusive=True,
                               high_inclusive=True)
        if not isinstance(self.whiten_advantages, bool):
            raise ValueError(f"whiten_advantages must be True or False, got "
                             f"{self.whiten_advantages!r}")
        check_field_choice("loss_agg", self.loss_agg, AGGREGATION_NAMES)
        check_field_number("ent_coef", self.ent_coef, low=0.0, inclusive=True)
        if self.missing_eos_penalty is not None:
            check_field_number("missing_eos_penalty", self.missing_eos_penalty, low=0.0,
                               inclusive=True)
        if self.reference == "precomputed":
            raise ValueError("reference='precomputed' is impossible for online training: the "
                             "completions are sampled during training, so their reference "
                             "log-probs cannot be computed beforehand; use 'copy' or 'adapters'")
        check_field_choice("reference", self.reference, ROLLOUT_REFERENCE_MODES)
        if self.reward_fn is not None:  # an unknown name fails now, not after loading
            RewardFunctions(self.reward_fn, self.reward_weights)
        elif self.reward_weights is not None:
            raise ValueError("reward_weights weighs the functions of reward_fn, which is None "
                             "(PPOTrainer's reward_fn= takes its own reward_weights=)")
        self._check_grpo_options()
        self._check_trpo_options()
        # What the update's loss takes, passed to it whole; kl_coef is the start value (the
        # adaptive controller and mode ppo, whose KL is in the rewards, override it per update).
        variant = {field.name: getattr(self, field.name)
                   for field in dataclasses.fields(GRPOVariant)}
        self.loss_options = PPOOptions(
            clip=self.clip, clip_high=self.clip_high, kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator, vf_coef=self.vf_coef, vf_clip=self.vf_clip,
            ent_coef=self.ent_coef, loss_agg=self.loss_agg,
            use_bias_correction_kl=self.use_bias_correction_kl, **variant)

    def _given(self, names) -> list[str]:
        """``name=value`` for each option of ``names`` set away from its default."""
        return [f"{name}={getattr(self, name)!r}" for name in names
                if getattr(self, name) != getattr(type(self), name)]

    def _check_trpo_options(self) -> None:
        """TRPO's options, and the clipped-update options mode trpo would ignore, refused."""
        self.trpo_options = TRPOOptions(**{name: getattr(self, name) for name in _TRPO_OPTIONS})
        if self.mode == "trpo":
            ignored = self._given(_CLIPPED_UPDATE_OPTIONS)
            if ignored:
                raise ValueError(f"mode='trpo' takes one TRPO step per rollout, without the "
                                 f"clipped updates that {', '.join(ignored)} configure: drop "
                                 f"them (or use mode grpo)")
        elif self._given(_TRPO_OPTIONS):
            raise ValueError(f"{', '.join(self._given(_TRPO_OPTIONS))} apply to mode='trpo' "
                             f"only, not mode={self.mode!r}")

    def _check_grpo_options(self) -> None:
        """TRL's GRPO / RLOO options, each named in its message."""
        if self.loss_type is not None:
            check_field_choice("loss_type", self.loss_type, GRPO_LOSS_TYPES)
            if self.loss_agg != type(self).loss_agg:
                raise ValueError(f"loss_type={self.loss_type!r} sets the token aggregation "
                                 f"itself: drop loss_agg={self.loss_agg!r} (or loss_type)")
        check_field_choice("importance_sampling_level", self.importance_sampling_level,
                           IMPORTANCE_SAMPLING_LEVELS)
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(f"use_bias_correction_kl must be True or False, got "
                             f"{self.use_bias_correction_kl!r}")
        if self.off_policy_mask_threshold is not None:
            check_field_number("off_policy_mask_threshold", self.off_policy_mask_threshold,
                               low=0.0)
        check_field_number("top_entropy_quantile", self.top_entropy_quantile, low=0.0, high=1.0,
                           inclusive=True, high_inclusive=True)
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos",
                     "vespo_lambda_neg"):
            check_field_number(name, getattr(self, name), low=0.0)
        for name in ("vespo_k_pos", "vespo_k_neg"):
            check_field_number(name, getattr(self, name), low=0.0, inclusive=True)
        check_field_choice("multi_objective_aggregation", self.multi_objective_aggregation,
                           MULTI_OBJECTIVE_AGGREGATIONS)
        if self.multi_objective_aggregation == "normalize_then_sum":
            if self.mode != "grpo":
                raise ValueError(f"multi_objective_aggregation='normalize_then_sum' is GRPO's "
                                 f"(GDPO); mode={self.mode!r} takes sum_then_normalize")
            if self.missing_eos_penalty is not None:
                raise ValueError("missing_eos_penalty subtracts from the summed reward, which "
                                 "multi_objective_aggregation='normalize_then_sum' does not use: "
                                 "drop one of them")
        if not isinstance(self.normalize_advantages, bool):
            raise ValueError(f"normalize_advantages must be True or False, got "
                             f"{self.normalize_advantages!r}")
        rloo_only = [f"{name}={getattr(self, name)!r}"
                     for name in ("normalize_advantages", "reward_clip_range")
                     if getattr(self, name) not in (False, None)]
        if rloo_only and self.mode != "rloo":
            raise ValueError(f"{' and '.join(rloo_only)} apply to mode='rloo' only (TRL's RLOO "
                             f"options), not mode={self.mode!r}")
        if self.normalize_advantages and self.whiten_advantages:
            raise ValueError("normalize_advantages and whiten_advantages both normalise the "
                             "advantages over the batch: set one of them")
        if not isinstance(self.use_adaptive_entropy, bool):
            raise ValueError(f"use_adaptive_entropy must be True or False, got "
                             f"{self.use_adaptive_entropy!r}")
        for name in ("entropy_coef_min", "entropy_coef_max", "entropy_target"):
            check_field_number(name, getattr(self, name), low=0.0, inclusive=True)
        check_field_number("entropy_coef_delta", self.entropy_coef_delta, low=0.0)
        if self.entropy_coef_min > self.entropy_coef_max:
            raise ValueError(f"entropy_coef_min ({self.entropy_coef_min}) must not exceed "
                             f"entropy_coef_max ({self.entropy_coef_max})")
        if self.reward_clip_range is not None:
            try:
                check_clip_range("reward_clip_range", self.reward_clip_range)
            except TypeError as error:
                raise ValueError(str(error)) from None


@dataclass
class GRPOConfig(PPOConfig):
    """GRPO's defaults (Shao et al. 2024; TRL's ``GRPOConfig``): groups of 4, β = 0.04 on the k3
    estimate in the loss, per-sequence token means, one update per rollout, no value head, and
    TRL's bias-corrected KL."""

    mode: str = option("grpo", "grpo (group-normalised advantages), rloo (leave-one-out "
                       "advantages), trpo (grpo's advantages, one TRPO step per rollout within "
                       "max-kl) or ppo (value head, GAE, KL in the reward)")
    num_generations: int = option(4, "completions sampled per prompt (the group size, >= 2)")
    ppo_epochs: int = option(1, "passes over each rollout (TRL's num_iterations)")
    kl_coef: float = option(0.04, "KL coefficient beta (the start value with kl-target)")
    kl_estimator: str = option("k3", "KL to the reference in the loss: k1, k2, k3 or abs "
                               "(sampled estimates), or exact (the full-vocabulary KL, fused)")
    whiten_advantages: bool = option(False, "whiten the advantages over the rollout (grpo, rloo: "
                                     "per completion; ppo: per token)")
    loss_agg: str = option("grpo", "token aggregation of the loss: grpo (per-sequence mean, then "
                           "mean), token_mean (= dapo) or dr_grpo")
    use_bias_correction_kl: bool = option(True, "multiply the KL term of the loss by the "
                                          "importance ratio (DeepSeek-V3.2; TRL's default), "
                                          "which changes its gradient even on-policy (a sampled "
                                          "kl-estimator)")
