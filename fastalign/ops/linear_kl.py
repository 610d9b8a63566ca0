"""``linear_kl``: the exact per-token KL between a policy head and a reference head.

Layer 2 of fastalign, built like ``linear_logprobs``: the argument checks, one autograd Function
(optionally over a vocabulary sharded across a process group), the dispatch to the kernels
(``fastalign.kernels.linear_kl`` in Triton, ``fastalign._C.linear_kl_*`` in C++,
``csrc/linear_kl_cpu.cpp``) and the materialising reference. Math in ``docs/ALGORITHMS.md`` §2.

The kernels compute KL(p‖q) of a "first" head against a "second" head on flattened, contiguous
rows; the reverse direction KL(q‖p) is the same computation with the two heads swapped, and rows
outside ``mask`` are dropped before the kernels see them::

    forward(hidden[N, H], weight[V, H], bias[V] | None,
            ref_hidden[N, H2], ref_weight[V, H2], ref_bias[V] | None,
            temperature: float, softcap: float (0 = none))
        -> (kl[N], lse[N], ref_lse[N])                          # float64, all three

    backward(grad_kl[N], hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, lse, ref_lse,
             temperature, softcap, compute_dhidden, compute_dweight, compute_dbias,
             compute_dref_hidden, compute_dref_weight, compute_dref_bias)
        -> (dhidden, dweight, dbias, dref_hidden, dref_weight, dref_bias)   # None where not asked

KL and both log-sum-exps are kept in float64 for backward, which forms
``z − lse − r + ref_lse − KL`` for every logit: a difference of numbers much larger than itself.

With the first head's ``targets`` [N] (int64, ``ignore_index`` where not scored), the same one
pass over both heads also gives that head's per-token log-prob and entropy, as
``linear_logprobs`` would (PPO with the exact KL needs all three; ALGORITHMS.md §2)::

    forward(..., softcap, targets=targets, ignore_index=ignore_index)
        -> (kl, lse, ref_lse, logp[N], entropy[N], sum_pz[N])  # logp, entropy float32; Σ p·z f64

    backward(grad_kl, ..., compute_dref_bias, grad_logp=grad_logp[N], grad_entropy=None | [N],
             targets=targets, sum_pz=sum_pz, ignore_index=ignore_index)

and backward forms one ∂L/∂z for the three upstream gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastalign.ops import vocab_parallel
from fastalign.ops._backends import resolve_impl
from fastalign.ops._checks import (
    check_bool,
    check_finite_tensors,
    check_head,
    check_int,
    check_mask,
    check_positive,
    check_same_device,
    check_token_ids,
    check_token_range,
)
from fastalign.ops.linear_logprobs import (
    LogprobParams,
    linear_logprobs_reference,
    reference_logits,
)


def _kernels(impl: str) -> tuple[Callable, Callable]:
    """The (forward, backward) entry points of a fused implementation."""
    if impl == "triton":
        # Imported on first use, as in linear_logprobs: TRITON_INTERPRET is read at decoration.
        from fastalign.kernels.linear_kl import linear_kl_backward, linear_kl_forward

        return linear_kl_forward, linear_kl_backward
    from fastalign.ops._extension import EXTENSION

    return EXTENSION.linear_kl_forward, EXTENSION.linear_kl_backward


class LinearKLFunction(torch.autograd.Function):
    """Thin autograd wrapper around KL(first head ‖ second head); keeps 3 numbers per token.

    With a process ``group`` both heads hold the same shard of the vocabulary: the shards' KL and
    log-sum-exps are combined in forward (``vocab_parallel.combine_kl_stats``); given the whole
    vocabulary's KL, lse and ref_lse, each shard's backward kernel gives the exact gradient of
    its columns, and the hidden states' gradients are summed over the group.

    With ``targets`` (of the first head; ``params.ignore_index`` where not scored) it returns
    (kl, logp, entropy) of the same pass and keeps Σ p·z besides; backward takes any of the three
    upstream gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                params: LogprobParams, impl: str, group=None, targets=None):
        forward_kernel, _ = _kernels(impl)
        scored = {} if targets is None else dict(targets=targets,
                                                 ignore_index=params.ignore_index)
        kl, lse, ref_lse, *policy_stats = forward_kernel(
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
            params.temperature, params.softcap_or_zero, **scored,
        )
        if group is not None:
            kl, lse, ref_lse = vocab_parallel.combine_kl_stats(kl, lse, ref_lse, group)
        logp, entropy, sum_pz = policy_stats or (None, None, None)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                              kl, lse, ref_lse, targets, sum_pz)
        ctx.params, ctx.impl, ctx.group = params, impl, group
        ctx.output_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        ctx.set_materialize_grads(False)
        if targets is None:
            return kl.to(ctx.output_dtype)
        return kl.to(ctx.output_dtype), logp, entropy

    @staticmethod
    def backward(ctx, grad_kl, grad_logp=None, grad_entropy=None):
        if grad_kl is None and grad_logp is None and grad_entropy is None:
            return (None,) * 10
        (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, lse, ref_lse, targets,
         sum_pz) = ctx.saved_tensors
        needs = ctx.needs_input_grad[:6]
        params: LogprobParams = ctx.params
        dtype = ctx.output_dtype

        def upstream(grad):
            if grad is None:
                return torch.zeros(kl.shape, dtype=dtype, device=kl.device)
            return grad.to(dtype).contiguous()

        scored = {}
        if targets is not None:
            scored = dict(grad_logp=upstream(grad_logp),
                          grad_entropy=None if grad_entropy is None else upstream(grad_entropy),
                          targets=targets, sum_pz=sum_pz, ignore_index=params.ignore_index)
        _, backward_kernel = _kernels(ctx.impl)
        grads = list(backward_kernel(
            upstream(grad_kl),
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, lse, ref_lse,
            params.temperature, params.softcap_or_zero,
            needs[0], needs[1], needs[2] and bias is not None,
            needs[3], needs[4], needs[5] and ref_bias is not None,
            **scored,
        ))
        if ctx.group is not None:
            grads[0] = vocab_parallel.all_reduce_hidden_grad(grads[0], ctx.group)
            grads[3] = vocab_parallel.all_reduce_hidden_grad(grads[3], ctx.group)
        return (*grads, None, None, None, None)


