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

import math
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from fastalign._extension import EXTENSION, EXTENSION_ERROR
from fastalign.reference import linear_logprobs_reference

IMPLEMENTATIONS = ("auto", "triton", "cpp", "reference")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class LogprobParams:
    """The non-tensor options of the op, passed to the kernels as one object."""

    temperature: float = 1.0
    softcap: float | None = None
    ignore_index: int = -100

    @property
    def softcap_or_zero(self) -> float:
        return 0.0 if self.softcap is None else float(self.softcap)


# ----------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------


def _triton_module() -> ModuleType:
    # Imported lazily: TRITON_INTERPRET is read when the kernels are decorated, and CPU users who
    # never touch the Triton path should not pay for importing triton.
    from fastalign.kernels import linear_logprobs as triton_linear_logprobs

    return triton_linear_logprobs


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None if they can."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return (
        f"Triton kernels need CUDA tensors (got device {device}); on CPU they run only through the "
        "Triton interpreter, enabled by TRITON_INTERPRET=1 before fastalign.kernels is imported"
    )


def cpp_unavailable_reason(device: torch.device) -> str | None:
    """Why the C++ extension cannot run on ``device``, or None if it can."""
    if EXTENSION is None:
        return f"the C++ extension fastalign._C is not built ({EXTENSION_ERROR})"
    if device.type != "cpu":
        return f"the C++ extension runs on CPU tensors only (got device {device})"
    return None


def available_implementations(device: torch.device | str = "cpu") -> list[str]:
    """The implementations that can run on ``device``, fastest first."""
    device = torch.device(device)
    found = []
    if device.type == "cuda" and triton_unavailable_reason(device) is None:
        found.append("triton")
    if cpp_unavailable_reason(device) is None:
        found.append("cpp")
    if device.type == "cpu" and triton_unavailable_reason(device) is None:
        found.append("triton")  # the interpreter: correct but slow, for tests
    found.append("reference")
    return found


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map ``impl`` ("auto" or a name) to the implementation that will run, or raise."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        triton_ok = triton_unavailable_reason(device) is None
        if device.type == "cuda" and dtype != torch.float64 and triton_ok:
            return "triton"
        if cpp_unavailable_reason(device) is None:
            return "cpp"
        return "reference"
    if impl == "triton":
        reason = triton_unavailable_reason(device)
        if reason is None and dtype == torch.float64:
            reason = "the Triton kernels support float32, bfloat16 and float16, not float64"
        if reason is not None:
            raise ValueError(f"impl='triton' cannot run here: {reason}")
    if impl == "cpp":
        reason = cpp_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"impl='cpp' cannot run here: {reason}")
    return impl


def _kernel_module(impl: str):
    return _triton_module() if impl == "triton" else EXTENSION


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class LinearLogprobsFunction(torch.autograd.Function):
    """Thin autograd wrapper: the kernels do the work, this only keeps what backward needs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: LogprobParams, impl: str):
        kernels = _kernel_module(impl)
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
        dhidden, dweight, dbias = _kernel_module(ctx.impl).linear_logprobs_backward(
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


def _check_tensor(name: str, value, *, floating: bool) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}"
        )


def _check_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index) -> None:
    _check_tensor("hidden", hidden, floating=True)
    _check_tensor("weight", weight, floating=True)
    _check_tensor("targets", targets, floating=False)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1), got shape [0, H]")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., H], got a 0-d tensor")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight.shape[1] "
            f"({weight.shape[1]}): hidden is [..., H] and weight is [V, H]"
        )
    if hidden.shape[-1] == 0:
        raise ValueError("hidden size H must be at least 1")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have the leading shape of hidden {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64 or int32), got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}"
        )
    if bias is not None:
        _check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    devices = {("hidden", hidden.device), ("weight", weight.device), ("targets", targets.device)}
    if bias is not None:
        devices.add(("bias", bias.device))
    if len({device for _, device in devices}) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in sorted(devices, key=str))
        raise ValueError(f"all tensors must be on the same device, got {listed}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if softcap is not None:
        if not isinstance(softcap, (int, float)) or isinstance(softcap, bool):
            raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
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

    Returns:
        ``logp`` float32 (float64 for float64 inputs) with the shape of ``targets``, or
        ``(logp, entropy)``. Gradients flow to ``hidden``, ``weight`` and ``bias`` for any
        upstream gradient of either output, accumulated in float32.
    """
    _check_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    vocab_size, hidden_size = weight.shape
    _check_target_range(targets, vocab_size, ignore_index)
    chosen = resolve_impl(impl, hidden.device, hidden.dtype)

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
