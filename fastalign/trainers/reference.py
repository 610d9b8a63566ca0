"""The frozen reference policy π_ref of DPO, KTO and PPO, and the trainer base that uses it.

:class:`ReferencePolicy` hides which of three forms the reference takes (a frozen copy, the PEFT
policy with its adapters disabled, or log-probs computed once before training);
:class:`ReferenceTrainer` adds the precomputed tables to the loop's checkpoints, so that a
resumed run needs no reference model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from fastalign import SequenceLogprobs, hf
from fastalign.ops._checks import (
    check_field_choice,
)
from fastalign.trainers.config import (
    REFERENCE_MODES,
    TrainingConfig,
)
from fastalign.trainers.loop import Trainer

__all__ = ["ReferencePolicy", "ReferenceTrainer"]


class ReferencePolicy:
    """The frozen reference π_ref of DPO, KTO and PPO, in one of three forms.

    * ``copy``: a frozen model (``ref_model``, or a deep copy of the policy at the start).
    * ``adapters``: the policy itself, a PEFT model, with its LoRA adapters disabled: no second
      copy of the weights at all.
    * ``precomputed``: log-probs computed once before training (by a copy that is then freed);
      the trainer stores them per example. Only sequence-level statistics can be precomputed.

    ``auto`` is ``adapters`` for a PEFT policy and ``copy`` otherwise.
    """

    def __init__(self, policy: nn.Module, ref_model: nn.Module | None, mode: str, *,
                 device: torch.device | None = None):
        check_field_choice("reference", mode, REFERENCE_MODES)
        if mode == "auto":
            mode = "adapters" if ref_model is None and hf.is_peft_model(policy) else "copy"
        if mode == "adapters":
            if ref_model is not None:
                raise ValueError("reference='adapters' uses the policy with its adapters "
                                 "disabled; do not pass ref_model as well")
            if not hf.is_peft_model(policy):
                raise ValueError("reference='adapters' needs a PEFT (LoRA) policy; use "
                                 "reference='copy' or 'precomputed' for a full model")
        self.mode, self.policy = mode, policy
        self.model = None
        if mode in ("copy", "precomputed"):
            self.model = ref_model if ref_model is not None else copy.deepcopy(policy)
            self.model.requires_grad_(False)
            self.model.eval()
            if device is not None:
                self.model.to(device)

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """The reference model to run, in eval mode and without autograd."""
        if self.model is not None:
            with torch.no_grad():
                yield self.model
            return
        was_training = self.policy.training
        self.policy.eval()  # no dropout in the reference pass
        try:
            with torch.no_grad(), hf.adapters_disabled(self.policy):
                yield self.policy
        finally:
            self.policy.train(was_training)

    def sequence_logprobs(self, input_ids, **options) -> SequenceLogprobs:
        """``hf.sequence_logprobs`` of the reference (``labels=``, ``attention_mask=``, ...)."""
        with self.active() as model:
            return hf.sequence_logprobs(model, input_ids, **options)

    def release(self) -> None:
        """Free the copy once precomputed log-probs have been taken."""
        self.model = None


class ReferenceTrainer(Trainer):
    """A trainer whose loss compares the policy with a frozen reference (DPO, KTO).

    It holds the :class:`ReferencePolicy` and, with ``config.reference == "precomputed"``, the
    tables of reference log-probs computed once before training (``[n, k]`` per split, rows in
    example order), which checkpoints carry so that a resumed run needs no reference model.
    Subclasses write ``reference_logps(batch)`` ([B, k], from the reference model) and read the
    batch's values through ``batch_reference_logps``.
    """

    def __init__(self, model: nn.Module, tokenizer, train_examples: Sequence[dict],
                 config: TrainingConfig, *, collator: Callable[[list[dict]], dict],
                 ref_model: nn.Module | None = None,
                 eval_examples: Sequence[dict] | None = None) -> None:
        super().__init__(model, tokenizer, train_examples, config, collator=collator,
                         eval_examples=eval_examples)
        self.reference = ReferencePolicy(self.model, ref_model, config.reference,
                                         device=self.device)
        self.precomputed: dict[str, torch.Tensor] = {}

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """[B, k] reference log-probs of the batch's examples, from the reference model."""
        raise NotImplementedError

    def batch_reference_logps(self, batch: dict) -> torch.Tensor:
        """The batch's rows of the precomputed table, or ``reference_logps`` without one."""
        if self.precomputed:
            return self.precomputed[batch["split"]].to(self.device)[batch["indices"]]
        return self.reference_logps(batch)

    def before_training(self) -> None:
        if self.reference.mode == "precomputed":
            self.precomputed = {"train": self._reference_table(self.train_examples)}
            if self.eval_examples:
                self.precomputed["eval"] = self._reference_table(self.eval_examples)
            self.reference.release()

    def extra_state(self) -> dict[str, Any]:
        return {"precomputed": self.precomputed}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.precomputed = state.get("precomputed", {})
        if self.reference.mode == "precomputed":
            self.reference.release()

    def _reference_table(self, examples: Sequence[dict]) -> torch.Tensor:
        rows = []
        size = self.config.batch_size
        for start in range(0, len(examples), size):
            batch = self.batch(range(start, min(start + size, len(examples))), examples)
            with self.autocast():  # every rank computes the whole table (it is small)
                rows.append(self.engine(self.reference_logps, batch).float().cpu())
        return torch.cat(rows)
