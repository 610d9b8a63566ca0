"""DPO and its variants (every ``loss_type`` of ``fastalign.losses.dpo_loss``) on a causal LM.

One micro-batch is B preference pairs, collated as ``[2B, T]`` with the chosen sequences stacked
on the rejected ones (``fastalign.data.PreferenceCollator``; with ``padding_free``, the 2B
sequences back to back in one row with ``cu_seqlens``). A step runs the backbone, then
``fastalign.FusedDPOLoss`` on its final hidden states and the LM-head weight: the head's
gradients are formed in the forward pass, a chunk of whole pairs at a time (no [tokens × vocab]
logits beyond one chunk's). With ``gradients_in_forward=False`` or padding-free batches the
policy's summed response log-probs come from the streamed head instead
(``fastalign.hf.sequence_logprobs``: the weight streamed by ``linear_logprobs``). The reference's
log-probs come from a frozen copy, the PEFT policy with adapters disabled, or are precomputed
before training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastalign import hf
from fastalign.data import PreferenceCollator
from fastalign.fused import FusedDPOLoss
from fastalign.losses.dpo import dpo_loss, pair_sequence_logps, wpo_pair_weights
from fastalign.losses.options import DPO_LOSS_TYPES, F_DIVERGENCES, DPOOptions
from fastalign.ops._checks import (
    check_field_choice,
    check_field_float,
    check_field_number,
)
from fastalign.trainers.config import (
    GRADIENTS_IN_FORWARD_HELP,
    PADDING_FREE_HELP,
    REFERENCE_HELP,
    REFERENCE_MODES,
    TrainingConfig,
    option,
    pad_token_id,
)
from fastalign.trainers.metrics import mean_logits_by_side
from fastalign.trainers.reference import ReferenceTrainer

__all__ = ["DPOConfig", "DPOTrainer"]


@dataclass
class DPOConfig(TrainingConfig):
    """DPO options on top of :class:`TrainingConfig` (TRL's names)."""

    beta: float = option(0.1, "strength of the KL regularisation toward the reference")
    loss_type: tuple[str, ...] = option(("sigmoid",), "one or more of " + ", ".join(
        DPO_LOSS_TYPES) + ", comma-separated (combined with loss-weights)")
    loss_weights: tuple[float, ...] | None = option(None, "weights of the loss types, "
                                                    "comma-separated ('none': all 1)")
    label_smoothing: float = option(0.0, "probability that a preference label is flipped "
                                    "(cDPO, robust DPO)")
    f_divergence_type: str = option("reverse_kl", "the divergence to the reference: "
                                    + ", ".join(F_DIVERGENCES) + " (reverse_kl is DPO's)")
    f_alpha_divergence_coef: float = option(0.5, "alpha of f-divergence-type alpha_divergence")
    ld_alpha: float | None = option(None, "LD-DPO: weight in [0, 1] of the longer answer's "
                                    "tokens past the shorter one's length, in the policy and "
                                    "reference log-probs ('none': plain sums)")
    use_weighting: bool = option(False, "WPO: weight each pair's loss by the policy's "
                                 "length-normalised probabilities of both answers (no "
                                 "gradient; not with loss-type aot, aot_unpaired)")
    reference: str = option("auto", REFERENCE_HELP)
    padding_free: bool = option(False, PADDING_FREE_HELP)
    gradients_in_forward: bool = option(
        True, GRADIENTS_IN_FORWARD_HELP + ". Padding-free batches always stream")
    memory_report: bool = option(False, "after training, measure the DPO loss's peak memory on one "
                                 "batch, fused against eager logits, on the model's head and on "
                                 "a random 128256-token head (one process only; the eager side "
                                 "builds the whole [tokens x vocab] logits)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.loss_type, str):
            self.loss_type = (self.loss_type,)
        names = tuple(self.loss_type)
        unknown = [name for name in names if name not in DPO_LOSS_TYPES]
        if not names or unknown:
            raise ValueError(f"loss_type must be one or more of {', '.join(DPO_LOSS_TYPES)}, got "
                             f"{self.loss_type!r}")
        check_field_choice("reference", self.reference, REFERENCE_MODES)
        check_field_float("beta", self.beta, positive=True)
        if self.ld_alpha is not None:
            check_field_number("ld_alpha", self.ld_alpha, low=0.0, high=1.0, inclusive=True,
                               high_inclusive=True)
        if self.padding_free and (self.ld_alpha is not None or self.use_weighting):
            raise ValueError("padding_free does not support ld_alpha or use_weighting yet (they "
                             "need padded per-token log-probs); drop padding_free")
        if self.loss_weights is not None:
            self.loss_weights = tuple(self.loss_weights)
        # The loss's own options object checks the rest (label smoothing and the types that use
        # it, the weights), so a bad option stops the run before training; the trainer passes it
        # whole to the loss.
        self.loss_options = DPOOptions(beta=self.beta, loss_type=names,
                                       loss_weights=self.loss_weights,
                                       label_smoothing=self.label_smoothing,
                                       f_divergence_type=self.f_divergence_type,
                                       f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                                       ld_alpha=self.ld_alpha, use_weighting=self.use_weighting)


class DPOTrainer(ReferenceTrainer):
    """Direct Preference Optimization (Rafailov et al., 2023) and every variant of ``dpo_loss``.

    Example::

        trainer = DPOTrainer(model, tokenizer, encode_preference(records, tokenizer, ...),
                             DPOConfig(output_dir="out", max_steps=100, beta=0.1))
        trainer.train()
    """

    name = "dpo"

    def __init__(self, model: nn.Module, tokenizer, train_examples: Sequence[dict],
                 config: DPOConfig, *, ref_model: nn.Module | None = None,
                 eval_examples: Sequence[dict] | None = None) -> None:
        super().__init__(model, tokenizer, train_examples, config,
                         collator=PreferenceCollator(pad_token_id=pad_token_id(tokenizer),
                                                     padding_free=config.padding_free),
                         ref_model=ref_model, eval_examples=eval_examples)
        if config.padding_free:
            hf.check_packed_attention(self.model)
            if ref_model is not None:  # another model, maybe of another architecture
                hf.check_packed_attention(ref_model)

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """[B, 2] summed (with ld_alpha, LD-weighted) reference log-probs of the chosen and
        rejected answers."""
        ref = self.reference.sequence_logprobs(
            batch["input_ids"], labels=batch["labels"], attention_mask=batch.get("attention_mask"),
            cu_seqlens=batch.get("cu_seqlens"), temperature=self.config.temperature,
            impl=self.config.impl)
        return torch.stack(pair_sequence_logps(ref, self.config.ld_alpha), dim=1)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        config = self.config
        if config.gradients_in_forward and batch.get("cu_seqlens") is None:
            return self._loss_with_gradients_in_forward(batch)
        policy = hf.sequence_logprobs(
            self.model, batch["input_ids"], labels=batch["labels"],
            attention_mask=batch.get("attention_mask"),
            cu_seqlens=batch.get("cu_seqlens"), temperature=config.temperature,
            return_mean_logits=True, return_log_sum_sq_probs=config.use_weighting,
            impl=config.impl)
        chosen_logps, rejected_logps = pair_sequence_logps(policy, config.ld_alpha)
        ref = self.batch_reference_logps(batch)
        # A sequence without response tokens (truncated away) has log-prob 0: average it to 0.
        chosen_lengths, rejected_lengths = policy.lengths.clamp(min=1).chunk(2)
        chosen_nll = -policy.sum_logps.chunk(2)[0].sum() / policy.lengths.chunk(2)[0].sum(
        ).clamp(min=1)
        pair_weights = wpo_pair_weights(policy) if config.use_weighting else None
        loss, metrics = dpo_loss(
            chosen_logps, rejected_logps, ref[:, 0], ref[:, 1], chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths, chosen_nll=chosen_nll, pair_weights=pair_weights,
            options=config.loss_options,
        )
        chosen_rows = torch.arange(len(policy.lengths), device=self.device) < len(chosen_logps)
        return loss, metrics | mean_logits_by_side(policy, chosen_rows, batch.get("cu_seqlens"),
                                                     across_ranks=self.all_ranks_mean)

    def _loss_with_gradients_in_forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The step through ``FusedDPOLoss``: the same loss as the streamed step, the head's
        gradients formed chunk of whole pairs by chunk while the loss is computed."""
        ref = self.batch_reference_logps(batch)
        return self.fused_pair_step(batch, FusedDPOLoss, self.config.loss_options,
                                    ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1])
