"""``linear_logprobs``: per-token log-probabilities and entropies straight from (hidden, LM head).

Layer 2 of fastalign: the argument checks, one autograd Function (optionally over a vocabulary
sharded across a process group), the dispatch to the kernels, and the materialising reference
that tests and benchmarks compare against. The kernels are ``fastalign.kernels.linear_logprobs``
(Triton) and ``fastalign._C.linear_logprobs_*`` (C++, ``csrc/linear_logprobs_cpu.cpp``).

Both kernel families implement the same contract on flattened, contiguous inputs::

    forward(hidden[N, H], weight[V, H], bias[V] | None, targets[N] int64,
            temperature: float, softcap: float (0 = none), ignore_index: int,
            off_shard_targets=False)
        -> (logp[N], entropy[N], lse[N], sum_pz[N])
           # logp, entropy: float32 (float64 for float64 input); lse, sum_pz: float64 always

    backward(grad_logp[N], grad_entropy[N] | None, hidden, weight, bias, targets, lse, sum_pz,
             temperature, softcap, ignore_index, compute_dhidden, compute_dweight, compute_dbias,
             off_shard_targets=False)
        -> (dhidden | None, dweight | None, dbias | None)       # in the dtype of each input

``lse`` is the log-sum-exp of the scaled logits and ``sum_pz`` is Σ_v p_v z_v; together they let
backward recompute the probabilities tile by tile without storing any [N, V] tensor. They are kept
in float64 (16 bytes a token) because backward forms z − lse and z − Σ p z, differences of
numbers that nearly cancel for a dominant token: with |z| ≈ 100, one float32 rounding of lse is
already an absolute error of 1e-5 in every probability and gradient. Kernels can split each into
a float32 pair (hi, lo) so that the per-logit arithmetic stays float32.

``off_shard_targets`` (vocabulary-parallel heads) lets a target id ≥ V mean "on another shard":
no target logit on this one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastalign.ops import vocab_parallel
from fastalign.ops._backends import HeadParams, resolve_impl
from fastalign.ops._checks import (
    check_bool,
    check_finite_tensors,
    check_head,
    check_int,
    check_positive,
    check_same_device,
    check_token_ids,
    check_token_range,
)


@dataclass(frozen=True)
class LogprobParams(HeadParams):
    """The non-tensor options of the op, passed to the kernels as one object.

    ``off_shard_targets`` is set for a vocabulary-parallel head, whose ``ignore_index`` is then
    ``vocab_parallel.LOCAL_IGNORE``.
    """

    ignore_index: int = -100
    off_shard_targets: bool = False


def _kernels(impl: str) -> tuple[Callable, Callable]:
    """The (forward, backward) entry points of a fused implementation."""
    if impl == "triton":
        # Imported on first use: TRITON_INTERPRET is read when the kernels are decorated, and CPU
        # users who never touch the Triton path should not pay for importing triton.
        from fastalign.kernels.linear_logprobs import (
            linear_logprobs_backward,
            linear_logprobs_forward,
        )

        return linear_logprobs_forward, linear_logprobs_backward
    from fastalign.ops._extension import EXTENSION

    return EXTENSION.linear_logprobs_forward, EXTENSION.linear_logprobs_backward


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class LinearLogprobsFunction(torch.autograd.Function):
    """Thin autograd wrapper: the kernels do the work, this only keeps what backward needs.

    With a process ``group`` the head holds one shard of the vocabulary: the shards' statistics
    are combined in forward (``vocab_parallel.combine_logprob_stats``) and the hidden states'
    gradient is summed over the group in backward; ``targets`` are then shard-local.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: LogprobParams, impl: str,
                group=None):
        forward_kernel, _ = _kernels(impl)
        logp, entropy, lse, sum_pz = forward_kernel(
            hidden, weight, bias, targets,
            params.temperature, params.softcap_or_zero, params.ignore_index,
            off_shard_targets=params.off_shard_targets,
        )
        if group is not None:
            logp, entropy, lse, sum_pz = vocab_parallel.combine_logprob_stats(
                logp, lse, sum_pz, targets, weight.shape[0], group)
        # Saved: inputs, targets and two numbers per token. Never the logits.
        ctx.save_for_backward(hidden, weight, bias, targets, lse, sum_pz)
        ctx.params, ctx.impl, ctx.group = params, impl, group
        ctx.set_materialize_grads(False)
        ctx.output_dtype = logp.dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        hidden, weight, bias, targets, lse, sum_pz = ctx.saved_tensors
        needs_dhidden, needs_dweight, needs_dbias = ctx.needs_input_grad[:3]
        dtype = ctx.output_dtype
        if grad_logp is None:
            grad_logp = torch.zeros(lse.shape, dtype=dtype, device=lse.device)
        params: LogprobParams = ctx.params
        _, backward_kernel = _kernels(ctx.impl)
        dhidden, dweight, dbias = backward_kernel(
            grad_logp.to(dtype).contiguous(),
            None if grad_entropy is None else grad_entropy.to(dtype).contiguous(),
            hidden, weight, bias, targets, lse, sum_pz,
            params.temperature, params.softcap_or_zero, params.ignore_index,
            needs_dhidden, needs_dweight, needs_dbias and bias is not None,
            off_shard_targets=params.off_shard_targets,
        )
        if ctx.group is not None:
            dhidden = vocab_parallel.all_reduce_hidden_grad(dhidden, ctx.group)
        return dhidden, dweight, dbias, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------