def _check_inputs(hidden, weight, ref_hidden, ref_weight, mask, bias, ref_bias, temperature,
                  softcap, reverse) -> None:
    check_head("", hidden, weight, bias)
    check_head("ref_", ref_hidden, ref_weight, ref_bias)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"weight and ref_weight must cover the same vocabulary, got V = {weight.shape[0]} "
            f"and {ref_weight.shape[0]}"
        )
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"ref_hidden must have the leading shape of hidden {tuple(hidden.shape[:-1])} (one "
            f"reference state per token), got {tuple(ref_hidden.shape[:-1])}"
        )
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(
            f"ref_hidden and ref_weight must have hidden's dtype {hidden.dtype}, got "
            f"{ref_hidden.dtype}; cast the reference head to the policy's dtype"
        )
    if mask is not None:
        check_mask("mask", mask)
        if tuple(mask.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"mask must have the leading shape of hidden {tuple(hidden.shape[:-1])}, got "
                f"{tuple(mask.shape)}"
            )
    check_same_device(hidden=hidden, weight=weight, bias=bias, ref_hidden=ref_hidden,
                      ref_weight=ref_weight, ref_bias=ref_bias, mask=mask)
    check_positive("temperature", temperature)
    check_positive("softcap", softcap, optional=True)
    check_bool("reverse", reverse)


def _check_targets(hidden, weight, targets, ignore_index, return_entropy, reverse,
                   process_group) -> None:
    check_int("ignore_index", ignore_index)
    check_bool("return_entropy", return_entropy)
    if targets is None:
        if return_entropy:
            raise ValueError("return_entropy=True needs targets (the entropy is the policy's, "
                             "at the scored tokens)")
        return
    check_token_ids("targets", targets)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have the leading shape of hidden "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    check_same_device(hidden=hidden, targets=targets)
    if reverse:
        raise ValueError("targets (and return_entropy) score the policy head with KL(π‖π_ref); "
                         "they cannot be combined with reverse=True")
    if process_group is not None:
        raise ValueError("targets (and return_entropy) are not supported with process_group "
                         "yet; call linear_logprobs for the log-probs")
    check_token_range("targets", targets, weight.shape[0], ignore_index)


