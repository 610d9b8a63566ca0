"""Reward-model training: the Bradley–Terry pairwise loss on a scalar sequence-classifier head.

The model is an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (the backbone of a
causal LM plus a [1, H] ``score`` head read at each sequence's last token). One micro-batch is B
preference pairs collated as ``[2B, T]`` by ``fastalign.data.PreferenceCollator`` (chosen rows on
top of rejected rows); the scores are ``model(input_ids, attention_mask).logits[:, 0]`` and the
loss is ``fastalign.losses.reward_loss``. The causal LM head is not used at all, so there are no
[tokens × vocab] logits to avoid and no fused op is needed: this trainer is plain PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastalign.data import PreferenceCollator
from fastalign.losses.reward import reward_loss
from fastalign.trainers.config import TrainingConfig, option, pad_token_id
from fastalign.trainers.loop import Trainer

__all__ = ["RewardConfig", "RewardTrainer"]


@dataclass
class RewardConfig(TrainingConfig):
    """Reward-model options on top of :class:`TrainingConfig` (TRL's names)."""

    center_rewards_coefficient: float | None = option(
        None, "weight of the mean squared (chosen + rejected) reward, which keeps rewards "
        "centred on zero (about 0.01; 'none': no centring)")

    def __post_init__(self) -> None:
        super().__post_init__()
        c = self.center_rewards_coefficient
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float))
                              or not math.isfinite(c) or c < 0):
            raise ValueError(f"center_rewards_coefficient must be a finite number >= 0 or None, "
                             f"got {c!r}")


class RewardTrainer(Trainer):
    """A Bradley–Terry reward model (InstructGPT; TRL's ``RewardTrainer``).

    ``loss = mean[−log σ(r_chosen − r_rejected)] + c·mean[(r_chosen + r_rejected)²]`` with c the
    ``center_rewards_coefficient``. Metrics of each step, ``reward_loss``'s: TRL's ``accuracy``
    (fraction of pairs with r_chosen > r_rejected, ties wrong), ``margin`` (mean r_chosen −
    r_rejected), ``min_reward``, ``mean_reward``, ``max_reward`` and ``num_tokens``, and
    ``rewards/chosen``, ``rewards/rejected`` (mean rewards of each side).

    The classifier reads its score at the last token that is not ``config.pad_token_id``; the
    batches are padded with that id (set from the tokenizer when the model has none), so the score
    is read at the last real token of every row.

    Example::

        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1)
        trainer = RewardTrainer(model, tokenizer, encode_preference(records, tokenizer),
                                RewardConfig(output_dir="out", max_steps=100))
        trainer.train()
    """

    name = "rm"

    def __init__(self, model: nn.Module, tokenizer, train_examples: Sequence[dict],
                 config: RewardConfig, *, eval_examples: Sequence[dict] | None = None) -> None:
        model_config = model.config
        if getattr(model_config, "num_labels", 1) != 1:
            raise ValueError(f"the reward model must be a sequence classifier with one output "
                             f"(AutoModelForSequenceClassification, num_labels=1), got "
                             f"{type(model).__name__} with num_labels={model_config.num_labels}")
        pad = getattr(model_config, "pad_token_id", None)
        if pad is None:  # the classifier finds each row's last token through the pad id
            pad = pad_token_id(tokenizer)
            model_config.pad_token_id = pad
        super().__init__(model, tokenizer, train_examples, config,
                         collator=PreferenceCollator(pad_token_id=int(pad)),
                         eval_examples=eval_examples)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"], use_cache=False).logits
        if logits.dim() != 2 or logits.shape[1] != 1:
            raise ValueError(f"the reward model must give one score per sequence ([N, 1] logits, "
                             f"AutoModelForSequenceClassification with num_labels=1), got logits "
                             f"of shape {tuple(logits.shape)}")
        scores = logits[:, 0]
        chosen, rejected = scores.chunk(2)
        return reward_loss(chosen, rejected,
                           center_coefficient=self.config.center_rewards_coefficient)

    def merge_metrics(self, parts) -> dict[str, float]:
        """``min_reward`` and ``max_reward`` of the whole step, not means of micro-batches'."""
        merged = super().merge_metrics(parts)
        for key, pick in (("min_reward", min), ("max_reward", max)):
            if parts:
                merged[key] = pick(metrics[key] for metrics, _ in parts)
        return merged
