"""DPO and its variants (every ``loss_type`` of ``fastalign.losses.dpo_loss``) on a causal LM.

One micro-batch is B preference pairs, collated as ``[2B, T]`` with the chosen sequences stacked
on the rejected ones (``fastalign.data.PreferenceCollator``). The policy's summed response
log-probs come from the fused head (``fastalign.hf.sequence_logprobs``: backbone, then the LM-head
weight streamed by ``linear_logprobs``, no [tokens × vocab] logits); the reference's from a frozen
copy, the PEFT policy with adapters disabled, or log-probs precomputed before training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastalign import hf
from fastalign.data import PreferenceCollator
from fastalign.losses.dpo import dpo_loss
from fastalign.losses.options import DPO_LOSS_TYPES, DPOOptions
from fastalign.trainers.config import (
    REFERENCE_MODES,
    TrainingConfig,
    check_choice,
    check_float,
    option,
    pad_token_id,
)
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
    reference: str = option("auto", "the reference model: copy (a frozen copy), precomputed "
                            "(log-probs computed once), adapters (a PEFT policy with its adapters "
                            "disabled) or auto (adapters for PEFT, else copy)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.loss_type, str):
            self.loss_type = (self.loss_type,)
        names = tuple(self.loss_type)
        unknown = [name for name in names if name not in DPO_LOSS_TYPES]
        if not names or unknown:
            raise ValueError(f"loss_type must be one or more of {', '.join(DPO_LOSS_TYPES)}, got "
                             f"{self.loss_type!r}")
        check_choice("reference", self.reference, REFERENCE_MODES)
        check_float("beta", self.beta, positive=True)
        if self.loss_weights is not None:
            self.loss_weights = tuple(self.loss_weights)
        # The loss's own options object checks the rest (label smoothing and the types that use
        # it, the weights), so a bad option stops the run before training; the trainer passes it
        # whole to the loss.
        self.loss_options = DPOOptions(beta=self.beta, loss_type=names,
                                       loss_weights=self.loss_weights,
                                       label_smoothing=self.label_smoothing)


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
                         collator=PreferenceCollator(pad_token_id=pad_token_id(tokenizer)),
                         ref_model=ref_model, eval_examples=eval_examples)

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """[B, 2] summed reference log-probs of the chosen and rejected answers."""
        ref = self.reference.sequence_logprobs(
            batch["input_ids"], batch["labels"], batch["attention_mask"],
            temperature=self.config.temperature, impl=self.config.impl)
        return torch.stack(ref.sum_logps.chunk(2), dim=1)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        config = self.config
        policy = hf.sequence_logprobs(
            self.model, batch["input_ids"], batch["labels"], batch["attention_mask"],
            temperature=config.temperature, impl=config.impl)
        chosen_logps, rejected_logps = policy.sum_logps.chunk(2)
        ref = self.batch_reference_logps(batch)
        # A sequence without response tokens (truncated away) has log-prob 0: average it to 0.
        chosen_lengths, rejected_lengths = policy.lengths.clamp(min=1).chunk(2)
        chosen_nll = -chosen_logps.sum() / policy.lengths.chunk(2)[0].sum().clamp(min=1)
        return dpo_loss(
            chosen_logps, rejected_logps, ref[:, 0], ref[:, 1], chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths, chosen_nll=chosen_nll,
            options=config.loss_options,
        )


def loss_memory_report(trainer: DPOTrainer, *, pairs: int | None = None,
                       large_vocab: int | None = 128256) -> str:
    """Measured peak memory of the DPO loss on one training batch, fused against eager.

    Both start from the same final hidden states (the backbone costs the same either way) and run
    the policy's loss forward and backward: the fused head (``sequence_logprobs_from_labels`` +
    ``dpo_loss``) against TRL's eager path (``[2B, T, V]`` logits, ``log_softmax``, ``gather``,
    masked sums, the same ``dpo_loss``). The reference log-probs are taken beforehand. With
    ``large_vocab``, the same batch is measured again with a random head of that many rows (the
    default is Llama 3's vocabulary), where the [tokens × vocab] logits dominate.
    """
    from fastalign.memory import cpu_peak_supported

    device = trainer.device
    if device.type == "cpu" and not cpu_peak_supported():
        return "  loss memory: not measurable on this system (no /proc/self/clear_refs)"
    count = min(pairs or trainer.config.batch_size, len(trainer.train_examples))
    batch = trainer.batch(range(count))
    head = hf.lm_head(trainer.model)
    with torch.no_grad():
        hidden = hf.final_hidden_states(trainer.model, batch["input_ids"],
                                        batch["attention_mask"]).float()
        reference = trainer.batch_reference_logps(batch).float()
    heads = [("this model's head", head.weight.detach().float(), head.options(1.0))]
    if large_vocab:
        generator = torch.Generator(device=device).manual_seed(0)
        weight = torch.randn(large_vocab, hidden.shape[-1], generator=generator, device=device)
        heads.append((f"a random {large_vocab}-token head", weight / hidden.shape[-1] ** 0.5,
                      {"temperature": 1.0, "softcap": None}))
    tokens = batch["labels"].numel()
    lines = [f"  DPO loss memory, forward + backward from the hidden states of {count} pairs "
             f"({tokens} tokens), measured:"]
    for title, weight, options in heads:
        fused, eager = _measure_dpo_loss(trainer, hidden, weight, options, batch["labels"],
                                         reference)
        ratio = eager / fused if fused else float("inf")
        lines.append(f"    {title} (V={weight.shape[0]}): fused {fused / 2**20:.2f} MiB, "
                     f"eager logits {eager / 2**20:.2f} MiB ({ratio:.0f}x less)")
    return "\n".join(lines)


def _measure_dpo_loss(trainer: DPOTrainer, hidden, weight, options, labels, reference):
    """Peak bytes of (fused, eager) DPO loss forward + backward; checks both give one loss."""
    import torch.nn.functional as F

    from fastalign.memory import measure_peak_memory
    from fastalign.ops.sequence import sequence_logprobs_from_labels

    config = trainer.config
    weight = weight.detach().requires_grad_()

    def loss_and_backward(h, sum_logps, lengths):
        chosen, rejected = sum_logps.chunk(2)
        chosen_lengths, rejected_lengths = lengths.clamp(min=1).chunk(2)
        loss, _ = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], beta=config.beta,
                           loss_type=config.loss_type, loss_weights=config.loss_weights,
                           label_smoothing=config.label_smoothing, chosen_lengths=chosen_lengths,
                           rejected_lengths=rejected_lengths,
                           chosen_nll=-chosen.sum() / lengths.chunk(2)[0].sum().clamp(min=1))
        loss.backward()
        return loss.detach(), h.grad

    def fused():
        h = hidden.clone().requires_grad_()
        out = sequence_logprobs_from_labels(h, weight, labels, impl=config.impl, **options)
        return loss_and_backward(h, out.sum_logps, out.lengths)

    def eager():
        h = hidden.clone().requires_grad_()
        logits = h[:, :-1] @ weight.T
        if options["softcap"]:
            logits = options["softcap"] * torch.tanh(logits / options["softcap"])
        logp = F.log_softmax(logits / options["temperature"], dim=-1)
        targets = labels[:, 1:]
        mask = targets != -100
        logp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return loss_and_backward(h, (logp * mask).sum(-1), mask.sum(-1))

    (fused_loss, _), fused_bytes = measure_peak_memory(fused, trainer.device)
    weight.grad = None
    (eager_loss, _), eager_bytes = measure_peak_memory(eager, trainer.device)
    weight.grad = None
    if not torch.allclose(fused_loss, eager_loss, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"fused and eager DPO losses differ: {float(fused_loss)} vs "
                           f"{float(eager_loss)}")
    return fused_bytes, eager_bytes
