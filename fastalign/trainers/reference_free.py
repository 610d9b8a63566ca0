"""The reference-free preference trainers: SimPO, CPO and ORPO on a causal LM.

They take DPO's data (prompt / chosen / rejected, collated as ``[2B, T]``: the chosen sequences
stacked on the rejected ones) and its fused head (``FusedSimPOLoss`` / ``FusedCPOLoss`` /
``FusedORPOLoss`` forming the head's gradients in forward, or with ``gradients_in_forward=False``
``fastalign.hf.sequence_logprobs``; no [tokens × vocab] logits), but no reference model: the
loss is a function of the policy's own log-probs, ``fastalign.losses``'
:func:`~fastalign.losses.simpo_loss`, :func:`~fastalign.losses.cpo_loss` or
:func:`~fastalign.losses.orpo_loss`. The options and metric
names are TRL's (``CPOConfig``'s ``simpo_gamma`` and ``cpo_alpha``; TRL runs SimPO as
``CPOTrainer(loss_type="simpo")``).

What each loss reads of a sequence: SimPO and ORPO the *mean* log-prob of its answer tokens (the
length-normalised reward of their papers), CPO the *sum* (the mean with ``loss_type="ipo"``, as
TRL). The NLL term on the chosen answers
(CPO, ORPO, and SimPO with ``cpo_alpha > 0``) is the token mean over the batch's chosen answers,
as TRL's CPO cross-entropy on the chosen half of the batch; TRL 1.16's ORPO also counts the
chosen prompts' tokens (docs/ALGORITHMS.md §10).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastalign import hf
from fastalign.data import PreferenceCollator
from fastalign.fused import FusedCPOLoss, FusedORPOLoss, FusedSimPOLoss
from fastalign.losses.dpo import cpo_loss, orpo_loss, simpo_loss
from fastalign.losses.options import CPO_LOSS_TYPES, CPOOptions, ORPOOptions, SimPOOptions
from fastalign.ops._checks import check_field_choice, check_field_float, check_field_number
from fastalign.trainers.config import (
    GRADIENTS_IN_FORWARD_HELP,
    TrainingConfig,
    option,
    pad_token_id,
)
from fastalign.trainers.loop import Trainer
from fastalign.trainers.metrics import mean_logits_by_side

__all__ = ["CPOConfig", "CPOTrainer", "ORPOConfig", "ORPOTrainer", "SimPOConfig", "SimPOTrainer"]

_SMOOTHING_HELP = "probability that a preference label is flipped (robust, conservative loss)"
_ALPHA_HELP = "weight of the NLL term on the chosen answers"
_ALPHAPO_HELP = ("AlphaPO's reward shape: each answer's reward is (1 - p^-alpha)/alpha of its "
                 "probability p instead of log p (0: log p)")


def _check_cpo_family(config) -> None:
    """β, ε and α of SimPO and CPO (TRL runs both as its ``CPOTrainer``)."""
    check_field_float("beta", config.beta, positive=True)
    check_field_number("label_smoothing", config.label_smoothing, low=0.0, high=0.5,
                       inclusive=True)
    check_field_float("cpo_alpha", config.cpo_alpha, positive=False)
    check_field_number("alpha", config.alpha, low=-math.inf)


@dataclass
class _ReferenceFreeConfig(TrainingConfig):
    """What SimPO, CPO and ORPO share on top of :class:`TrainingConfig`."""

    gradients_in_forward: bool = option(True, GRADIENTS_IN_FORWARD_HELP)


@dataclass
class SimPOConfig(_ReferenceFreeConfig):
    """SimPO options on top of :class:`TrainingConfig` (TRL's ``CPOConfig`` names)."""

    beta: float = option(2.0, "the reward scale of the mean answer log-prob")
    simpo_gamma: float = option(0.5, "the target reward margin gamma")
    label_smoothing: float = option(0.0, _SMOOTHING_HELP)
    cpo_alpha: float = option(0.0, _ALPHA_HELP + " (0: pure SimPO; > 0: CPO-SimPO)")
    alpha: float = option(0.0, _ALPHAPO_HELP + "; TRL's loss-type alphapo is simpo with "
                          "alpha != 0 and cpo-alpha 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_cpo_family(self)
        finite = isinstance(self.simpo_gamma, (int, float)) and not isinstance(
            self.simpo_gamma, bool) and math.isfinite(self.simpo_gamma)
        if not finite:
            raise ValueError(f"simpo_gamma must be a finite number, got {self.simpo_gamma!r}")
        self.loss_options = SimPOOptions(beta=self.beta, gamma=self.simpo_gamma,
                                         label_smoothing=self.label_smoothing,
                                         alpha=self.cpo_alpha, alphapo_alpha=self.alpha)


@dataclass
class CPOConfig(_ReferenceFreeConfig):
    """CPO options on top of :class:`TrainingConfig` (TRL's names)."""

    beta: float = option(0.1, "the scale of the summed answer log-prob difference")
    label_smoothing: float = option(0.0, _SMOOTHING_HELP)
    cpo_alpha: float = option(1.0, _ALPHA_HELP + " (behaviour cloning)")
    loss_type: str = option("sigmoid", "the preference term: " + ", ".join(CPO_LOSS_TYPES)
                            + " (ipo compares mean answer log-probs, the others sums)")
    alpha: float = option(0.0, _ALPHAPO_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_cpo_family(self)
        check_field_choice("loss_type", self.loss_type, CPO_LOSS_TYPES)
        self.loss_options = CPOOptions(beta=self.beta, label_smoothing=self.label_smoothing,
                                       alpha=self.cpo_alpha, loss_type=self.loss_type,
                                       alphapo_alpha=self.alpha)


@dataclass
class ORPOConfig(_ReferenceFreeConfig):
    """ORPO options on top of :class:`TrainingConfig` (TRL's names)."""

    beta: float = option(0.1, "weight of the odds-ratio term (lambda in the paper)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_float("beta", self.beta, positive=True)
        self.loss_options = ORPOOptions(beta=self.beta)


class _ReferenceFreeTrainer(Trainer):
    """The shared step: policy log-probs of both answers through the fused head, then the loss."""

    loss_fn: Callable  # the loss of the streamed step's log-probs
    fused_loss: type  # the fused loss module of the step with gradients in forward

    def __init__(self, model: nn.Module, tokenizer, train_examples: Sequence[dict],
                 config: TrainingConfig, *, eval_examples: Sequence[dict] | None = None) -> None:
        super().__init__(model, tokenizer, train_examples, config,
                         collator=PreferenceCollator(pad_token_id=pad_token_id(tokenizer)),
                         eval_examples=eval_examples)

    def count_input_tokens(self, batch: dict) -> None:
        return None  # TRL's CPOTrainer and ORPOTrainer log no num_tokens

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        config = self.config
        if config.gradients_in_forward:
            return self._loss_with_gradients_in_forward(batch)
        policy = hf.sequence_logprobs(
            self.model, batch["input_ids"], labels=batch["labels"],
            attention_mask=batch["attention_mask"],
            temperature=config.temperature, return_mean_logits=True, impl=config.impl)
        logps = policy.sum_logps
        # The options say whether the loss reads each answer's mean token log-prob or its sum.
        if config.loss_options.length_averaged:  # no answer tokens: log-prob 0, averaged to 0
            logps = logps / policy.lengths.clamp(min=1)
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen_sums, chosen_lengths = policy.sum_logps.chunk(2)[0], policy.lengths.chunk(2)[0]
        chosen_nll = -chosen_sums.sum() / chosen_lengths.sum().clamp(min=1)
        loss, metrics = type(self).loss_fn(chosen_logps, rejected_logps, chosen_nll=chosen_nll,
                                           options=config.loss_options)
        chosen_rows = torch.arange(len(logps), device=self.device) < len(chosen_logps)
        return loss, metrics | mean_logits_by_side(policy, chosen_rows,
                                                     across_ranks=self.all_ranks_mean)

    def _loss_with_gradients_in_forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The step through the fused loss module (``fused_loss``): the same loss as the
        streamed step, the head's gradients formed chunk of whole pairs by chunk."""
        return self.fused_pair_step(batch, type(self).fused_loss, self.config.loss_options)


class SimPOTrainer(_ReferenceFreeTrainer):
    """SimPO (Meng, Xia & Chen, 2024): the length-normalised reward with a target margin.

    Example::

        trainer = SimPOTrainer(model, tokenizer, encode_preference(records, tokenizer, ...),
                               SimPOConfig(output_dir="out", max_steps=100))
        trainer.train()
    """

    name = "simpo"
    loss_fn = staticmethod(simpo_loss)
    fused_loss = FusedSimPOLoss


class CPOTrainer(_ReferenceFreeTrainer):
    """CPO (Xu et al., 2024): DPO without the reference, plus NLL on the chosen answers."""

    name = "cpo"
    loss_fn = staticmethod(cpo_loss)
    fused_loss = FusedCPOLoss


class ORPOTrainer(_ReferenceFreeTrainer):
    """ORPO (Hong, Lee & Thorne, 2024): NLL on the chosen answers minus β·log σ(log odds ratio)."""

    name = "orpo"
    loss_fn = staticmethod(orpo_loss)
    fused_loss = FusedORPOLoss
