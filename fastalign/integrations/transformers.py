"""``patch_model``: a Hugging Face causal LM whose ``labels=`` loss never forms the logits.

``model(input_ids, labels=labels)`` normally runs the LM head on every position, holds [B, T, V]
logits (an fp32 copy for the loss, and more in backward) and takes their cross-entropy. After
``patch_model(model)`` the same call runs the backbone, hands the final hidden states and the
head's weight to ``fastalign.linear_nll`` (which streams over the vocabulary, and forms the
gradients in the forward pass) and returns the same loss with ``logits=None``; gradients reach
every parameter, the head included.

What it keeps of transformers' loss (``ForCausalLMLoss``): labels are shifted by one inside
(or, with ``shift_labels=`` given too, taken from that, already shifted), ``ignore_index`` -100
is left out, the loss is the mean over the scored tokens, or their sum divided by
``num_items_in_batch`` when that is passed
(``transformers.Trainer`` passes it under gradient accumulation, so that every micro-batch is
normalised by the whole step's token count). The head's final-logit softcap (Gemma 2/3) and logit
scale (Cohere, Granite, ...) are applied as the model applies them (``fastalign.hf.lm_head``).

When the fused path is not taken, the model's own forward runs unchanged: without labels, and
in eval mode (as Liger-Kernel does, because evaluation loops such as ``Trainer.evaluate`` often
need the logits for their metrics; a loss-only evaluation can call ``model.train()`` around it,
or use ``fastalign.hf``). ``unpatch_model`` restores the original forward.
"""

from __future__ import annotations

import dataclasses
import inspect
import types

import torch
from torch import nn

import fastalign.hf as hf
from fastalign.ops._backends import IMPLEMENTATIONS
from fastalign.ops._checks import check_field_choice
from fastalign.ops.linear_nll import linear_nll

__all__ = ["is_patched", "patch_model", "unpatch_model"]

IGNORE_INDEX = -100
_ORIGINAL = "_fastalign_original_forward"


def _patched_module(model: nn.Module) -> nn.Module:
    """The transformers model whose forward is replaced (inside a PEFT wrapper, its base model:
    PEFT's forward calls it, so adapters and the fused loss both apply)."""
    return model.get_base_model() if hf.is_peft_model(model) else model


def is_patched(model: nn.Module) -> bool:
    return _ORIGINAL in vars(_patched_module(model))


def patch_model(model: nn.Module, *, impl: str = "auto") -> nn.Module:
    """Make ``model(..., labels=labels)`` compute its loss through the fused op; returns ``model``.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``; Llama, Qwen2/3, Mistral,
            Gemma 2/3, GPT-2, Phi-3 and the others ``fastalign.hf`` reads), or a PEFT model
            wrapping one. Patching twice is a no-op.
        impl: the fused op's implementation ("auto": Triton on CUDA, C++ on CPU).

    Raises:
        TypeError: the model has no separate backbone or no plain linear head (a quantised or
            LoRA-adapted head), said when patching rather than at the first step.
    """
    check_field_choice("impl", impl, IMPLEMENTATIONS)
    target = _patched_module(model)
    hf.lm_head(model)  # refuse an unsupported head or logit scale now, not at the first step
    hf.backbone(model)
    if is_patched(model):
        return model
    original = target.forward  # bound: a class method, or a hook's instance-level wrapper
    signature = inspect.signature(original)

    def forward(self, *args, **kwargs):
        if not self.training:
            return original(*args, **kwargs)
        try:  # the call's arguments by name, whatever the model's parameter order (GPT-2's)
            arguments = dict(signature.bind(*args, **kwargs).arguments)
        except TypeError:
            return original(*args, **kwargs)  # let the model say what is wrong with the call
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        if arguments.get("labels") is None:  # as transformers: no labels, no loss
            return original(*args, **kwargs)
        return _fused_forward(self, arguments, impl)

    # Callers read the forward's signature: transformers.Trainer keeps only the dataset columns
    # it names and passes num_items_in_batch only to a forward taking **kwargs.
    forward.__signature__ = signature.replace(parameters=[
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *signature.parameters.values()])
    vars(target)[_ORIGINAL] = original
    target.forward = types.MethodType(forward, target)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore the forward ``patch_model`` replaced; returns ``model``."""
    target = _patched_module(model)
    if is_patched(model):
        original = vars(target).pop(_ORIGINAL)
        if getattr(original, "__self__", None) is target and \
                original.__func__ is type(target).forward:
            del target.forward  # the class's own forward again
        else:
            target.forward = original  # an instance-level wrapper (e.g. accelerate's hooks)
    return model


def _fused_forward(model, arguments: dict, impl: str):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels, shift_labels = arguments.pop("labels", None), arguments.pop("shift_labels", None)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    for unused in ("logits_to_keep", "return_dict"):  # no logits are kept; outputs are a dict
        arguments.pop(unused, None)
    arguments.setdefault("use_cache", False)  # training keeps no key/value cache
    input_ids = arguments.get("input_ids")
    if input_ids is not None:
        hf._check_batch(model, input_ids, arguments.get("attention_mask"),
                        arguments.get("position_ids"))
    outputs = hf.backbone(model)(return_dict=True, **arguments)
    hidden = outputs.last_hidden_state
    targets = _shifted_targets(labels, shift_labels, hidden.shape[:2])
    loss = _fused_loss(model, hidden, targets, num_items_in_batch, impl)
    # The backbone's other outputs (the cache: ``past_key_values`` before transformers 5,
    # ``cache`` after; hidden states, attentions), under the names this version uses.
    fields = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
    carried = {key: value for key, value in outputs.items() if key in fields}
    return CausalLMOutputWithPast(**(carried | {"loss": loss, "logits": None}))


def _shifted_targets(labels, shift_labels, shape) -> torch.Tensor:
    """[B, T]: the token each position predicts (labels moved left by one, -100 at the end)."""
    if shift_labels is None:
        if tuple(labels.shape) != tuple(shape):
            raise ValueError(f"labels must have input_ids' shape {tuple(shape)}, got "
                             f"{tuple(labels.shape)}")
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    elif tuple(shift_labels.shape) != tuple(shape):
        raise ValueError(f"shift_labels must have input_ids' shape {tuple(shape)}, got "
                         f"{tuple(shift_labels.shape)}")
    return shift_labels.to(torch.long)


def _fused_loss(model, hidden, targets, num_items_in_batch, impl) -> torch.Tensor:
    """transformers' causal-LM loss from the hidden states: −Σ log p(target) over the scored
    tokens, divided by their count (0 when there is none) or by ``num_items_in_batch``.
    ``linear_nll`` forms the gradients in the forward pass: 6·N·H·V FLOPs, not 8."""
    scored = targets != IGNORE_INDEX
    head = hf.lm_head(model)
    # Only the scored rows go to the head: prompt and padding positions cost nothing there.
    rows, weight, bias = hf.head_inputs(hidden[scored], head)
    with hf.no_autocast(rows.device.type):
        return linear_nll(rows, weight, targets[scored], bias=bias, impl=impl,
                          num_items_in_batch=num_items_in_batch, **head.options())
