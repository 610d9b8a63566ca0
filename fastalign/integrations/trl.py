"""TRL's trainers with fastalign's fused LM head: ``from fastalign.integrations.trl import
DPOTrainer`` instead of ``from trl import DPOTrainer``.

TRL 1.16's ``SFTTrainer``, ``DPOTrainer``, ``KTOTrainer``, ``GRPOTrainer`` and ``RLOOTrainer``
never ask the model for logits: at construction each gives its policy (and reference) a second
forward, ``model(..., labels=labels, fused_lm_head=True)``, through
``trl.trainer.utils.add_fused_lm_head``. That forward runs the backbone and hands the final hidden
states and the head to TRL's chunked log-prob function, and returns per-token ``log_probs``
(and, as the trainer asks, ``entropy``, ``mean_logits``, ``is_top1``, ``log_sum_sq_probs``) with
the loss; every TRL loss and metric is computed from those.

The subclasses here are those trainers, unchanged (same constructors, configs, losses, metric
names, callbacks), except that the head they install is :func:`add_fused_lm_head` of this
module: the same contract, computed by ``fastalign.linear_logprobs`` (the C++ kernel on CPU,
Triton on CUDA), which holds no [tokens × chunk of the vocabulary] tile in memory, where TRL's
function holds up to 4096 × 32768 float32 logits (512 MiB) in forward and again in backward.
The statistics without gradient (``mean_logits``, ``is_top1``, ``log_sum_sq_probs``) come from
one extra tiled pass, ``fastalign.linear_logit_stats``.

What is refused, at construction, because it would need the logits after all or a path we do not
implement; stock TRL would materialise the logits or compute something else:

* ``compute_metrics`` / ``preprocess_logits_for_metrics`` (SFT, DPO, KTO): they receive the
  logits;
* SFT's ``compute_loss_func`` (it receives the model's outputs with logits) and
  ``label_smoothing_factor`` (label smoothing over the whole vocabulary);
* MoE models whose config asks for router logits (the load-balancing loss the fused head adds);
* a LoRA adapter (or ``modules_to_save``) on the LM head, a quantised head, and heads with both
  a logit scale and a final-logit softcap (``fastalign.hf.lm_head`` says which).

TRL is optional: ``pip install fastalign[trl]``; ``import fastalign`` never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from typing import Iterator

import torch
from torch import nn

try:
    import trl
    from trl.trainer import dpo_trainer, grpo_trainer, kto_trainer, rloo_trainer, sft_trainer
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("fastalign.integrations.trl needs TRL: pip install 'fastalign[trl]'"
                      ) from error

import fastalign.hf as hf
from fastalign.ops.linear_argmax import LogitStats, linear_logit_stats
from fastalign.ops.linear_logprobs import linear_logprobs

__all__ = ["DPOTrainer", "GRPOTrainer", "KTOTrainer", "RLOOTrainer", "SFTTrainer",
           "add_fused_lm_head"]

IGNORE_INDEX = -100
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_MARK = "_fastalign_fused_lm_head"


def add_fused_lm_head(
    model: nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """``trl.trainer.utils.add_fused_lm_head`` computed by fastalign's fused ops.

    Afterwards ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's
    ``FusedCausalLMOutput``: per-token fields of shape [B, T − 1] (labels shifted inside), or
    [B, T] with ``shift_labels=``, zero where the label is -100, and ``loss`` the summed negative
    log-likelihood divided by ``num_items_in_batch`` (or by the count of scored tokens). Without
    ``fused_lm_head=True`` the model's own forward runs (generation is unchanged).

    Args:
        model: a transformers causal LM (the base model under PEFT: the trainers pass that).
        temperature: divides the logits (after the model's logit scale and softcap).
        cast_lm_head_to_fp32: run the head in float32, outside autocast.
        outputs: the per-token fields to compute, among ``OUTPUTS``; ``log_probs`` always is.

    Raises:
        ValueError: an unknown output name.
        TypeError / NotImplementedError: a head or model fastalign cannot fuse (see the module
            docstring), said now rather than at the first step.
    """
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ValueError(f"outputs: unknown field(s) {unknown}; expected some of {OUTPUTS}")
    hf.lm_head(model).options(temperature)  # an unsupported head or temperature: refused now
    hf.backbone(model)
    if getattr(hf._text_config(model), "output_router_logits", False):
        raise NotImplementedError(
            "this MoE model's config sets output_router_logits: the router load-balancing loss "
            "is not computed by fastalign's fused LM head; set config.output_router_logits = "
            "False or train with stock TRL")
    original_forward = model.forward

    # The class's signature: generate() and Trainer's column filter read it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels,
                     "num_items_in_batch": num_items_in_batch}
            return original_forward(*args, **kwargs,
                                    **{k: v for k, v in extra.items() if v is not None})
        return _fused_outputs(self, args, kwargs, labels, shift_labels, num_items_in_batch,
                              temperature=temperature, in_fp32=cast_lm_head_to_fp32,
                              outputs=outputs)

    setattr(forward, _MARK, True)
    model.forward = types.MethodType(forward, model)


def _fused_outputs(model, args, kwargs, labels, shift_labels, num_items_in_batch, *,
                   temperature, in_fp32, outputs) -> FusedCausalLMOutput:
    kwargs["use_cache"] = False
    for unused in ("logits_to_keep", "return_dict", "output_router_logits"):
        kwargs.pop(unused, None)
    # Looked up at each call: FSDP and PEFT replace modules after the head is added.
    hidden = hf.backbone(model)(*args, return_dict=True, **kwargs).last_hidden_state
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    head = hf.lm_head(model)
    weight, bias = _full(head.weight), None if head.bias is None else _full(head.bias)
    hidden, targets = hidden.to(weight.device), targets.to(weight.device)
    scored = targets != IGNORE_INDEX
    rows, row_targets = hidden[scored], targets[scored].long()
    if in_fp32:
        rows, weight = rows.float(), weight.float()
        bias = None if bias is None else bias.float()
    else:
        rows, weight, bias = hf.head_inputs(rows, dataclasses.replace(head, weight=weight,
                                                                          bias=bias))
    options = head.options(temperature)
    with hf.no_autocast(rows.device.type):
        # The entropy costs the kernels one multiply-add per logit: always computed, kept when
        # asked for.
        log_probs, entropy = linear_logprobs(rows, weight, row_targets, bias=bias,
                                             return_entropy=True, **options)
        wanted = {"argmax": "is_top1" in outputs, "mean_logits": "mean_logits" in outputs,
                  "log_sum_sq_probs": "log_sum_sq_probs" in outputs}
        stats = LogitStats(None, None, None)
        if any(wanted.values()):  # one more pass over the head, without gradient
            stats = linear_logit_stats(rows.detach(), weight.detach(), **options, **wanted,
                                       bias=None if bias is None else bias.detach())

    def per_position(values):
        # masked_scatter keeps a batch without any scored token connected to the graph: its
        # loss is a differentiable zero, as in TRL.
        if values is None:
            return None
        return values.new_zeros(scored.shape).masked_scatter(scored, values)

    log_probs = per_position(log_probs.float())
    denominator = scored.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(log_probs.device)
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / denominator,
        log_probs=log_probs,
        entropy=per_position(entropy.float() if "entropy" in outputs else None),
        log_sum_sq_probs=per_position(_float(stats.log_sum_sq_probs)),
        mean_logits=per_position(_float(stats.mean_logits)),
        is_top1=per_position(None if stats.argmax is None else stats.argmax == row_targets),
        label_mask=scored,
    )


def _float(values):
    return None if values is None else values.float()


def _full(parameter: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded (DTensor) parameter, differentiably."""
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


@contextlib.contextmanager
def _fastalign_head(trainer_module: types.ModuleType) -> Iterator[None]:
    """Within the block, the trainer module's ``add_fused_lm_head`` is ours.

    TRL's trainers call the function by the name they imported at module level, with the
    arguments each needs (temperature, float32 head, which outputs); swapping the name for the
    constructor's duration gives our head exactly those arguments.
    """
    stock = trainer_module.add_fused_lm_head
    trainer_module.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        trainer_module.add_fused_lm_head = stock


def _uses_fastalign_head(model: nn.Module) -> bool:
    base = model.get_base_model() if hf.is_peft_model(model) else model
    return getattr(getattr(base.forward, "__func__", None), _MARK, False)


class _FastalignHead:
    """Constructs the TRL trainer it is mixed into with fastalign's fused LM head."""

    _trl_module: types.ModuleType
    _logits_options: tuple[str, ...] = ("compute_metrics", "preprocess_logits_for_metrics")

    def __init__(self, *args, **kwargs):
        with _fastalign_head(self._trl_module):
            super().__init__(*args, **kwargs)
        if not _uses_fastalign_head(self.model):
            raise RuntimeError(
                f"{type(self).__name__}: TRL {trl.__version__} did not install its fused LM head "
                "through trainer_module.add_fused_lm_head; this fastalign supports TRL 1.16")
        self._refuse_logits_options()

    def _refuse_logits_options(self) -> None:
        for name in self._logits_options:
            if getattr(self, name, None) is not None:
                raise ValueError(
                    f"{type(self).__name__}: {name} receives the model's logits, which "
                    "fastalign's fused LM head never forms; leave it unset (TRL's own metrics "
                    "are logged) or use trl's trainer")


class SFTTrainer(_FastalignHead, trl.SFTTrainer):
    """``trl.SFTTrainer`` whose log-probs, entropies and token accuracy come from fastalign."""

    _trl_module = sft_trainer
    _logits_options = (*_FastalignHead._logits_options, "compute_loss_func")

    def _refuse_logits_options(self) -> None:
        super()._refuse_logits_options()
        if self.args.label_smoothing_factor:
            raise ValueError(
                "SFTTrainer: label_smoothing_factor needs the log-probabilities of the whole "
                "vocabulary, which fastalign's fused LM head never forms; set it to 0")


class DPOTrainer(_FastalignHead, trl.DPOTrainer):
    """``trl.DPOTrainer`` whose policy and reference log-probs come from fastalign."""

    _trl_module = dpo_trainer


class KTOTrainer(_FastalignHead, trl.KTOTrainer):
    """``trl.KTOTrainer`` whose policy and reference log-probs come from fastalign."""

    _trl_module = kto_trainer


class GRPOTrainer(_FastalignHead, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose log-probs and entropies come from fastalign."""

    _trl_module = grpo_trainer
    _logits_options = ()


class RLOOTrainer(_FastalignHead, trl.RLOOTrainer):
    """``trl.RLOOTrainer`` whose log-probs and entropies come from fastalign."""

    _trl_module = rloo_trainer
    _logits_options = ()
