"""``linear_logprobs``: per-token log-probabilities and entropies straight from (hidden, LM head).

Layer 2 of fastalign: argument checks, the dispatcher that picks an implementation, and a thin
autograd Function around the kernels. The kernels themselves live in ``fastalign.kernels``
(Triton) and ``fastalign._C`` (C++); the materialising reference in ``fastalign.reference``.

Both kernel families implement the same contract on flattened, contiguous inputs::

    forward(hidden[N, H], weight[V, H], bias[V] | None, targets[N] int64,
            temperature: float, softcap: float (0 = none), ignore_index: int)
        -> (logp[N], entropy[N], lse[N], sum_pz[N])
           # logp, entropy: float32 (float64 for float64 input); lse, sum_pz: float64 always

    backward(grad_logp[N], grad_entropy[N] | None, hidden, weight, bias, targets, lse, sum_pz,
             temperature, softcap, ignore_index, compute_dhidden, compute_dweight, compute_dbias)
        -> (dhidden | None, dweight | None, dbias | None)       # in the dtype of each input

``lse`` is the log-sum-exp of the scaled logits and ``sum_pz`` is Σ_v p_v z_v; together they let
backward recompute the probabilities tile by tile without storing any [N, V] tensor. They are kept
in float64 (16 bytes a token) because backward forms z − lse and z − Σ p z, differences of
numbers that nearly cancel for a dominant token: with |z| ≈ 100, one float32 rounding of lse is
already an absolute error of 1e-5 in every probability and gradient. Kernels can split each into
a float32 pair (hi, lo) so that the per-logit arithmetic stays float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign._dispatch import (  # noqa: F401  (re-exported: the dispatcher's public names)
    IMPLEMENTATIONS,
    HeadParams,
    available_implementations,
    check_finite_tensors,
    check_head,
    check_positive_float,
    check_same_device,
    check_tensor,
    cpp_unavailable_reason,
    kernel_module,
    resolve_impl,
    triton_unavailable_reason,
)
from fastalign.reference import linear_logprobs_reference
from fastalign.vocab_parallel import (
    VocabParallelLogprobsFunction,
    check_vocab_shards,
    shard_local_targets,
)


@dataclass(frozen=True)
class LogprobParams(HeadParams):
    """The non-tensor options of the op, passed to the kernels as one object."""

    ignore_index: int = -100


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class LinearLogprobsFunction(torch.autograd.Function):
    """Thin autograd wrapper: the kernels do the work, this only keeps what backward needs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: LogprobParams, impl: str):
        kernels = kernel_module(impl, "linear_logprobs")
        logp, entropy, lse, sum_pz = kernels.linear_logprobs_forward(
            hidden, weight, bias, targets,
            params.temperature, params.softcap_or_zero, params.ignore_index,
        )
        # Saved: inputs, targets and two numbers per token. Never the logits.
        ctx.save_for_backward(hidden, weight, bias, targets, lse, sum_pz)
        ctx.params = params
        ctx.impl = impl
        ctx.set_materialize_grads(False)
        ctx.output_dtype = logp.dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, sum_pz = ctx.saved_tensors
        needs_dhidden, needs_dweight, needs_dbias = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        dtype = ctx.output_dtype
        if grad_logp is None:
            grad_logp = torch.zeros(lse.shape, dtype=dtype, device=lse.device)
        params: LogprobParams = ctx.params
        kernels = kernel_module(ctx.impl, "linear_logprobs")
        dhidden, dweight, dbias = kernels.linear_logprobs_backward(
            grad_logp.to(dtype).contiguous(),
            None if grad_entropy is None else grad_entropy.to(dtype).contiguous(),
            hidden, weight, bias, targets, lse, sum_pz,
            params.temperature, params.softcap_or_zero, params.ignore_index,
            needs_dhidden, needs_dweight, needs_dbias and bias is not None,
        )
        return dhidden, dweight, dbias, None, None, None


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index) -> None:
    check_head("", hidden, weight, bias)
    check_tensor("targets", targets, floating=False)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have the leading shape of hidden {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64 or int32), got {targets.dtype}")
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_positive_float("temperature", temperature)
    check_positive_float("softcap", softcap, optional=True)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_target_range(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    if targets.numel() == 0:
        return
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(out_of_range.any()):  # one device sync; silent garbage would be worse
        bad = targets[out_of_range][:5].tolist()
        raise ValueError(
            f"targets must lie in [0, V) = [0, {vocab_size}) or equal ignore_index "
            f"({ignore_index}); found {bad}"
        )


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------


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
    _check_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    for name, flag in (("return_entropy", return_entropy), ("check_finite", check_finite)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if check_finite:
        check_finite_tensors(hidden=hidden, weight=weight, bias=bias)
    vocab_size, hidden_size = weight.shape
    chosen = resolve_impl(impl, hidden.device, hidden.dtype)
    if process_group is not None:
        return _vocab_parallel_logprobs(hidden, weight, targets, bias, temperature, softcap,
                                        ignore_index, return_entropy, chosen, process_group,
                                        vocab_start_index)
    if vocab_start_index != 0:
        raise ValueError(f"vocab_start_index={vocab_start_index!r} needs a process_group (the "
                         "head's vocabulary sharded across ranks); without one it must be 0")
    _check_target_range(targets, vocab_size, ignore_index)

    # An empty batch gives empty outputs (and zero gradients); the reference handles it exactly.
    if chosen == "reference" or targets.numel() == 0:
        return linear_logprobs_reference(
            hidden, weight, targets, bias=bias, temperature=float(temperature), softcap=softcap,
            ignore_index=ignore_index, return_entropy=return_entropy,
        )

    params = LogprobParams(float(temperature), None if softcap is None else float(softcap),
                           ignore_index)
    hidden_2d = hidden.reshape(-1, hidden_size).contiguous()
    targets_1d = targets.reshape(-1).to(torch.int64).contiguous()
    logp, entropy = LinearLogprobsFunction.apply(
        hidden_2d, weight.contiguous(), None if bias is None else bias.contiguous(),
        targets_1d, params, chosen,
    )
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, entropy.view(targets.shape)
    return logp


def _vocab_parallel_logprobs(hidden, weight, targets, bias, temperature, softcap, ignore_index,
                             return_entropy, chosen, process_group, vocab_start_index):
    """``linear_logprobs`` on this rank's shard of a vocabulary split over ``process_group``."""
    total_vocab = check_vocab_shards(process_group, vocab_start_index, weight)
    _check_target_range(targets, total_vocab, ignore_index)
    if chosen == "reference":
        raise ValueError("process_group needs a fused implementation (impl='auto', 'cpp' or "
                         "'triton'); the reference materialises one unsharded head")
    params = HeadParams(float(temperature), None if softcap is None else float(softcap))
    hidden_2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    local_targets = shard_local_targets(targets.reshape(-1).to(torch.int64), vocab_start_index,
                                   weight.shape[0], ignore_index).contiguous()
    logp, entropy = VocabParallelLogprobsFunction.apply(
        hidden_2d, weight.contiguous(), None if bias is None else bias.contiguous(),
        local_targets, params, chosen, process_group,
    )
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, entropy.view(targets.shape)
    return logp