def linear_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    reverse: bool = False,
    impl: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    check_finite: bool = False,
    targets: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Exact KL(π‖π_ref) over the whole vocabulary for each token, without materialising logits.

    With ``z = softcap·tanh((h·Wᵀ + b)/softcap)/T`` for the policy and ``r`` likewise from the
    reference head (same temperature and softcap), ``p = softmax(z)`` and ``q = softmax(r)``,
    returns ``Σ_v p_v (log p_v − log q_v)`` per token, or KL(q‖p) with ``reverse=True``.

    Args:
        hidden: [..., H] policy hidden states, float32 / bfloat16 / float16 (float64 on CPU).
        weight: [V, H] policy LM head, hidden's dtype.
        ref_hidden: [..., H_ref] reference hidden states for the same tokens, hidden's dtype.
        ref_weight: [V, H_ref] reference LM head (same vocabulary; H_ref may differ from H).
        mask: optional bool (or 0/1 integer) [...]: tokens where it is false give 0 and no
            gradient, and cost nothing.
        bias, ref_bias: optional [V] head biases.
        temperature: divides both sides' (softcapped) logits; > 0.
        softcap: optional final-logit softcap applied to both sides (Gemma 2 uses 30.0); > 0.
        reverse: compute KL(π_ref‖π) instead.
        impl: "auto" (Triton on CUDA, the C++ kernel on CPU), "triton", "cpp" or "reference".
        process_group: a ``torch.distributed`` group over which both heads' vocabulary is sharded
            alike (tensor parallelism): ``weight`` and ``ref_weight`` (and biases) hold rows
            ``[vocab_start_index, vocab_start_index + weight.shape[0])``; hidden states, mask and
            outputs are the same on every rank. The heads' gradients stay local, the hidden
            states' are summed over the group; backward assumes every rank back-propagates the
            same loss. Needs a fused impl.
        vocab_start_index: the first vocabulary row this rank's heads hold.
        check_finite: raise if any input head tensor holds NaN or inf (a device sync each).
        targets: optional integer [...] token ids of the policy: then the same pass over both
            heads also gives the policy's log-prob of each target, as ``linear_logprobs``
            (0 where the target is ``ignore_index`` or ``mask`` is false). Not with ``reverse``
            or ``process_group``.
        ignore_index: the target value of tokens that are not scored.
        return_entropy: also return the policy's entropy per token (needs ``targets``; 0 where
            logp is).

    Returns:
        ``kl`` float32 [...] (float64 for float64 inputs); with ``targets`` ``(kl, logp)``, and
        with ``return_entropy`` ``(kl, logp, entropy)``, all of that shape and dtype. Gradients
        flow to the policy side from every output, and from the KL to the reference side too
        for whichever of its tensors require grad.
    """
    _check_inputs(hidden, weight, ref_hidden, ref_weight, mask, bias, ref_bias, temperature,
                  softcap, reverse)
    _check_targets(hidden, weight, targets, ignore_index, return_entropy, reverse, process_group)
    check_bool("check_finite", check_finite)
    if check_finite:
        check_finite_tensors(hidden=hidden, weight=weight, bias=bias, ref_hidden=ref_hidden,
                             ref_weight=ref_weight, ref_bias=ref_bias)
    chosen = resolve_impl(impl, hidden.device, hidden.dtype)
    vocab_parallel.check_sharding(process_group, vocab_start_index, weight, chosen)
    options = dict(temperature=float(temperature),
                   softcap=None if softcap is None else float(softcap))
    lead_shape = hidden.shape[:-1]
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    ref_hidden_2d = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    targets_1d = None if targets is None else targets.reshape(-1).to(torch.int64)
    n_tokens = hidden_2d.shape[0]
    kept = None
    if mask is not None:
        kept = mask.reshape(-1).nonzero().squeeze(1)
        hidden_2d = hidden_2d.index_select(0, kept)
        ref_hidden_2d = ref_hidden_2d.index_select(0, kept)
        if targets_1d is not None:
            targets_1d = targets_1d.index_select(0, kept)

    # Nothing to compute (or asked for the reference): the reference handles empty inputs exactly
    # and keeps the result attached to the graph, so an all-masked batch still back-propagates.
    if process_group is None and (chosen == "reference" or hidden_2d.shape[0] == 0):
        outputs = linear_kl_reference(hidden_2d, weight, ref_hidden_2d, ref_weight, bias=bias,
                                      ref_bias=ref_bias, reverse=reverse, targets=targets_1d,
                                      ignore_index=ignore_index, return_entropy=True,
                                      **options)
    else:
        first = (hidden_2d.contiguous(), weight.contiguous(),
                 None if bias is None else bias.contiguous())
        second = (ref_hidden_2d.contiguous(), ref_weight.contiguous(),
                  None if ref_bias is None else ref_bias.contiguous())
        if reverse:  # KL(q‖p) is the same kernel with the two heads' roles exchanged
            first, second = second, first
        outputs = LinearKLFunction.apply(
            *first, *second, LogprobParams(**options, ignore_index=ignore_index), chosen,
            process_group, None if targets_1d is None else targets_1d.contiguous())
    if targets is None:
        outputs = (outputs,)
    elif not return_entropy:
        outputs = outputs[:2]

    def unmasked(values: torch.Tensor) -> torch.Tensor:
        if kept is not None:
            values = values.new_zeros(n_tokens).index_copy(0, kept, values)
        return values.view(lead_shape)

    outputs = tuple(unmasked(values) for values in outputs)
    return outputs[0] if targets is None else outputs


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def linear_kl_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    reverse: bool = False,
    compute_dtype: torch.dtype | None = None,
    targets: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Per-token exact KL between the policy head and the reference head, materialised.

    ``p = softmax(z)`` from (hidden, weight, bias) and ``q = softmax(r)`` from (ref_hidden,
    ref_weight, ref_bias), with the same temperature and softcap (`docs/ALGORITHMS.md` §2).
    Returns KL(p‖q) per token, or KL(q‖p) with ``reverse=True``, 0 where ``mask`` is false, in
    ``compute_dtype`` (float32 by default, float64 for float64 inputs).

    Args:
        hidden: [..., H] policy hidden states; weight: [V, H].
        ref_hidden: [..., H_ref] reference hidden states (same leading shape); ref_weight:
            [V, H_ref].
        mask: optional bool [...]; tokens where it is false give 0 and no gradient.
        targets, ignore_index, return_entropy: as in ``linear_kl``: also ``logp`` (and
            ``entropy``) of the policy head, from ``linear_logprobs_reference``.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if mask is not None:  # masked rows enter as zeros: a NaN there reaches no gradient
        keep = mask.bool().unsqueeze(-1)
        hidden = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype,
                                                       device=hidden.device))
        ref_hidden = torch.where(keep, ref_hidden, torch.zeros((), dtype=ref_hidden.dtype,
                                                               device=ref_hidden.device))
    z = reference_logits(hidden, weight, bias, temperature, softcap, compute_dtype)
    r = reference_logits(ref_hidden, ref_weight, ref_bias, temperature, softcap, compute_dtype)
    log_p = torch.log_softmax(z, dim=-1)
    log_q = torch.log_softmax(r, dim=-1)
    if reverse:
        log_p, log_q = log_q, log_p
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    if targets is None:
        return kl
    if mask is not None:
        targets = torch.where(mask.bool(), targets, ignore_index)
    scored = linear_logprobs_reference(hidden, weight, targets, bias=bias,
                                       temperature=temperature, softcap=softcap,
                                       ignore_index=ignore_index, return_entropy=return_entropy,
                                       compute_dtype=compute_dtype)
    return (kl, *scored) if return_entropy else (kl, scored)
