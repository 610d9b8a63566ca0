"""Supervised fine-tuning (SFT) of a causal LM, its logits never formed.

One micro-batch is B (prompt, completion) examples collated by ``fastalign.data.SFTCollator``
(right padding; ``labels`` are the completion ids, -100 on prompt and padding). The loss is TRL's
``SFTTrainer`` loss: the negative log-likelihood averaged over every scored token of the
micro-batch (a token mean, not a mean of per-sequence means). The loss comes from the fused
head: the backbone's hidden states and the LM-head weight go to ``linear_nll``, which forms the
head's gradients in the forward pass (6·N·H·V FLOPs instead of linear_logprobs' 8) and never
holds the [tokens × vocab] logits. With ``padding_free`` the
micro-batch is one unpadded row [1, total] with ``cu_seqlens``; with ``assistant_only_loss`` the
examples' ``assistant_mask`` (``encode_sft``) leaves only the assistant turns scored; with
``packing`` the training examples are first grouped into rows of at most ``max_length`` tokens
(``fastalign.data.pack_examples``), a micro-batch being ``batch_size`` such rows, padding free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastalign import hf
from fastalign.data import SFTCollator, pack_examples
from fastalign.ops.linear_nll import linear_nll
from fastalign.ops.sequence import next_token_targets, packed_position_ids
from fastalign.trainers.config import PADDING_FREE_HELP, TrainingConfig, option, pad_token_id
from fastalign.trainers.loop import Trainer

__all__ = ["SFTConfig", "SFTTrainer"]

IGNORE_INDEX = -100


@dataclass
class SFTConfig(TrainingConfig):
    """SFT options on top of :class:`TrainingConfig` (TRL's names)."""

    completion_only_loss: bool = option(True, "score only the completion of prompt/completion "
                                        "data (false: the prompt's tokens too); text and "
                                        "messages data score every token either way")
    assistant_only_loss: bool = option(False, "score only the assistant turns of messages "
                                       "data (their content and end of turn), found by "
                                       "rendering the chat template turn by turn")
    padding_free: bool = option(False, PADDING_FREE_HELP)
    packing: bool = option(False, "pack the training examples into rows of at most max-length "
                           "tokens (best fit, examples kept whole; batch-size counts rows), "
                           "trained padding free")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.completion_only_loss, bool):
            raise ValueError(f"completion_only_loss must be true or false, got "
                             f"{self.completion_only_loss!r}")
        if self.assistant_only_loss and not self.completion_only_loss:
            raise ValueError("assistant_only_loss scores the assistant turns only, "
                             "completion_only_loss=false every token: set one of them")


class SFTTrainer(Trainer):
    """Supervised fine-tuning with TRL's token-mean NLL, through the fused head.

    Metrics of each step (TRL's names): ``loss`` (mean NLL per scored token), ``num_tokens``
    (the input tokens trained on so far, prompts included, a running total as TRL counts it),
    ``entropy`` (mean entropy of the next-token distribution over the scored positions) and
    ``mean_token_accuracy`` (the fraction of scored tokens that are the arg-max of their
    distribution). Both come from ``linear_nll``'s own pass over each row of logits: no extra
    matrix product (in eval, without gradients, they cost linear_argmax's forward pass).

    Example::

        trainer = SFTTrainer(model, tokenizer, encode_sft(records, tokenizer, max_length=512),
                             SFTConfig(output_dir="out", max_steps=100))
        trainer.train()
    """

    name = "sft"

    def __init__(self, model: nn.Module, tokenizer, train_examples: Sequence[dict],
                 config: SFTConfig, *, eval_examples: Sequence[dict] | None = None) -> None:
        if config.assistant_only_loss:
            unmasked = sum("assistant_mask" not in e
                           for e in (*train_examples, *(eval_examples or ())))
            if unmasked:
                raise ValueError(f"assistant_only_loss: {unmasked} examples carry no "
                                 f"assistant_mask; encode them with encode_sft(..., "
                                 f"assistant_only_loss=True)")
        if config.packing:
            train_examples = pack_examples(train_examples, config.max_length)
        padding_free = config.padding_free or config.packing
        super().__init__(model, tokenizer, train_examples, config,
                         collator=SFTCollator(pad_token_id=pad_token_id(tokenizer),
                                              padding_free=padding_free),
                         eval_examples=eval_examples)
        if padding_free:
            hf.check_packed_attention(self.model)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        config = self.config
        input_ids, labels = batch["input_ids"], batch["labels"]
        attention_mask, cu_seqlens = batch.get("attention_mask"), batch.get("cu_seqlens")
        if not config.completion_only_loss:  # every attended (padding free: every) token
            labels = input_ids if attention_mask is None else torch.where(
                attention_mask.bool(), input_ids, IGNORE_INDEX)
        model_kwargs = {}
        if cu_seqlens is not None:  # positions restart at each packed sequence
            model_kwargs["position_ids"] = packed_position_ids(
                cu_seqlens.to(input_ids.device), input_ids.shape[1])[None]
        hidden = hf.final_hidden_states(self.model, input_ids, attention_mask=attention_mask,
                                        **model_kwargs)
        # Each position's target is the next label of its sequence; only the scored positions
        # go to the head (prompts and padding cost nothing there).
        targets = next_token_targets(labels.reshape(-1) if cu_seqlens is not None else labels,
                                     cu_seqlens=cu_seqlens).reshape(-1)
        scored = targets != IGNORE_INDEX
        targets = targets[scored]
        head = hf.lm_head(self.model)
        rows, weight, bias = hf.head_inputs(hidden.reshape(-1, hidden.shape[-1])[scored], head)
        num_tokens = scored.sum()
        # The mean over every rank's tokens: gradients are averaged over ranks, so each rank
        # divides its sum by the ranks' mean token count (its own count in one process).
        # A micro-batch whose completions were all truncated away has loss 0, not NaN.
        normaliser = self.all_ranks_mean(num_tokens.float()).clamp(min=1)
        with hf.no_autocast(rows.device.type):
            loss, entropy, predictions = linear_nll(
                rows, weight, targets, bias=bias, num_items_in_batch=normaliser,
                return_metrics=True, impl=config.impl, **head.options(config.temperature))
        with torch.no_grad():
            entropy = entropy.sum() / num_tokens.clamp(min=1)
            accuracy = (predictions == targets).sum() / num_tokens.clamp(min=1)
        return loss, {"entropy": entropy, "mean_token_accuracy": accuracy}
