"""KTO (Ethayarajh et al., 2024) on a causal LM: unpaired examples, each desirable or not.

One micro-batch is B >= 2 (prompt, completion, desirable) examples. KTO's reference point z_ref
is the policy-to-reference KL estimated on *mismatched* pairs: prompt i with another example's
completion. The policy's summed completion log-probs come from the fused head
(``fastalign.hf.sequence_logprobs``, no [tokens × vocab] logits); the mismatched pairs run
through the policy under ``torch.no_grad`` (z_ref is detached); the reference's log-probs come
from a frozen copy, the PEFT policy with its adapters disabled, or a table computed before
training. ``fastalign.losses.kto_loss`` assembles the loss, as ``fastalign.FusedKTOLoss`` does.

Which completion is the mismatched partner of an example (``kl_pairing``):

* ``batch``: within each micro-batch, example i gets the completion of example i − 1
  (``fastalign.data.KTOCollator``, ``kto_mismatched_indices``); the pairs change every batch.
* ``dataset``: each example gets one fixed partner completion for the whole run
  (``kl_completion_ids``, which ``KTOCollator`` uses when present), as TRL's ``KTOTrainer`` does
  when it builds its KL dataset before training. The partners come from a
  seeded permutation of the examples: example ``order[k]`` gets the completion of
  ``order[k − 1]``, so no example keeps its own completion and every completion is reused exactly
  once. Fixed pairs are what a precomputed reference needs: the reference log-probs of both the
  example and its KL pair are computed once, before the first step.

``auto`` is ``dataset`` with ``reference="precomputed"`` and ``batch`` otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastalign import hf
from fastalign.data import KTOCollator
from fastalign.losses.kto import kto_loss
from fastalign.losses.options import KTO_LOSS_TYPES, KTOOptions
from fastalign.ops._checks import (
    check_field_choice,
    check_field_float,
)
from fastalign.trainers.config import (
    REFERENCE_HELP,
    REFERENCE_MODES,
    TrainingConfig,
    option,
    pad_token_id,
)
from fastalign.trainers.metrics import mean_logits_by_side
from fastalign.trainers.reference import ReferenceTrainer

__all__ = ["KTOConfig", "KTOTrainer", "fixed_kl_partners"]

KL_PAIRINGS = ("auto", "batch", "dataset")
# Seeds the fixed KL partners apart from BatchStream's epoch permutations (seed·1_000_003 + epoch),
# so that the partners of a batch's examples are not simply the batch's own completions.
_PAIRING_SALT = 0x6B746F


@dataclass
class KTOConfig(TrainingConfig):
    """KTO options on top of :class:`TrainingConfig` (TRL's names). ``batch_size`` must be >= 2."""

    beta: float = option(0.1, "strength of the KL regularisation toward the reference")
    loss_type: str = option("kto", "kto, or apo_zero_unpaired (unpaired APO-zero: no KL "
                            "reference point, so no mismatched pairs and any batch size)")
    desirable_weight: float = option(1.0, "weight of the desirable examples' losses")
    undesirable_weight: float = option(1.0, "weight of the undesirable examples' losses")
    reference: str = option("auto", REFERENCE_HELP)
    kl_pairing: str = option("auto", "the mismatched completion of each KL pair: batch (another "
                             "example of the micro-batch), dataset (one fixed partner per "
                             "example) or auto (dataset when precomputed, else batch)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_choice("loss_type", self.loss_type, KTO_LOSS_TYPES)
        if self.loss_type == "kto" and self.batch_size < 2:
            raise ValueError(f"KTO needs batch_size >= 2 (its KL pairs each prompt with another "
                             f"example's completion), got {self.batch_size}")
        check_field_float("beta", self.beta, positive=True)
        for name in ("desirable_weight", "undesirable_weight"):
            check_field_float(name, getattr(self, name), positive=False)
        if self.desirable_weight == 0 and self.undesirable_weight == 0:
            raise ValueError("desirable_weight and undesirable_weight are both 0: nothing to "
                             "train")
        self.loss_options = KTOOptions(beta=self.beta, desirable_weight=self.desirable_weight,
                                       undesirable_weight=self.undesirable_weight,
                                       loss_type=self.loss_type)
        check_field_choice("reference", self.reference, REFERENCE_MODES)
        check_field_choice("kl_pairing", self.kl_pairing, KL_PAIRINGS)
        if self.reference == "precomputed" and self.kl_pairing == "batch" and self.uses_kl:
            raise ValueError("reference='precomputed' needs kl_pairing='dataset' (or 'auto'): "
                             "in-batch KL pairs change with every batch, so their reference "
                             "log-probs cannot be computed before training")

    @property
    def uses_kl(self) -> bool:
        return self.loss_options.uses_kl

    @property
    def resolved_kl_pairing(self) -> str:
        if self.kl_pairing != "auto":
            return self.kl_pairing
        return "dataset" if self.reference == "precomputed" else "batch"


def fixed_kl_partners(num_examples: int, seed: int) -> list[int]:
    """partner[i]: whose completion example i is paired with in KTO's KL batch, fixed for a run.

    A seeded permutation ``order`` of the examples, rolled by one: example ``order[k]`` gets the
    completion of ``order[k − 1]``. Nobody keeps their own completion (for n >= 2) and every
    completion is used exactly once, as within a batch in ``kto_mismatched_indices``.
    """
    if num_examples < 2:
        raise ValueError(f"KTO's KL pairs need at least 2 examples, got {num_examples}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_examples, generator=generator)
    partners = torch.empty(num_examples, dtype=torch.long)
    partners[order] = torch.roll(order, 1)
    return partners.tolist()


def _with_partners(examples: list[dict], seed: int) -> list[dict]:
    partners = fixed_kl_partners(len(examples), seed)
    return [dict(e, kl_completion_ids=examples[j]["completion_ids"])
            for e, j in zip(examples, partners)]


class KTOTrainer(ReferenceTrainer):
    """Kahneman–Tversky Optimization with TRL's loss and metrics (``fastalign.losses.kto_loss``).

    Metrics of each step, as ``kto_loss`` names them: ``loss``, ``kl`` (z_ref),
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (β·log-ratio means of the
    desirable and undesirable examples), ``logps/chosen``, ``logps/rejected``, the counts
    ``count/chosen``, ``count/rejected`` and the sums ``*_sum``; and TRL's ``logits/chosen``,
    ``logits/rejected`` (the vocabulary-mean logit over each group's completion tokens) and
    ``num_tokens``.

    Every training micro-batch has exactly ``batch_size`` examples (``drop_last``): the KL pairs
    need at least two. Evaluation batches never have a single example either (a lone last example
    joins the batch before it).

    Example::

        trainer = KTOTrainer(model, tokenizer, encode_kto(records, tokenizer),
                             KTOConfig(output_dir="out", max_steps=100, beta=0.1))
        trainer.train()
    """

    name = "kto"
    drop_last = True

    def __init__(self, model: nn.Module, tokenizer, train_examples: Sequence[dict],
                 config: KTOConfig, *, ref_model: nn.Module | None = None,
                 eval_examples: Sequence[dict] | None = None) -> None:
        train_examples, eval_examples = list(train_examples), list(eval_examples or [])
        if len(eval_examples) == 1 and config.uses_kl:
            raise ValueError("KTO needs at least 2 eval examples (its KL pairs pair each prompt "
                             "with another example's completion), got 1")
        self.kl_pairing = config.resolved_kl_pairing
        if self.kl_pairing == "dataset" and config.uses_kl:  # KTOCollator pairs with these
            if len(train_examples) >= config.batch_size:  # else the stream's clear error below
                train_examples = _with_partners(train_examples, config.seed * 2 + _PAIRING_SALT)
            if eval_examples:
                eval_examples = _with_partners(eval_examples, config.seed * 2 + 1 + _PAIRING_SALT)
        collator = KTOCollator(pad_token_id=pad_token_id(tokenizer), max_length=config.max_length,
                               with_kl=config.uses_kl)
        super().__init__(model, tokenizer, train_examples, config, collator=collator,
                         ref_model=ref_model, eval_examples=eval_examples)
        self._warn_about_weights()

    def _warn_about_weights(self) -> None:
        """The KTO paper advises w_d·n_d / (w_u·n_u) in [1, 4/3]; TRL warns outside it too."""
        config = self.config
        n_desirable = sum(bool(e["desirable"]) for e in self.train_examples)
        n_undesirable = len(self.train_examples) - n_desirable
        if n_desirable == 0 or n_undesirable == 0:
            which = "desirable" if n_desirable == 0 else "undesirable"
            warnings.warn(f"the KTO training data has no {which} example", stacklevel=3)
            return
        if config.desirable_weight == 0 or config.undesirable_weight == 0:
            return
        ratio = (config.desirable_weight * n_desirable) / (config.undesirable_weight
                                                           * n_undesirable)
        if not 1.0 <= ratio <= 4 / 3 + 1e-9:
            warnings.warn(
                f"desirable_weight × {n_desirable} desirable : undesirable_weight × "
                f"{n_undesirable} undesirable = {ratio:.3f}, outside the range [1, 4/3] the KTO "
                f"paper recommends; consider desirable_weight ≈ "
                f"{config.undesirable_weight * n_undesirable / n_desirable:.3f}", stacklevel=3)

    # -- the reference ------------------------------------------------------------------------

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """[B, 2] summed reference log-probs of each example and of its KL pair ([B, 1] without
        KL pairs)."""
        options = dict(temperature=self.config.temperature, impl=self.config.impl)
        ref = self.reference.sequence_logprobs(
            batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
            **options)
        if not self.config.uses_kl:
            return ref.sum_logps[:, None]
        ref_kl = self.reference.sequence_logprobs(
            batch["kl_input_ids"], labels=batch["kl_labels"],
            attention_mask=batch["kl_attention_mask"], **options)
        return torch.stack([ref.sum_logps, ref_kl.sum_logps], dim=1)

    # -- the loss -----------------------------------------------------------------------------

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        config = self.config
        options = dict(temperature=config.temperature, impl=config.impl)
        policy = hf.sequence_logprobs(self.model, batch["input_ids"], labels=batch["labels"],
                                      attention_mask=batch["attention_mask"],
                                      return_mean_logits=True, **options)
        ref = self.batch_reference_logps(batch)
        policy_kl_logps = ref_kl_logps = None
        if config.uses_kl:
            with torch.no_grad():  # z_ref is detached: the KL pairs need no graph
                policy_kl_logps = hf.sequence_logprobs(
                    self.model, batch["kl_input_ids"], labels=batch["kl_labels"],
                    attention_mask=batch["kl_attention_mask"], **options).sum_logps
            ref_kl_logps = ref[:, 1]
        loss, metrics = kto_loss(policy.sum_logps, ref[:, 0], policy_kl_logps, ref_kl_logps,
                                 batch["desirable"], options=config.loss_options,
                                 process_group=self.dist.group)
        return loss, metrics | mean_logits_by_side(
            policy, batch["desirable"].bool(), across_ranks=self.all_ranks_mean)

    def merge_metrics(self, parts) -> dict[str, float]:
        """Sums and counts add up over micro-batches and ranks; the means come from them."""
        merged = super().merge_metrics(parts)
        batches = self.global_micro_batches(parts)
        for side in ("chosen", "rejected"):
            count = sum(metrics[f"count/{side}"] for metrics, _ in parts)
            merged[f"count/{side}"] = count / batches
            for name in ("rewards", "logps"):
                total = sum(metrics[f"{name}/{side}_sum"] for metrics, _ in parts)
                merged[f"{name}/{side}"] = total / max(count, 1)
                merged[f"{name}/{side}_sum"] = total / batches
        if "rewards/margins" in merged:
            merged["rewards/margins"] = merged["rewards/chosen"] - merged["rewards/rejected"]
        return merged