def check_linear_logprobs_args(hidden, weight, targets, bias, temperature, softcap,
                               ignore_index) -> None:
    """Everything but the targets' range (the caller checks that once, named as it was given)."""
    check_head("", hidden, weight, bias)
    check_token_ids("targets", targets)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have the leading shape of hidden {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_positive("temperature", temperature)
    check_positive("softcap", softcap, optional=True)
    check_int("ignore_index", ignore_index)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log π(y | h) for each token, computed from the LM head without materialising the logits.

    With ``z = softcap·tanh((h·Wᵀ + b)/softcap) / temperature`` (softcap optional), returns
    ``logp = z[y] − logsumexp(z)`` and, with ``return_entropy``, the entropy of ``softmax(z)``.

    Args:
        hidden: [..., H] hidden states, float32 / bfloat16 / float16 (float64 on CPU), any strides.
        weight: [V, H] LM-head weight, same dtype as ``hidden``.
        targets: [...] integer ids with the leading shape of ``hidden``.
        bias: optional [V] head bias, same dtype as ``weight``.
        temperature: divides the (softcapped) logits; > 0.
        softcap: optional final-logit softcap (Gemma 2 uses 30.0); > 0.
        ignore_index: targets equal to this give log-prob 0, entropy 0 and no gradient.
        return_entropy: also return the per-token entropy of the full distribution.
        impl: "auto" (Triton on CUDA, the C++ kernel on CPU), "triton", "cpp" or "reference".
        process_group: a ``torch.distributed`` group over which the head's vocabulary is sharded
            (tensor parallelism). ``weight`` (and ``bias``) then hold rows
            ``[vocab_start_index, vocab_start_index + weight.shape[0])`` of the head, ``hidden``
            and ``targets`` (global ids) are the same on every rank, and so are the outputs;
            ``weight``'s gradient stays local and ``hidden``'s is summed over the group.
            Backward assumes every rank back-propagates the same loss. Needs a fused impl.
        vocab_start_index: the first vocabulary row this rank's ``weight`` holds.
        check_finite: raise if ``hidden``, ``weight`` or ``bias`` holds NaN or inf (costs a
            device sync); without it such a token's outputs are NaN.

    Returns:
        ``logp`` float32 (float64 for float64 inputs) with the shape of ``targets``, or
        ``(logp, entropy)``. Gradients flow to ``hidden``, ``weight`` and ``bias`` for any
        upstream gradient of either output, accumulated in float32.
    """
    check_linear_logprobs_args(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    check_bool("return_entropy", return_entropy)
    check_bool("check_finite", check_finite)
    if check_finite:
        check_finite_tensors(hidden=hidden, weight=weight, bias=bias)
    chosen = resolve_impl(impl, hidden.device, hidden.dtype)
    vocab_size = vocab_parallel.check_sharding(process_group, vocab_start_index, weight, chosen)
    check_token_range("targets", targets, vocab_size, ignore_index)
    return compute_linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
        ignore_index=ignore_index, return_entropy=return_entropy, impl=chosen,
        process_group=process_group, vocab_start_index=vocab_start_index)


def compute_linear_logprobs(hidden, weight, targets, *, bias, temperature, softcap, ignore_index,
                            return_entropy, impl, process_group=None, vocab_start_index=0):
    """``linear_logprobs`` on arguments already checked, with ``impl`` resolved."""
    temperature = float(temperature)
    softcap = None if softcap is None else float(softcap)
    # An empty batch gives empty outputs (and zero gradients); the reference handles it exactly.
    if process_group is None and (impl == "reference" or targets.numel() == 0):
        return linear_logprobs_reference(
            hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
            ignore_index=ignore_index, return_entropy=return_entropy,
        )
    targets_1d = targets.reshape(-1).to(torch.int64)
    if process_group is None:
        params = LogprobParams(temperature, softcap, ignore_index)
    else:
        params = LogprobParams(temperature, softcap, vocab_parallel.LOCAL_IGNORE,
                               off_shard_targets=True)
        targets_1d = vocab_parallel.shard_local_targets(targets_1d, vocab_start_index,
                                                        weight.shape[0], ignore_index)
    logp, entropy = LinearLogprobsFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), targets_1d.contiguous(), params, impl,
        process_group,
    )
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, entropy.view(targets.shape)
    return logp


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (and entropies) from hidden states and an LM head, materialised.

    Args:
        hidden: [..., H] floating point hidden states.
        weight: [V, H] LM-head weight.
        targets: [...] integer target ids (the leading shape of ``hidden``); ``ignore_index`` marks
            positions that contribute nothing.
        bias: optional [V] head bias.
        temperature: logits are divided by this (after the softcap).
        softcap: if given, logits become ``softcap * tanh(logits / softcap)`` (before temperature).
        ignore_index: target value marking ignored positions (log-prob 0, entropy 0, no gradient).
        return_entropy: also return the entropy of the full distribution per token.
        compute_dtype: dtype of the materialised logits; float32 by default, float64 for float64
            inputs.

    Returns:
        ``logp`` with the shape of ``targets`` in ``compute_dtype``, or ``(logp, entropy)``.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    valid = targets != ignore_index
    # Ignored rows enter the product as zeros: a NaN or inf in the hidden state of a padding token
    # must give no gradient to anything (0·NaN is NaN in the weight's gradient otherwise).
    hidden = torch.where(valid.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype,
                                                                  device=hidden.device))
    logits = reference_logits(hidden, weight, bias, temperature, softcap, compute_dtype)
    log_probs = torch.log_softmax(logits, dim=-1)

    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def reference_logits(hidden, weight, bias, temperature, softcap, compute_dtype):
    """z = softcap·tanh((h·Wᵀ + b)/softcap)/temperature, materialised in ``compute_dtype``."""
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature
