"""The options of online RL training: PPO, GRPO and RLOO (``fastalign train ppo`` / ``grpo``).

:class:`PPOConfig` adds the rollout (sampling), advantage, loss and reward options to
:class:`~fastalign.trainers.config.TrainingConfig` and checks them together (a group of one
completion cannot give GRPO an advantage; a precomputed reference is impossible online);
:class:`GRPOConfig` only changes the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastalign.losses.kl import KL_ESTIMATORS
from fastalign.losses.masked import AGGREGATION_NAMES
from fastalign.losses.options import PPOOptions
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

MODES = ("ppo", "grpo", "rloo")
KL_ESTIMATOR_NAMES = (*KL_ESTIMATORS, "exact")
ROLLOUT_REFERENCE_MODES = ("auto", "copy", "adapters")


@dataclass
class PPOConfig(TrainingConfig):
    """PPO / GRPO / RLOO options on top of :class:`TrainingConfig` (TRL's names where it has one).

    ``batch_size`` counts prompts; one step samples ``batch_size × num_generations`` completions.
    """

    mode: str = option("ppo", "ppo (value head, GAE, KL in the reward), grpo (group-normalised "
                       "advantages) or rloo (leave-one-out advantages); grpo and rloo put the KL "
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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_choice("mode", self.mode, MODES)
        for name in ("num_generations", "max_new_tokens", "ppo_epochs", "num_minibatches"):
            check_field_int(name, getattr(self, name), minimum=1)
        check_field_int("top_k", self.top_k, minimum=0)
        check_field_number("top_p", self.top_p, low=0.0, high=1.0, high_inclusive=True)
        if self.mode in ("grpo", "rloo") and self.num_generations < 2:
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
        # What the update's loss takes, passed to it whole; kl_coef is the start value (the
        # adaptive controller and mode ppo, whose KL is in the rewards, override it per update).
        self.loss_options = PPOOptions(
            clip=self.clip, clip_high=self.clip_high, kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator, vf_coef=self.vf_coef, vf_clip=self.vf_clip,
            ent_coef=self.ent_coef, loss_agg=self.loss_agg)


@dataclass
class GRPOConfig(PPOConfig):
    """GRPO's defaults (Shao et al. 2024; TRL's ``GRPOConfig``): groups of 4, β = 0.04 on the k3
    estimate in the loss, per-sequence token means, one update per rollout, no value head."""

    mode: str = option("grpo", "grpo (group-normalised advantages), rloo (leave-one-out "
                       "advantages) or ppo (value head, GAE, KL in the reward)")
    num_generations: int = option(4, "completions sampled per prompt (the group size, >= 2)")
    ppo_epochs: int = option(1, "passes over each rollout (TRL's num_iterations)")
    kl_coef: float = option(0.04, "KL coefficient beta (the start value with kl-target)")
    kl_estimator: str = option("k3", "KL to the reference in the loss: k1, k2, k3 or abs "
                               "(sampled estimates), or exact (the full-vocabulary KL, fused)")
    whiten_advantages: bool = option(False, "whiten the advantages over the rollout (grpo, rloo: "
                                     "per completion; ppo: per token)")
    loss_agg: str = option("grpo", "token aggregation of the loss: grpo (per-sequence mean, then "
                           "mean), token_mean (= dapo) or dr_grpo")
