"""Measured peak memory of the DPO loss on one real batch, fused against eager: the report that
``fastalign train dpo`` (and so ``make demo``) prints at the end.

It takes the model, the batch, the reference log-probs and the loss options as arguments, and
imports nothing from ``fastalign.trainers``: the trainers call it, never the other way round.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastalign import hf
from fastalign.bench.memory import (
    cpu_peak_supported,
    map_large_blocks_directly,
    measure_peak_memory,
)
from fastalign.fused import FusedDPOLoss
from fastalign.losses.dpo import dpo_loss
from fastalign.losses.options import DPOOptions
from fastalign.ops.sequence import sequence_logprobs_from_labels


def loss_memory_report(model: torch.nn.Module, batch: dict, reference_logps: torch.Tensor, *,
                       options: DPOOptions, impl: str = "auto",
                       large_vocab: int | None = 128256,
                       gradients_in_forward: bool = True) -> str:
    """Peak memory of the DPO loss forward + backward on ``batch``, fused against eager.

    ``batch`` is a collated preference batch (``input_ids``, ``attention_mask``, ``labels``
    [2B, T], chosen rows first) on the model's device; ``reference_logps`` [B, 2] the reference's
    summed log-probs of the chosen and rejected answers; ``options`` the loss's.

    Every path starts from the same final hidden states (the backbone costs the same either
    way) and runs the policy's loss forward and backward: the fused head, with the gradients
    formed in forward (``FusedDPOLoss``) and streamed (``sequence_logprobs_from_labels`` +
    ``dpo_loss``), against TRL's eager path (``[2B, T, V]`` logits, ``log_softmax``,
    ``gather``, masked sums, the same ``dpo_loss``). ``gradients_in_forward`` says which fused
    step the trainer takes: it comes first, and eager is compared with it. With ``large_vocab``,
    the same batch is measured again with a random head of that many rows (the default is Llama
    3's vocabulary), where the [tokens × vocab] logits dominate.
    """
    labels = batch["labels"]
    device = labels.device
    if device.type == "cpu" and not cpu_peak_supported():
        return "  loss memory: not measurable on this system (no /proc/self/clear_refs)"
    if device.type == "cpu":
        # After a training run glibc keeps blocks below its raised mmap threshold in its heaps:
        # the first path measured would pay for the heap's history, the next reuse it.
        map_large_blocks_directly()
    head = hf.lm_head(model)
    with torch.no_grad():
        hidden = hf.final_hidden_states(model, batch["input_ids"],
                                        attention_mask=batch["attention_mask"]).float()
        reference = reference_logps.detach().float()
    heads = [("this model's head", head.weight.detach().float(), head.options(1.0))]
    if large_vocab:
        generator = torch.Generator(device=device).manual_seed(0)
        weight = torch.randn(large_vocab, hidden.shape[-1], generator=generator, device=device)
        heads.append((f"a random {large_vocab}-token head", weight / hidden.shape[-1] ** 0.5,
                      {"temperature": 1.0, "softcap": None}))
    lines = [f"  DPO loss memory, forward + backward from the hidden states of "
             f"{labels.shape[0] // 2} pairs ({labels.numel()} tokens), measured:"]
    for title, weight, head_options in heads:
        measured = _measure_dpo_loss(hidden, weight, head_options, labels, reference, options,
                                     impl)
        steps = ["gradients in forward", "streamed"]
        if not gradients_in_forward:
            steps.reverse()
        fused, other, eager = measured[steps[0]], measured[steps[1]], measured["eager"]
        ratio = eager / fused if fused else float("inf")
        lines.append(f"    {title} (V={weight.shape[0]}): fused {fused / 2**20:.2f} MiB "
                     f"({steps[0]}; {steps[1]} {other / 2**20:.2f} MiB), eager logits "
                     f"{eager / 2**20:.2f} MiB ({ratio:.0f}x less)")
    return "\n".join(lines)


def _measure_dpo_loss(hidden, weight, head_options, labels, reference, options, impl):
    """Peak bytes of the DPO loss forward + backward by each path ("gradients in forward",
    "streamed", "eager"); checks that they give one loss."""
    weight = weight.detach().requires_grad_()

    def loss_and_backward(h, sum_logps, lengths):
        chosen, rejected = sum_logps.chunk(2)
        chosen_lengths, rejected_lengths = lengths.clamp(min=1).chunk(2)
        loss, _ = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], options=options,
                           chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                           chosen_nll=-chosen.sum() / lengths.chunk(2)[0].sum().clamp(min=1))
        loss.backward()
        return loss.detach(), h.grad

    def streamed():
        h = hidden.clone().requires_grad_()
        out = sequence_logprobs_from_labels(h, weight, labels, impl=impl, **head_options)
        return loss_and_backward(h, out.sum_logps, out.lengths)

    def eager():
        h = hidden.clone().requires_grad_()
        logits = h[:, :-1] @ weight.T
        if head_options["softcap"]:
            logits = head_options["softcap"] * torch.tanh(logits / head_options["softcap"])
        logp = F.log_softmax(logits / head_options["temperature"], dim=-1)
        targets = labels[:, 1:]
        mask = targets != -100
        logp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return loss_and_backward(h, (logp * mask).sum(-1), mask.sum(-1))

    def in_forward():
        h = hidden.clone().requires_grad_()
        loss, _ = FusedDPOLoss(options=options, impl=impl, **head_options)(
            h, weight, labels, ref_chosen_logps=reference[:, 0],
            ref_rejected_logps=reference[:, 1])
        loss.backward()
        return loss.detach(), h.grad

    losses, peaks = {}, {}
    for name, step in (("gradients in forward", in_forward), ("streamed", streamed),
                       ("eager", eager)):
        (losses[name], _), peaks[name] = measure_peak_memory(step, hidden.device)
        weight.grad = None
    for name, loss in losses.items():
        if not torch.allclose(loss, losses["eager"], rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"the {name} and eager DPO losses differ: {float(loss)} vs "
                               f"{float(losses['eager'])}")
    return peaks
