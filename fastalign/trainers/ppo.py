"""Online RL on a causal LM: PPO, GRPO, RLOO and TRPO, with the fused head (ALGORITHMS.md §8-9).

One training step is one rollout and several updates, written out in ``training_step`` (the
options are in ``ppo_config.py``, the rollout record and its token bookkeeping in ``rollout.py``):

1. **Rollout.** ``batch_size`` prompts (left-padded, ``PromptCollator``), each repeated
   ``num_generations`` times (G consecutive rows per prompt), are completed by
   ``model.generate`` (sampling at ``temperature``, then optionally ``top_k`` and ``top_p``, as
   transformers applies them; at most ``max_new_tokens``). A completion ends at its first eos;
   the rows are re-laid as prompt + completion, right-padded, with ``labels`` = the completion
   ids and -100 on prompt and padding.
2. **Evaluation.** The old log-probs (and entropies) of the sampled tokens come from the fused
   head on the policy's final hidden states (``fastalign.hf``; never ``generate``'s scores, never
   [tokens × vocab] logits), the reference log-probs from ``ReferencePolicy`` (a frozen copy, or
   the PEFT policy with its adapters disabled), the scores from the weighted reward functions
   (called as TRL calls them, with the data's other columns; ``reward_functions.py``) or from a
   reward model on the token ids.
3. **Advantages.** ``ppo``: per-token rewards = −β·KL on every completion token plus the score on
   the last one (``kl_shaped_rewards``; with ``kl_estimator="exact"`` the KL is the exact one of
   ``linear_kl``), values from a value head ``nn.Linear(H, 1)`` on the policy's final hidden
   states (shared backbone), GAE(γ, λ) and whitening. ``grpo`` / ``rloo``: one advantage per
   completion from its group of G (``grpo_advantages``, ``rloo_advantages``; ``trpo`` takes
   grpo's, so that no value model is needed); the KL to the reference enters the loss instead,
   β·k per token (``exact``: the full-vocabulary KL streamed from the reference's hidden states
   by ``FusedPPOLoss``).
4. **Updates.** ``ppo_epochs`` passes over the rollout, each in ``num_minibatches`` shuffled
   minibatches, each one optimizer step (``optimizer_step``) of ``FusedPPOLoss``: the clipped
   surrogate (+ β·KL for grpo / rloo, + c_v·value loss for ppo, − c_ent·entropy), aggregated over
   tokens by ``loss_agg``. A minibatch may be split into ``grad_accum_steps`` micro-batches.
   ``trpo`` instead takes one ``trpo_step`` on the whole rollout (``trpo_update``): the
   unclipped surrogate ρ·A − β·k aggregated by ``loss_agg``, its natural-gradient direction by
   conjugate gradient on Fisher-vector products of the exact KL(π_old ‖ π_θ) (``linear_kl``
   against the policy's own hidden states and head before the step), scaled to ``max_kl`` and
   line-searched on the measured KL; no optimizer step (the learning rate is unused).

With an adaptive KL controller (``kl_target``) β follows the measured KL after each step; its
state is checkpointed. Sampling draws from the global torch generator, which checkpoints save and
restore, and minibatches are shuffled by a generator seeded from (seed, step, epoch): a resumed
run repeats the uninterrupted one exactly.

The log-probs score the full softmax at ``temperature`` (as TRL does), even when ``top_k`` or
``top_p`` truncates what is sampled. Dropout makes the rollout log-probs random: use a model
without it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from fastalign import hf
from fastalign.data import PromptCollator, encode_prompts
from fastalign.fused import FusedPPOLoss
from fastalign.losses.grpo import (
    grpo_advantages,
    high_entropy_mask,
    normalize_then_sum_advantages,
    rloo_advantages,
)
from fastalign.losses.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    kl_shaped_rewards,
)
from fastalign.losses.masked import aggregate_token_loss, masked_mean, masked_whiten
from fastalign.losses.trpo import trpo_step
from fastalign.ops.gae import gae
from fastalign.ops.linear_kl import linear_kl
from fastalign.ops.sequence import sequence_logprobs_from_labels
from fastalign.trainers import distributed
from fastalign.trainers.config import pad_token_id
from fastalign.trainers.loop import Trainer
from fastalign.trainers.metrics import Metrics, as_floats, mean_metrics
from fastalign.trainers.ppo_config import GRPOConfig, PPOConfig
from fastalign.trainers.reference import ReferencePolicy
from fastalign.trainers.reward_functions import RewardFn, RewardFunctions, TrainingProgress
from fastalign.trainers.rollout import (
    Rollout,
    completion_length,
    completion_metrics,
    decode_texts,
    pad_after_first_eos,
    prompts_with_completions,
)

__all__ = ["GRPOConfig", "PPOConfig", "PPOTrainer", "Rollout", "encode_prompt_examples"]

# Aggregations that average over every token of the batch (the others average per sequence).
_TOKEN_AGGREGATIONS = ("dapo", "token_mean")
# Keys of an example that are not data columns handed to the reward functions (TRL's list, and
# the token ids the encoding adds).
_NOT_COLUMNS = ("prompt", "prompt_ids", "completion", "completion_ids")
# The rollout's entropy that adaptive entropy control follows (merged over ranks, then removed
# from the logged metrics).
_CONTROLLED_ENTROPY = "_controlled_entropy"


class AdaptiveEntropyCoefficient:
    """Adaptive entropy control (He et al. 2025, "Skywork Open Reasoner 1 Technical Report"), as
    TRL 1.16 runs it: the bonus applies its coefficient only while the measured entropy is at or
    below ``target`` (never before the first measurement), and after each measurement the
    coefficient moves by ``delta`` towards more bonus (entropy at or below target) or less,
    within [low, high].

    Measured here once per training step, on the rollout's entropies (the policy before that
    step's updates; TRL measures at each optimizer step, the same thing with one update per
    rollout).
    """

    def __init__(self, coef: float, *, target: float, delta: float, low: float,
                 high: float) -> None:
        self.coef, self.target, self.delta, self.low, self.high = coef, target, delta, low, high
        self.last_entropy = math.inf

    @property
    def applied(self) -> float:
        """The coefficient the next updates use."""
        return self.coef if self.last_entropy <= self.target else 0.0

    def update(self, entropy: float) -> None:
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.high)
        else:
            self.coef = max(self.coef - self.delta, self.low)
        self.last_entropy = entropy

    def state_dict(self) -> dict:
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.last_entropy = state["coef"], state["last_entropy"]


def encode_prompt_examples(records, tokenizer, *, max_length: int | None = None,
                           max_prompt_length: int | None = None) -> list[dict]:
    """``data.encode_prompts`` with the signature ``run._load_examples`` calls (``max_length`` is
    the rollout's limit, applied when generating). Each example keeps its record's ``prompt``
    and other columns (a reference ``answer``, say): the reward functions receive them."""
    del max_length
    encoded = encode_prompts(records, tokenizer, max_prompt_length=max_prompt_length)
    return [{**record, **example} for record, example in zip(records, encoded)]


class PPOTrainer(Trainer):
    """PPO (Schulman et al. 2017; Ziegler et al. 2019), GRPO (Shao et al. 2024) and RLOO
    (Ahmadian et al. 2024) on a Hugging Face causal LM; see the module docstring.

    Args:
        model: the policy, a causal LM (or a PEFT model wrapping one).
        tokenizer: its tokenizer (needs an eos token; pads with its pad token, else eos).
        train_examples: ``{"prompt_ids"}`` examples (``encode_prompt_examples``).
        config: a :class:`PPOConfig` (or :class:`GRPOConfig`).
        ref_model: the frozen reference (default: a copy of the policy, or its adapters disabled).
        reward_model: a sequence classifier with one output (``num_labels=1``, the policy's
            tokenizer, ``config.pad_token_id`` set) scoring prompt + completion ids; replaces
            ``config.reward_fn``.
        reward_fn: reward functions overriding ``config.reward_fn`` (and its weights): a
            callable, a name, or a list of them (see ``reward_functions.py`` for how they are
            called).
        reward_weights: one weight per function of ``reward_fn`` (default: 1 each).
        eval_examples: prompts whose greedy completions are scored every ``eval_steps`` and at
            the end (``eval/reward``, ``eval/completions/mean_length``).

    Example::

        trainer = PPOTrainer(model, tokenizer, encode_prompt_examples(records, tokenizer),
                             GRPOConfig(output_dir="out", max_steps=50), reward_fn=my_score)
        trainer.train()
    """

    name = "ppo"
    drop_last = True  # every rollout has batch_size × num_generations completions

    def __init__(self, model: nn.Module, tokenizer, train_examples: Sequence[dict],
                 config: PPOConfig, *, ref_model: nn.Module | None = None,
                 reward_model: nn.Module | None = None,
                 reward_fn: RewardFn | str | Sequence[RewardFn | str] | None = None,
                 reward_weights: Sequence[float] | None = None,
                 eval_examples: Sequence[dict] | None = None) -> None:
        if not isinstance(config, PPOConfig):
            raise TypeError(f"PPOTrainer takes a PPOConfig, got {type(config).__name__}")
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an eos token: completions end with it")
        super().__init__(model, tokenizer, train_examples, config,
                         collator=PromptCollator(pad_token_id=pad_token_id(tokenizer)),
                         eval_examples=eval_examples)
        self.name = config.mode
        self.pad_id, self.eos_id = pad_token_id(tokenizer), tokenizer.eos_token_id
        self.options = self.head.options(config.temperature)

        self.reference = ReferencePolicy(self.model, ref_model, config.reference,
                                         device=self.device)
        ref_head = hf.lm_head(self.model if self.reference.model is None else
                              self.reference.model)
        if ref_head.weight.shape[0] != self.head.weight.shape[0]:
            raise ValueError(f"the reference model's vocabulary ({ref_head.weight.shape[0]}) "
                             f"differs from the policy's ({self.head.weight.shape[0]})")
        if config.kl_estimator == "exact" and ref_head.softcap != self.head.softcap:
            raise ValueError("kl_estimator='exact' needs the same final-logit softcap on the "
                             f"policy and the reference, got {self.head.softcap} and "
                             f"{ref_head.softcap}")

        if reward_model is not None and reward_fn is not None:
            raise ValueError("pass either reward_model or reward_fn, not both")
        if reward_weights is not None and reward_fn is None:
            raise ValueError("reward_weights= weighs the functions of reward_fn=, which is not "
                             "given (config.reward_weights weighs config.reward_fn)")
        self.reward_model = reward_model
        self.rewards: RewardFunctions | None = None
        if reward_model is not None:
            # The reward functions left at their default give way to the model; chosen ones
            # would be ignored, so they are refused.
            chosen = [f"{name}={getattr(config, name)!r}" for name in ("reward_fn",
                                                                         "reward_weights")
                      if getattr(config, name) != getattr(type(config), name)]
            if chosen:
                raise ValueError(f"a reward model replaces the reward functions, but "
                                 f"{' and '.join(chosen)} were given too: drop --reward-fn and "
                                 f"--reward-weights, or --reward-model")
            if getattr(reward_model.config, "pad_token_id", None) is None:
                raise ValueError("reward_model.config.pad_token_id is not set: the classifier "
                                 "finds each sequence's last token by it (set it to the "
                                 "tokenizer's pad token id)")
            self.reward_model = reward_model.to(self.device).eval().requires_grad_(False)
        elif reward_fn is not None:
            self.rewards = RewardFunctions(reward_fn, reward_weights)
        elif config.reward_fn is not None:
            self.rewards = RewardFunctions(config.reward_fn, config.reward_weights)
        else:
            raise ValueError("no reward: pass reward_model or reward_fn, or set "
                             "config.reward_fn to a builtin or 'module:function'")

        self.value_head: nn.Linear | None = None
        if config.mode == "trpo" and self.dist.enabled:
            raise ValueError("mode='trpo' runs in one process for now: its Fisher-vector products "
                             "and line search are not reduced across ranks")
        if config.mode == "ppo":
            # nn.Linear's own init, drawn from a generator seeded by config.seed (not the global
            # one): two runs with one seed start from one value head.
            hidden_size = self.head.weight.shape[1]
            self.value_head = nn.Linear(hidden_size, 1).to(self.device)
            generator = torch.Generator().manual_seed(config.seed)
            bound = 1.0 / math.sqrt(hidden_size)
            with torch.no_grad():
                for parameter in self.value_head.parameters():
                    parameter.copy_(torch.empty(parameter.shape).uniform_(
                        -bound, bound, generator=generator))
        if config.kl_target is None:
            self.kl_controller = FixedKLController(config.kl_coef)
        else:
            self.kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target,
                                                      config.kl_horizon)
        self.entropy_controller = None if not config.use_adaptive_entropy else \
            AdaptiveEntropyCoefficient(config.ent_coef, target=config.entropy_target,
                                       delta=config.entropy_coef_delta,
                                       low=config.entropy_coef_min, high=config.entropy_coef_max)

    @property
    def head(self) -> hf.LMHead:
        """The policy's LM head, read when used: under FSDP its weight is whole only inside the
        engine's forward (a head kept from before would hold the sharded parameter)."""
        return hf.lm_head(self.model)

    @property
    def ref_head(self) -> hf.LMHead:
        return hf.lm_head(self.model if self.reference.model is None else self.reference.model)

    # -- what the base loop needs ---------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = super().trainable_parameters()
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        return params

    def modules_to_save(self) -> dict[str, nn.Module]:
        return {} if self.value_head is None else {"value_head": self.value_head}

    def extra_state(self) -> dict:
        state = {"kl_controller": self.kl_controller.state_dict()}
        if self.entropy_controller is not None:
            state["entropy_controller"] = self.entropy_controller.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.kl_controller.load_state_dict(state["kl_controller"])
        if self.entropy_controller is not None:
            self.entropy_controller.load_state_dict(state["entropy_controller"])

    def stream_batches_per_step(self) -> int:
        return 1  # one batch of prompts a step; grad_accum_steps splits its minibatches instead

    # -- one step: rollout, then updates --------------------------------------------------------

    def training_step(self) -> Metrics:
        """One rollout and ``ppo_epochs × num_minibatches`` optimizer updates on it."""
        config = self.config
        self.model.train()
        kl_coef = self.kl_controller.value
        ent_coef = config.ent_coef if self.entropy_controller is None else \
            self.entropy_controller.applied
        # Each rank samples and scores the completions of its own prompts.
        rollout = self.engine(self.rollout, self.local_indices(self.stream.next()),
                              kl_coef=kl_coef)
        updates = [] if config.mode != "trpo" else \
            [(self.trpo_update(rollout, kl_coef=kl_coef), 1)]
        for epoch in range(config.ppo_epochs if config.mode != "trpo" else 0):
            generator = torch.Generator().manual_seed(
                (config.seed * 1_000_003 + self.step) * 1_000_003 + epoch)
            order = torch.randperm(len(rollout), generator=generator).to(self.device)
            for rows in order.tensor_split(config.num_minibatches):
                updates.append((self.update(rollout, rows, kl_coef=kl_coef,
                                            ent_coef=ent_coef), 1))
        # Every rank's rollout counts (the KL controller must move alike on every rank).
        rollout_metrics = self.merge_metrics(self.gathered([(rollout.metrics, len(rollout))]))
        if self.dist.enabled:  # the spread of every rank's scores, not a mean of spreads
            scores = torch.cat(self.gathered([rollout.raw_scores.float().cpu()]))
            rollout_metrics["reward_std"] = _nan_std(scores)
            rollout_metrics |= completion_metrics(  # every rank's extremes, not their means
                torch.cat(self.gathered([rollout.mask.sum(1).cpu()])),
                torch.cat(self.gathered([rollout.has_eos.cpu()])))
            if rollout.reward_scores is not None:
                rollout_metrics |= self.rewards.metrics(
                    torch.cat(self.gathered([rollout.reward_scores])))
        self.kl_controller.update(rollout_metrics["kl/sequence"],
                                  len(rollout) * self.dist.world_size)
        controlled_entropy = rollout_metrics.pop(_CONTROLLED_ENTROPY, None)
        if self.entropy_controller is not None:
            self.entropy_controller.update(controlled_entropy)
            rollout_metrics["entropy_coef"] = self.entropy_controller.coef
        return (rollout_metrics | mean_metrics(updates) | {"kl_coef": kl_coef}
                | self.tokens_seen(int(rollout.attention_mask.sum())))

    def update(self, rollout: Rollout, rows: torch.Tensor, *, kl_coef: float,
               ent_coef: float | None = None) -> Metrics:
        """One optimizer step on the rollout's ``rows``, in ``grad_accum_steps`` micro-batches.

        Each micro-batch's loss is weighted by its share of the minibatch's tokens
        (``loss_agg`` token_mean / dapo) or sequences (grpo, dr_grpo), which makes the summed
        gradient that of the whole minibatch (with ``ent_coef`` and a per-sequence aggregation
        the entropy bonus, a token mean, is weighted per sequence too).
        """
        chunks = rows.tensor_split(self.config.grad_accum_steps)
        sizes = self._aggregation_sizes(rollout, chunks)
        total = max(sum(sizes), 1.0)
        parts = []
        for index, (chunk, size) in enumerate(zip(chunks, sizes)):
            sync = contextlib.nullcontext() if index == len(chunks) - 1 else \
                distributed.no_gradient_sync(self.engine, self.dist)
            with sync:
                loss, metrics = self.engine(self.minibatch_loss, rollout, chunk, kl_coef=kl_coef,
                                            ent_coef=ent_coef)
                (loss * (size / total) if len(chunks) > 1 else loss).backward()
            parts.append((as_floats(metrics), len(chunk)))
        return self.merge_metrics(self.gathered(parts)) | self.optimizer_step()

    def _aggregation_sizes(self, rollout: Rollout, chunks: Sequence[torch.Tensor]) -> list[float]:
        """What each micro-batch weighs in the loss's aggregation: its tokens (token_mean /
        dapo) or its sequences (grpo, dr_grpo)."""
        if self.config.loss_options.aggregation in _TOKEN_AGGREGATIONS:
            return [float(rollout.mask[chunk].sum()) for chunk in chunks]
        return [float(len(chunk)) for chunk in chunks]

    def trpo_update(self, rollout: Rollout, *, kl_coef: float) -> Metrics:
        """Mode trpo: one ``trpo_step`` of the policy on the whole rollout, in
        ``grad_accum_steps`` micro-batches (each gradient pass runs them one after another).

        π_old is the policy now, before the step: its final hidden states and head are kept
        (detached copies), and the constraint is the exact mean KL(π_old ‖ π_θ) over the
        completion tokens, from ``linear_kl`` against them. The surrogate is the unclipped
        ρ·A − β·k of ``trpo_surrogate``, each micro-batch weighted by its share of the
        aggregation as in ``update``.
        """
        chunks = [chunk for chunk in torch.arange(len(rollout), device=self.device)
                  .tensor_split(self.config.grad_accum_steps) if len(chunk)]
        sizes = self._aggregation_sizes(rollout, chunks)
        shares = [size / max(sum(sizes), 1.0) for size in sizes]
        tokens = max(float(rollout.mask.sum()), 1.0)
        with torch.no_grad():
            old_heads = [tuple(None if t is None else t.detach().clone()
                               for t in self.engine(self._policy_head_inputs, rollout, chunk))
                         for chunk in chunks]

        def surrogate():
            for chunk, share in zip(chunks, shares):
                yield share * self.engine(self.trpo_surrogate, rollout, chunk, kl_coef=kl_coef)

        def mean_kl():
            for chunk, old_head in zip(chunks, old_heads):
                yield self.engine(self._kl_to_old_policy, rollout, chunk, *old_head) / tokens

        result = trpo_step(self.trainable_parameters(), surrogate, mean_kl,
                           self.config.trpo_options)
        # trpo_step moved the parameters itself and left every .grad empty, so this step is a
        # no-op; taking it keeps the loop's learning-rate scheduler in its expected order.
        self.optimizer.step()
        return {"loss": -result.surrogate, "grad_norm": result.grad_norm,
                "trpo/kl": result.kl, "trpo/step_fraction": result.step_fraction,
                "trpo/accepted": float(result.accepted), "trpo/cg_residual": result.cg_residual,
                "trpo/surrogate_improvement": result.surrogate_improvement}

    def _policy_head_inputs(self, rollout: Rollout, rows: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden [B, T, H], weight, bias) of the policy on the rollout's ``rows``."""
        with self.autocast():
            hidden = hf.final_hidden_states(self.model, rollout.input_ids[rows],
                                            attention_mask=rollout.attention_mask[rows])
            return hf.head_inputs(hidden, self.head)

    def _kl_to_old_policy(self, rollout: Rollout, rows: torch.Tensor, old_hidden: torch.Tensor,
                          old_weight: torch.Tensor, old_bias: torch.Tensor | None
                          ) -> torch.Tensor:
        """Σ over the completion tokens of ``rows`` of the exact KL(π_old ‖ π_θ) (with graph)."""
        hidden, weight, bias = self._policy_head_inputs(rollout, rows)
        with hf.no_autocast(self.device.type):
            kl = linear_kl(hidden[:, :-1], weight, old_hidden[:, :-1], old_weight,
                           mask=rollout.mask[rows], bias=bias, ref_bias=old_bias, reverse=True,
                           impl=self.config.impl, **self.options)
        return kl.sum()

    def trpo_surrogate(self, rollout: Rollout, rows: torch.Tensor, *,
                       kl_coef: float) -> torch.Tensor:
        """The objective TRPO maximises on the rollout's ``rows`` (with graph): per token
        ρ·A − β·k, ρ = π_θ/π_old, k the reference KL of ``kl_estimator`` (× ρ with
        ``use_bias_correction_kl``), aggregated by ``loss_agg``. Unclipped: the trust region
        bounds the step instead."""
        config = self.config
        hidden, weight, bias = self._policy_head_inputs(rollout, rows)
        mask = rollout.mask[rows]
        with hf.no_autocast(self.device.type):
            logps = sequence_logprobs_from_labels(hidden, weight, rollout.labels[rows], bias=bias,
                                                  impl=config.impl, **self.options).token_logps
            ratio = torch.exp(logps - rollout.old_logps[rows])
            objective = ratio * rollout.advantages[rows, None]
            if kl_coef > 0:
                if config.kl_estimator == "exact":
                    ref_weight, ref_bias = self._reference_head(weight.dtype)
                    ref_hidden = rollout.ref_hidden[rows][:, :-1].to(weight.dtype)
                    token_kl = linear_kl(hidden[:, :-1], weight, ref_hidden, ref_weight,
                                         mask=mask, bias=bias, ref_bias=ref_bias,
                                         impl=config.impl, **self.options)
                else:
                    token_kl = kl_penalty(logps, rollout.ref_logps[rows],
                                          estimator=config.kl_estimator)
                if config.use_bias_correction_kl:
                    token_kl = token_kl * ratio
                objective = objective - kl_coef * token_kl
        return aggregate_token_loss(objective, mask, mode=config.loss_agg)

    def minibatch_loss(self, rollout: Rollout, rows: torch.Tensor, *,
                       kl_coef: float | None = None,
                       ent_coef: float | None = None) -> tuple[torch.Tensor, Metrics]:
        """``FusedPPOLoss`` of the rollout's ``rows`` under the current policy (with gradients).

        ``kl_coef`` defaults to the controller's value; it weighs the KL term of grpo / rloo only
        (ppo's KL is in the rewards already). ``ent_coef`` (default ``config.ent_coef``) is the
        entropy bonus's coefficient, which adaptive entropy control sets per step.
        """
        config = self.config
        kl_coef = self.kl_controller.value if kl_coef is None else kl_coef
        ppo = config.mode == "ppo"
        exact = config.kl_estimator == "exact"
        loss_options = dataclasses.replace(
            config.loss_options, kl_coef=0.0 if ppo else kl_coef,
            ent_coef=config.ent_coef if ent_coef is None else ent_coef)
        loss_fn = FusedPPOLoss(options=loss_options, impl=config.impl, **self.options)
        input_ids, attention_mask = rollout.input_ids[rows], rollout.attention_mask[rows]
        kwargs = {}
        with self.autocast():
            hidden = hf.final_hidden_states(self.model, input_ids, attention_mask=attention_mask)
            if ppo:
                kwargs.update(values=self._values(hidden), old_values=rollout.old_values[rows],
                              returns=rollout.returns[rows])
            hidden, weight, bias = hf.head_inputs(hidden, self.head)
        if exact and not ppo:
            ref_weight, ref_bias = self._reference_head(weight.dtype)
            kwargs.update(ref_hidden=rollout.ref_hidden[rows].to(weight.dtype),
                          ref_weight=ref_weight, ref_bias=ref_bias)
        elif not exact:
            kwargs["ref_logps"] = rollout.ref_logps[rows]
        with hf.no_autocast(self.device.type):
            loss, metrics = loss_fn(hidden, weight, rollout.labels[rows], rollout.old_logps[rows],
                                    rollout.advantages[rows], bias=bias, **kwargs)
        renamed = {"kl": "policy/kl", "entropy": "policy/entropy", "loss/total": "loss"}
        return loss, {renamed.get(key, key): value for key, value in metrics.items()}

    # -- the rollout ----------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, indices: Sequence[int], *, kl_coef: float | None = None) -> Rollout:
        """Sample, score and compute the advantages of ``num_generations`` completions for each
        prompt of ``indices`` (training examples)."""
        config = self.config
        kl_coef = self.kl_controller.value if kl_coef is None else kl_coef
        batch = self.batch(indices)
        group = config.num_generations
        prompt_ids = batch["input_ids"].repeat_interleave(group, dim=0)
        prompt_mask = batch["attention_mask"].repeat_interleave(group, dim=0)
        prompt_lengths = batch["prompt_lengths"].repeat_interleave(group, dim=0)
        examples = [self.train_examples[i] for i in indices for _ in range(group)]
        completion_ids, has_eos = self.generate(prompt_ids, prompt_mask, sample=True)
        input_ids, attention_mask, labels = self._sequences(prompt_ids, prompt_lengths,
                                                            completion_ids)
        prompts, completions, raw_scores, reward_scores = self.score(
            prompt_ids, prompt_lengths, completion_ids, input_ids, attention_mask,
            examples=examples)
        self._check_unscored(raw_scores)
        rollout_metrics = {} if reward_scores is None else self.rewards.metrics(reward_scores)
        scores = raw_scores.clone()
        if config.missing_eos_penalty is not None:
            scores = scores - config.missing_eos_penalty * (~has_eos).to(scores.dtype)

        with self.autocast():
            hidden = hf.final_hidden_states(self.model, input_ids, attention_mask=attention_mask)
            old_values = self._values(hidden) if config.mode == "ppo" else None
            h, w, b = hf.head_inputs(hidden, self.head)
            with self.reference.active() as ref_model:
                ref_hidden = hf.final_hidden_states(ref_model, input_ids,
                                                    attention_mask=attention_mask)
            ref_h, ref_w, ref_b = hf.head_inputs(ref_hidden, self.ref_head)
        with hf.no_autocast(self.device.type):
            old = sequence_logprobs_from_labels(h, w, labels, bias=b, return_entropy=True,
                                                impl=config.impl, **self.options)
            mask = old.token_mask
            ref_logps = exact_ref_hidden = None
            if config.kl_estimator != "exact":
                ref_logps = sequence_logprobs_from_labels(
                    ref_h, ref_w, labels, bias=ref_b, impl=config.impl,
                    **self.ref_head.options(config.temperature)).token_logps
                token_kl = kl_penalty(old.token_logps, ref_logps, estimator=config.kl_estimator)
            else:
                exact_ref_hidden = self._scaled_reference_hidden(ref_hidden)
                ref_weight, ref_bias = self._reference_head(w.dtype)
                token_kl = linear_kl(h[:, :-1], w, exact_ref_hidden[:, :-1].to(w.dtype),
                                     ref_weight, mask=mask, bias=b, ref_bias=ref_bias,
                                     impl=config.impl, **self.options)
        token_kl = torch.where(mask, token_kl, 0.0)
        old_logps = old.token_logps

        returns = None
        if config.mode == "ppo":
            # token_kl is already k(t) (or the exact KL), and k1 of (kl, 0) is kl itself.
            shaped = kl_shaped_rewards(scores, token_kl, torch.zeros_like(token_kl), mask,
                                       kl_coef=kl_coef, estimator="k1")
            advantages, returns = gae(shaped.rewards, old_values, mask, gamma=config.gamma,
                                      lam=config.lam, impl=config.impl)
            if config.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
            non_score = shaped.non_score_rewards.sum(1)
            rollout_metrics |= {
                "reward/non_score": float(non_score.mean()),
                "reward/rlhf": float((scores + non_score).mean()),
                "value/returns": float(masked_mean(returns, mask)),
            }
        else:
            if config.multi_objective_aggregation == "normalize_then_sum":
                per_function, weights = (scores[:, None], None) if reward_scores is None else (
                    reward_scores.to(scores.device),
                    torch.tensor(self.rewards.weights, dtype=torch.float32))
                advantages = normalize_then_sum_advantages(per_function, group, weights=weights)
            elif config.mode in ("grpo", "trpo"):
                advantages = grpo_advantages(scores, group)
            else:
                advantages = rloo_advantages(scores, group,
                                             normalize_advantages=config.normalize_advantages,
                                             reward_clip_range=config.reward_clip_range)
            if config.whiten_advantages:
                advantages = masked_whiten(advantages, torch.ones_like(advantages, dtype=bool))

        if config.use_adaptive_entropy:  # over the tokens the entropy bonus acts on
            bonus_tokens = mask if config.top_entropy_quantile == 1.0 else high_entropy_mask(
                old.token_entropy, mask, config.top_entropy_quantile)
            rollout_metrics[_CONTROLLED_ENTROPY] = float(masked_mean(old.token_entropy,
                                                                     bonus_tokens))
        rollout_metrics |= {
            "reward": float(raw_scores.nanmean()),  # unscored completions left out, as TRL
            "reward_std": _nan_std(raw_scores),
            "kl": float(masked_mean(token_kl, mask)),
            "kl/sequence": float(token_kl.sum(1).mean()),
            "entropy": float(masked_mean(old.token_entropy, mask)),
        } | completion_metrics(mask.sum(1).cpu(), has_eos.cpu())
        if config.mode != "ppo":  # groups whose rewards are all equal teach nothing
            group_std = raw_scores.view(-1, group).std(dim=1) if group > 1 else \
                torch.zeros(len(raw_scores) // group)
            rollout_metrics["frac_reward_zero_std"] = float(
                torch.isclose(group_std, torch.zeros_like(group_std)).float().mean())
        return Rollout(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                       mask=mask, old_logps=old_logps, advantages=advantages, scores=scores,
                       raw_scores=raw_scores,
                       ref_logps=ref_logps, ref_hidden=exact_ref_hidden, old_values=old_values,
                       returns=returns, prompts=prompts, completions=completions,
                       reward_scores=reward_scores, has_eos=has_eos, metrics=rollout_metrics)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Completions of left-padded prompts: ids [N, C] (pad after the first eos) and
        ``has_eos`` [N] bool. Samples from the global torch generator; ``sample=False`` is
        greedy. Runs in eval mode; the model's own ``generation_config`` is overridden for every
        option that changes the sampled distribution."""
        from transformers import GenerationConfig

        config = self.config
        room = config.max_length - input_ids.shape[1]
        if room < 1:
            raise ValueError(f"the prompts are {input_ids.shape[1]} tokens long, leaving no room "
                             f"for a completion within max_length={config.max_length}")
        generation = GenerationConfig(
            do_sample=sample, temperature=config.temperature if sample else 1.0,
            top_k=config.top_k if sample else 0, top_p=config.top_p if sample else 1.0,
            typical_p=1.0,
            repetition_penalty=1.0, num_beams=1, max_new_tokens=min(config.max_new_tokens, room),
            pad_token_id=self.pad_id, eos_token_id=self.eos_id, use_cache=True)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                # Under FSDP every rank runs decoding steps until all ranks are done: each step
                # gathers the sharded layers, and the ranks' completions end at different steps.
                synced = {"synced_gpus": True} if self.dist.strategy == "fsdp" else {}
                output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                             generation_config=generation, **synced)
        finally:
            self.model.train(was_training)
        return pad_after_first_eos(output[:, input_ids.shape[1]:], eos_id=self.eos_id,
                                   pad_id=self.pad_id)

    def _sequences(self, prompt_ids: torch.Tensor, prompt_lengths: torch.Tensor,
                   completion_ids: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded prompt + completion: input_ids, attention_mask, labels [N, T]."""
        sequences = prompts_with_completions(prompt_ids, prompt_lengths, completion_ids,
                                             eos_id=self.eos_id, pad_id=self.pad_id)
        return tuple(tensor.to(self.device) for tensor in sequences)

    def score(self, prompt_ids: torch.Tensor, prompt_lengths: torch.Tensor,
              completion_ids: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor, *, examples: Sequence[dict] | None = None
              ) -> tuple[list, list, torch.Tensor, torch.Tensor | None]:
        """(prompts, completions, float32 scores [N], each function's scores [N, F] on the CPU
        with NaN for None, or None for the reward model) from the reward model or the reward
        functions. ``examples`` (one per row) give the functions the data's prompts and other
        columns; without them the prompts are the decoded prompt ids."""
        prompts, completions = decode_texts(self.tokenizer, prompt_ids, prompt_lengths,
                                            completion_ids, eos_id=self.eos_id)
        per_function = None
        if examples is not None:
            # The data's own prompt (chat prompts stay message lists, as TRL passes them); a
            # copy, since a reward function may edit it.
            prompts = [copy.deepcopy(example["prompt"]) if "prompt" in example else text
                       for example, text in zip(examples, prompts)]
        if any(not isinstance(prompt, str) for prompt in prompts):
            completions = [[{"role": "assistant", "content": text}] for text in completions]
        if self.reward_model is not None:
            with self.autocast():
                logits = self.reward_model(input_ids=input_ids,
                                           attention_mask=attention_mask).logits
            if logits.dim() != 2 or logits.shape[1] != 1:
                raise ValueError(f"the reward model must give one score per sequence "
                                 f"(num_labels=1), got logits of shape {tuple(logits.shape)}")
            scores = logits[:, 0].float()
        else:
            columns = {}
            for key in dict.fromkeys(k for example in examples or () for k in example):
                if key not in _NOT_COLUMNS:
                    columns[key] = [example.get(key) for example in examples]
            ids = [row[:completion_length(row, self.eos_id)] for row in completion_ids.tolist()]
            scores, per_function = self.rewards(
                prompts=prompts, completions=completions, completion_ids=ids, columns=columns,
                trainer_state=TrainingProgress(self.step, self.config.max_steps))
            scores = scores.to(self.device)
            # A completion no function scored has no reward (NaN), not 0: the advantages leave
            # it out of its group's baseline and give it none (TRL's).
            scores = torch.where(per_function.isnan().all(1).to(scores.device), torch.nan, scores)
        if bool(scores.isinf().any()):
            raise ValueError(f"the reward is infinite: {scores.tolist()}")
        return prompts, completions, scores, per_function

    def _check_unscored(self, scores: torch.Tensor) -> None:
        """NaN rewards (completions no reward function scored) are for grpo and rloo, whose
        advantages leave them out; a rollout without any reward is an error, not a silent step
        that trains on nothing."""
        unscored = scores.isnan()
        if not bool(unscored.any()):
            return
        source = "the reward model" if self.reward_model is not None else \
            "the reward functions (None or NaN for every completion)"
        if bool(unscored.all()):
            raise ValueError(f"every reward of the rollout is NaN (not finite): {source} "
                             f"scored none of its {len(scores)} completions, leaving nothing to "
                             f"train on")
        if self.config.mode == "ppo":
            rows = unscored.nonzero()[:, 0].tolist()
            raise ValueError(f"mode='ppo' needs a reward for every completion (GAE has no group "
                             f"baseline to leave one out of), but {source} gave none for "
                             f"completions {rows}; use mode grpo or rloo, or score them")

    # -- helpers --------------------------------------------------------------------------------

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(state before token t + 1) = value_head(h_t): float32 [B, T − 1]."""
        h = hidden[:, :-1]
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def _reference_head(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference head's weight and bias for ``linear_kl`` (the bias scaled as the hidden
        states are, see ``_scaled_reference_hidden``)."""
        ratio = self.ref_head.logit_scale / self.head.logit_scale
        bias = self.ref_head.bias
        if bias is not None:
            bias = (bias.detach().float() * ratio).to(dtype)
        return self.ref_head.weight.detach().to(dtype), bias

    def _scaled_reference_hidden(self, ref_hidden: torch.Tensor) -> torch.Tensor:
        """``linear_kl`` applies the policy's temperature (with its logit scale folded in) to both
        sides: a reference scale s_ref is folded into its hidden states as s_ref / s."""
        ratio = self.ref_head.logit_scale / self.head.logit_scale
        return ref_hidden if ratio == 1.0 else (ref_hidden.float() * ratio).to(ref_hidden.dtype)

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> Metrics:
        """Greedy completions of the eval prompts, scored: ``eval/reward``, ``eval/reward_std``,
        ``eval/completions/mean_length``. Greedy decoding draws no random numbers, so evaluating
        does not change the training run. With several ranks, each evaluates every prompt (greedy:
        they agree)."""
        if not self.eval_examples:
            return {}
        return self.engine(self._evaluate_greedy)

    def _evaluate_greedy(self) -> Metrics:
        scores, lengths = [], []
        size = self.config.batch_size
        for start in range(0, len(self.eval_examples), size):
            rows = range(start, min(start + size, len(self.eval_examples)))
            batch = self.batch(rows, self.eval_examples)
            completion_ids, _ = self.generate(batch["input_ids"], batch["attention_mask"],
                                              sample=False)
            input_ids, attention_mask, _ = self._sequences(
                batch["input_ids"], batch["prompt_lengths"], completion_ids)
            _, _, batch_scores, _ = self.score(
                batch["input_ids"], batch["prompt_lengths"], completion_ids, input_ids,
                attention_mask, examples=[self.eval_examples[i] for i in rows])
            scores.append(batch_scores.float().cpu())
            lengths += [completion_length(ids, self.eos_id) for ids in completion_ids.tolist()]
        scores = torch.cat(scores)
        return {"eval/reward": float(scores.nanmean()),
                "eval/reward_std": _nan_std(scores),
                "eval/completions/mean_length": sum(lengths) / len(lengths)}


def _nan_std(scores: torch.Tensor) -> float:
    """The (n − 1) standard deviation of the scored completions (NaN rewards left out); 0 for
    fewer than two."""
    scored = scores[~scores.isnan()]
    return float(scored.std()) if len(scored) > 1 else 0.0
