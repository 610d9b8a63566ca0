"""Per-token log-probs, entropy and KL of a Hugging Face causal LM, its logits never formed.

``AutoModelForCausalLM.forward`` runs the backbone and then the LM head on every position, which
holds [B, T, V] logits (several copies in backward). The helpers here run the backbone only, take
its final hidden states (after the final norm) and hand them, with the head's weight and bias, to
the fused ops (``fastalign.linear_logprobs``, ``fastalign.linear_kl``,
``fastalign.ops.sequence.sequence_logprobs_from_labels``), which stream over the vocabulary.

Layout: ``input_ids`` and ``attention_mask`` are [B, T]; per-token results are float32 (float64
for a float64 model) [B, T − 1], entry t scoring token t + 1 given tokens 0..t. A token is
scored when it *and* the position predicting it are attended (``mask[:, t + 1] & mask[:, t]``):
the first real token of a left-padded row is predicted from padding only, so it is left out,
exactly as the first token of a right-padded row is. Elsewhere results are 0.

What the head does after the matrix product is read from the config (``LMHead``): Gemma 2/3's
final-logit softcap, and the logit scales of Cohere (× ``logit_scale``), Granite and MiniCPM3
(÷ ``logits_scaling``), HyperCLOVA X (× ``logits_scaling``) and Falcon-H1
(× ``lm_head_multiplier``). ``eager_token_logprobs`` is the materialising reference
(``model(...).logits``), the baseline the tests compare against.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from fastalign.ops._checks import check_mask, check_positive
from fastalign.ops.linear_kl import linear_kl
from fastalign.ops.linear_logprobs import linear_logprobs
from fastalign.ops.sequence import (
    SequenceLogprobs,
    packed_position_ids,
    sequence_logprobs_from_labels,
)

IGNORE_INDEX = -100

# How each family scales its logits after the head: (model_type prefix, config attribute, op).
# Found in transformers' modeling files; the attribute names mean different things per family
# (HyperCLOVA X multiplies by ``logits_scaling`` where Granite divides; MPT's ``logit_scale`` is
# not applied by transformers at all), so the rule is chosen by model type, never by name alone.
_LOGIT_SCALE_RULES = (
    ("cohere", "logit_scale", "mul"),
    ("granite", "logits_scaling", "div"),
    ("minicpm3", "logits_scaling", "div"),  # divides the hidden states: the same thing
    ("hyperclovax", "logits_scaling", "mul"),
    ("falcon_h1", "lm_head_multiplier", "mul"),
    ("mpt", "logit_scale", None),
)
_SCALE_ATTRIBUTES = ("logit_scale", "logits_scaling", "lm_head_multiplier")


@dataclass(frozen=True, eq=False)
class LMHead:
    """A causal LM's output head: logits = softcap·tanh((h·Wᵀ + b)/softcap) or s·(h·Wᵀ + b).

    Attributes:
        weight: [V, H] the head's own Parameter (the tied embedding, if tied), so gradients of
            the fused ops reach the model.
        bias: [V] or None.
        softcap: Gemma 2/3's ``final_logit_softcapping``, or None.
        logit_scale: s, the factor the logits are multiplied by (1.0 for most models; Cohere's
            ``logit_scale``; 1 / Granite's ``logits_scaling``).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None = None
    logit_scale: float = 1.0

    def options(self, temperature: float = 1.0) -> dict:
        """``temperature=`` and ``softcap=`` for the fused ops and the ``Fused*Loss`` modules.

        The fused ops compute softcap·tanh(a/softcap)/temperature; a scale s gives s·a/T =
        a/(T/s), so it is folded into the temperature. Scale and softcap together do not fold.
        """
        check_positive("temperature", temperature)
        if self.logit_scale == 1.0:
            return {"temperature": float(temperature), "softcap": self.softcap}
        if self.softcap is not None:
            raise NotImplementedError(
                f"this head has both a logit scale ({self.logit_scale}) and a final-logit softcap "
                f"({self.softcap}); the fused ops cannot express that combination"
            )
        return {"temperature": float(temperature) / self.logit_scale, "softcap": None}


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel``. Never imports peft: if it was never imported, no model is."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model itself (PEFT's LoRA layers stay injected inside it)."""
    if not is_peft_model(model):
        return model
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        # Prompt/prefix tuning works in PeftModel.forward, which running the backbone bypasses.
        raise NotImplementedError("PEFT prompt-learning methods (prefix, prompt, p-tuning) are "
                                  "not supported; LoRA-style adapters are")
    return model.get_base_model()


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _logit_scale(config) -> float:
    model_type = str(getattr(config, "model_type", ""))
    for prefix, attribute, op in _LOGIT_SCALE_RULES:
        if model_type.startswith(prefix):
            value = getattr(config, attribute, None)
            if op is None or value is None:
                return 1.0
            return float(value) if op == "mul" else 1.0 / float(value)
    for attribute in _SCALE_ATTRIBUTES:  # an unknown family with a scale: refuse to guess
        value = getattr(config, attribute, None)
        if value is not None and value != 1:
            raise NotImplementedError(
                f"config.{attribute} = {value!r} on model type {model_type!r}: fastalign does not "
                "know how this model applies it to its logits"
            )
    return 1.0


def lm_head(model: nn.Module) -> LMHead:
    """The output head of a causal LM (or of a PEFT model's base model) as an :class:`LMHead`."""
    base = _unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        hint = ""
        if "peft" in type(head).__module__:
            hint = (" The head is wrapped by PEFT: targeting lm_head with LoRA (or listing it in "
                    "modules_to_save) is not supported; adapt the backbone only.")
        raise TypeError(f"{type(base).__name__}.get_output_embeddings() must be an nn.Linear, "
                        f"got {type(head).__name__}.{hint}")
    if not head.weight.dtype.is_floating_point:
        raise TypeError(f"the LM head's weight must be floating point (not quantised), got "
                        f"{head.weight.dtype}")
    config = _text_config(base)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = _logit_scale(config)
    if not scale > 0:
        raise NotImplementedError(f"logit scale {scale} <= 0 cannot be folded into a temperature")
    return LMHead(head.weight, head.bias, None if softcap is None else float(softcap), scale)


def backbone(model: nn.Module) -> nn.Module:
    """The module that maps input_ids to the final hidden states: the causal LM minus its head.

    ``model.base_model_prefix`` names it (GPT-2: ``model.transformer``; Llama, Qwen2, Mistral,
    Gemma 2: ``model.model``); else ``model.get_decoder()``.
    """
    base = _unwrap(model)
    inner = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if isinstance(inner, nn.Module) and inner is not base:
        return inner
    inner = base.get_decoder() if hasattr(base, "get_decoder") else None
    if isinstance(inner, nn.Module) and inner is not base:
        return inner
    raise TypeError(f"cannot find the backbone of {type(base).__name__}: neither "
                    "model.<base_model_prefix> nor model.get_decoder() is a separate module")


def _vocab_size(model: nn.Module) -> int:
    """The ids the model can embed and score: the smaller of its two embedding tables."""
    base = model.get_base_model() if is_peft_model(model) else model
    sizes = [getattr(module, "weight", None) for module in
             (base.get_input_embeddings(), base.get_output_embeddings())]
    sizes = [w.shape[0] for w in sizes if isinstance(w, torch.Tensor) and w.dim() == 2]
    return min(sizes) if sizes else int(_text_config(base).vocab_size)


def _context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions cover (``config.max_position_embeddings``;
    GPT-2's ``n_positions`` maps to it), or None where there is no fixed limit (no such field,
    or dynamic RoPE scaling, which stretches itself to longer inputs)."""
    config = _text_config(model.get_base_model() if is_peft_model(model) else model)
    limit = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) == "dynamic":
        return None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def _check_batch(model: nn.Module, input_ids, attention_mask, position_ids=None) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    dtype = input_ids.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [B, T], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids must hold at least one sequence of at least one token, got "
                         f"shape {tuple(input_ids.shape)}")
    limit = _context_length(model)
    if limit is not None:
        # Positions run 0..T-1 unless given; past the model's table they index nothing (GPT-2) or
        # silently extrapolate RoPE far outside what the model was trained on (Llama).
        if isinstance(position_ids, torch.Tensor) and position_ids.numel():
            longest, what = int(position_ids.max()) + 1, "position_ids reach position"
        else:
            longest, what = input_ids.shape[1], "input_ids has length"
        if longest > limit:
            raise ValueError(f"{what} {longest}, longer than the model's context: "
                             f"config.max_position_embeddings = {limit}; truncate the batch "
                             f"(e.g. max_length <= {limit})")
    vocab = _vocab_size(model)
    outside = (input_ids < 0) | (input_ids >= vocab)
    if bool(outside.any()):  # one sync; an index error deep inside the embedding is worse
        raise ValueError(f"input_ids must lie in [0, {vocab}) (the model's vocabulary), found "
                         f"{input_ids[outside][:5].tolist()}")
    if attention_mask is not None:
        check_mask("attention_mask", attention_mask)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have input_ids' shape "
                             f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on "
                             f"{input_ids.device}")


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor, *,
                        attention_mask: torch.Tensor | None = None,
                        **model_kwargs) -> torch.Tensor:
    """The backbone's ``last_hidden_state`` [B, T, H] (after the final norm), in its own dtype.

    Runs ``backbone(model)`` with ``use_cache=False``: gradient checkpointing, PEFT adapters and
    any autocast in force apply as they would in ``model(...)``; the head never runs.
    ``model_kwargs`` (e.g. ``position_ids``) go to the backbone.

    Raises ``ValueError`` (naming the argument) for an empty batch, ids outside the vocabulary,
    a mask of another shape or device, and a sequence longer than the model's context
    (``config.max_position_embeddings``, or the largest of ``position_ids`` when given).
    """
    _check_batch(model, input_ids, attention_mask, model_kwargs.get("position_ids"))
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                          **{**model_kwargs, "use_cache": False})
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def head_inputs(hidden: torch.Tensor, head: LMHead,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden, weight, bias) in one dtype, as the fused ops require.

    Under autocast for hidden's device type, all three go to the autocast dtype, as
    ``nn.Linear`` would compute; otherwise hidden goes to the weight's dtype. ``.to`` is
    differentiable: gradients still reach an fp32 master Parameter.
    """
    dtype = _autocast_dtype(hidden.device.type) or head.weight.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    return hidden.to(dtype), head.weight.to(dtype), bias


def no_autocast(device_type: str):
    """A context without autocast on ``device_type`` (a no-op where it is off).

    The fused kernels run their own matrix products in the inputs' dtype with fp32
    accumulation; autocast must not re-cast what happens inside them.
    """
    if _autocast_dtype(device_type) is None:
        return nullcontext()
    return torch.autocast(device_type, enabled=False)


def _scored(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """bool [B, T − 1]: entry t is True where token t + 1 is scored (see the module docstring)."""
    if attention_mask is None:
        return torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    mask = attention_mask.bool()
    return mask[:, 1:] & mask[:, :-1]


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, *,
                   attention_mask: torch.Tensor | None = None, temperature: float = 1.0,
                   return_entropy: bool = False, impl: str = "auto", **model_kwargs,
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log π(x_{t+1} | x_≤t), float32 [B, T − 1], from the backbone and the fused op.

    Args:
        model: a causal LM (``AutoModelForCausalLM``) or a PEFT model wrapping one.
        input_ids: [B, T] integer ids; attention_mask: optional [B, T] bool or 0/1 (left or
            right padding).
        temperature: divides the (softcapped, scaled) logits, as in sampling.
        return_entropy: also return the entropy of the full distribution, float32 [B, T − 1].
        impl: the fused op's implementation ("auto": Triton on CUDA, C++ on CPU).

    Returns:
        ``logps`` or ``(logps, entropy)``, 0 at positions not scored; differentiable w.r.t. every
        parameter of the model, the head included.
    """
    head = lm_head(model)
    hidden = final_hidden_states(model, input_ids, attention_mask=attention_mask,
                                 **model_kwargs)
    scored = _scored(input_ids, attention_mask)
    targets = torch.where(scored, input_ids[:, 1:], IGNORE_INDEX)
    hidden, weight, bias = head_inputs(hidden[:, :-1], head)
    with no_autocast(hidden.device.type):
        return linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=return_entropy,
                               impl=impl, **head.options(temperature))


def token_kl(model: nn.Module, ref_model: nn.Module | None, input_ids: torch.Tensor, *,
             attention_mask: torch.Tensor | None = None, temperature: float = 1.0,
             reverse: bool = False, impl: str = "auto", **model_kwargs) -> torch.Tensor:
    """Exact KL(π‖π_ref) over the whole vocabulary at each position, float32 [B, T − 1].

    Entry t compares the two next-token distributions after tokens 0..t (0 where not scored).
    ``reverse=True`` gives KL(π_ref‖π). The reference runs under ``torch.no_grad``: gradients
    reach the policy only. ``ref_model=None`` uses ``model`` itself with its PEFT adapters
    disabled. Both models must share the vocabulary and the softcap; different logit scales are
    folded into the reference's hidden states.
    """
    head = lm_head(model)
    ref_head = lm_head(model if ref_model is None else ref_model)
    if ref_head.weight.shape[0] != head.weight.shape[0]:
        raise ValueError(f"model and ref_model must share the vocabulary, got V = "
                         f"{head.weight.shape[0]} and {ref_head.weight.shape[0]}")
    if ref_head.softcap != head.softcap:
        raise ValueError(f"model and ref_model must have the same final-logit softcap, got "
                         f"{head.softcap} and {ref_head.softcap}")
    options = head.options(temperature)
    scored = _scored(input_ids, attention_mask)
    hidden = final_hidden_states(model, input_ids, attention_mask=attention_mask,
                                 **model_kwargs)
    hidden, weight, bias = head_inputs(hidden[:, :-1], head)
    with torch.no_grad(), (adapters_disabled(model) if ref_model is None else nullcontext()):
        ref_hidden = final_hidden_states(model if ref_model is None else ref_model, input_ids,
                                         attention_mask=attention_mask,
                                         **model_kwargs)[:, :-1]
        # The fused op applies one temperature to both sides: s_ref·a = (s_ref/s)·a scaled by s.
        ratio = ref_head.logit_scale / head.logit_scale
        ref_weight, ref_bias = ref_head.weight.to(weight.dtype), ref_head.bias
        ref_hidden = (ref_hidden.float() * ratio if ratio != 1.0 else ref_hidden).to(weight.dtype)
        if ref_bias is not None:
            ref_bias = (ref_bias.float() * ratio).to(weight.dtype)
    with no_autocast(hidden.device.type):
        return linear_kl(hidden, weight, ref_hidden, ref_weight, mask=scored, bias=bias,
                         ref_bias=ref_bias, reverse=reverse, impl=impl, **options)


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, *, labels: torch.Tensor,
                      attention_mask: torch.Tensor | None = None,
                      cu_seqlens: torch.Tensor | None = None, temperature: float = 1.0,
                      return_entropy: bool = False, return_predictions: bool = False,
                      return_mean_logits: bool = False, return_log_sum_sq_probs: bool = False,
                      impl: str = "auto", **model_kwargs) -> SequenceLogprobs:
    """Per-token and per-sequence log-probs of the labelled tokens, as the trainers need them.

    ``labels`` [B, T] are aligned with ``input_ids`` as in Hugging Face: the token id where a
    token is scored, -100 on prompt and padding. Returns a ``SequenceLogprobs`` with float32
    ``token_logps`` [B, T − 1] and ``sum_logps`` / ``mean_logps`` / ``lengths`` [B];
    ``return_predictions`` adds the arg-max token of each scored position and
    ``return_mean_logits`` the mean of its logits over the vocabulary and
    ``return_log_sum_sq_probs`` log Σ_v p_v² (WPO's weights), from the same hidden states (one
    backbone run).

    Padding-free: ``input_ids`` and ``labels`` [1, total] hold S sequences back to back,
    ``cu_seqlens`` [S + 1] their boundaries, and no ``attention_mask``. Positions restart at
    each sequence, which is what keeps attention within it: check the model once with
    :func:`check_packed_attention`. Per-token results are then [total], per-sequence ones [S].
    """
    head = lm_head(model)
    if not isinstance(labels, torch.Tensor) or labels.shape != getattr(input_ids, "shape", None):
        raise ValueError(f"labels must be a tensor of input_ids' shape, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("packed sequences (cu_seqlens) take no attention_mask: with one, "
                             "transformers would attend across the sequences")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"packed sequences (cu_seqlens) take input_ids of shape [1, total], "
                             f"got {tuple(input_ids.shape)}")
        positions = packed_position_ids(cu_seqlens.to(input_ids.device), input_ids.shape[1])
        model_kwargs = {**model_kwargs, "position_ids": positions[None]}
    hidden = final_hidden_states(model, input_ids, attention_mask=attention_mask,
                                 **model_kwargs)
    hidden, weight, bias = head_inputs(hidden, head)
    with no_autocast(hidden.device.type):
        return sequence_logprobs_from_labels(hidden, weight, labels, cu_seqlens=cu_seqlens,
                                             bias=bias, ignore_index=IGNORE_INDEX,
                                             return_entropy=return_entropy,
                                             return_predictions=return_predictions,
                                             return_mean_logits=return_mean_logits,
                                             return_log_sum_sq_probs=return_log_sum_sq_probs,
                                             impl=impl,
                                             **head.options(temperature))


def check_packed_attention(model: nn.Module) -> None:
    """Refuse a model that would attend across the sequences of a padding-free row.

    Padding-free batches rely on the model building a block-diagonal mask from position ids
    that restart at 0 (transformers' mask builders do, for most architectures, with eager, sdpa
    and flex attention; flash attention reads the restarts directly). Some architectures
    derive positions or biases from the attention mask instead (OPT, BLOOM's ALiBi) and would
    silently mix the sequences, so this asks the model itself: the final hidden states of a
    short sequence B, alone and packed behind a sequence A, must agree far better than B's
    states when B is allowed to attend to A. Raises ``ValueError`` naming the model otherwise.
    """
    vocab = _vocab_size(model)
    device = lm_head(model).weight.device
    first = torch.arange(3, 11, device=device)[None] % vocab
    second = torch.arange(20, 24, device=device)[None] % vocab
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(first.shape[1]), torch.arange(second.shape[1])])[None]
    positions = positions.to(device)
    was_training = model.training
    model.eval()  # no dropout: the three passes must differ only by what they attend to
    try:
        with torch.no_grad():
            alone = final_hidden_states(model, second).float()[0]
            tail = slice(first.shape[1], None)
            separated = final_hidden_states(model, packed, position_ids=positions)
            mixed = final_hidden_states(model, packed, attention_mask=torch.ones_like(packed),
                                        position_ids=positions)
    finally:
        model.train(was_training)
    error = float((separated[0, tail].float() - alone).abs().max())
    leak = float((mixed[0, tail].float() - alone).abs().max())
    # Rounding moves the packed pass a little (most in bf16); attending to A moves it a lot.
    if not error <= 0.1 * leak:
        name = type(_unwrap(model)).__name__
        attention = getattr(_text_config(_unwrap(model)), "_attn_implementation", None)
        raise ValueError(f"padding_free: {name} (attention {attention!r}) attends across "
                         f"sequences packed into one row (position ids restarting at 0 do not "
                         f"separate them); train it without padding_free")


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` (a PEFT model) computes as its base model without adapters.

    Lets one PEFT model serve as both the policy and the reference, without a second copy.
    """
    if not is_peft_model(model):
        raise ValueError(f"{type(model).__name__} is not a PEFT model; use a frozen copy as the "
                         "reference model instead of disabling adapters")
    with model.disable_adapter():
        yield model


def eager_token_logprobs(model: nn.Module, input_ids: torch.Tensor, *,
                         attention_mask: torch.Tensor | None = None, temperature: float = 1.0,
                         return_entropy: bool = False, **model_kwargs,
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The materialising reference for :func:`token_logprobs`, same contract and outputs.

    Runs ``model(...).logits`` (transformers applies softcap and logit scale itself), then
    ``log_softmax`` in float32 and a gather. Holds [B, T, V] logits: for tests and baselines.
    """
    check_positive("temperature", temperature)
    _check_batch(model, input_ids, attention_mask, model_kwargs.get("position_ids"))
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   **{**model_kwargs, "use_cache": False}).logits
    logp_all = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    scored = _scored(input_ids, attention_mask)
    logps = logp_all.gather(-1, input_ids[:, 1:, None].long()).squeeze(-1)
    logps = torch.where(scored, logps, torch.zeros_like(logps))
    if not return_entropy:
        return logps
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, torch.where(scored, entropy, torch.zeros_like(entropy))
