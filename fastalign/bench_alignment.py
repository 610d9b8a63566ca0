"""Benchmarks of the alignment ops: ``linear_kl`` and one DPO step's loss work.

Built on ``fastalign.bench`` (the ``linear_logprobs`` harness): the same timing (``time_fn``), peak
memory (``measure_mode_memory``: workspace beyond the inputs and what the call returns), device and
version information and CSV / PNG / markdown writers; this module adds what differs per op: the
inputs, the providers, the ground truth, the modes and the FLOP count. Used by ``fastalign bench
--op linear_kl|dpo`` and by ``benchmarks/test_bench_{linear_kl,dpo}.py``.

``linear_kl`` (``LINEAR_KL``): per-token exact KL(π‖π_ref) of a policy head (hidden [N, H], weight
[V, H], requires_grad) against a reference head (ref_hidden, ref_weight: no grad, as in RLHF),
float32 [N]. Providers:

* ``fastalign-cpp`` / ``fastalign-triton``: ``fastalign.linear_kl(..., impl=...)``, whichever runs
  on the device. The Triton interpreter on CPU is far too slow to time and is not offered.
* ``eager``: both heads' logits materialised in the input dtype → float32 → (softcap) →
  ``log_softmax`` both → ``Σ p·(log p − log q)``.
* ``compile``: ``torch.compile`` of ``eager``.

Modes: ``forward`` (with requires_grad policy inputs, as in training) and ``full`` (forward, then
``torch.autograd.grad`` to hidden and weight for a random float32 upstream gradient).

``dpo`` (``DPO``): B pairs, 2B sequences of T tokens (the chosen ones stacked on the rejected
ones, as TRL's concatenated forward): policy hidden [2B, T, H] and head [V, H] requiring grad,
reference hidden and head without grad, Hugging Face labels [2B, T] (-100 on the prompt, the first
quarter of each sequence, and on a few padding positions at the end). One step's loss work is
sigmoid DPO with β = 0.1 on summed sequence log-probs, then backward to hidden and weight.
Providers:

* ``fastalign``: ``FusedDPOLoss(beta=0.1)(hidden, weight, labels, ref_hidden=..., ref_weight=...)``
  (``linear_logprobs`` with impl "triton" on CUDA, "cpp" on CPU).
* ``eager``: what TRL's DPOTrainer does with the logits: full [2B, T, V] logits for the policy and,
  under ``no_grad``, for the reference; float32 ``log_softmax``, gather of the next-token labels,
  masked sums, ``fastalign.losses.dpo.dpo_loss``.
* ``compile``: ``torch.compile`` of ``eager``'s step function (when it compiles).

Modes: ``forward`` (the loss, graph built) and ``full`` (loss, then gradients of hidden, weight).

Inputs are random (never zeros): policy logits have standard deviation ``bench.LOGIT_STD``; the
reference is the policy perturbed by ``REF_NOISE`` (hidden and weight alike), so KL(π‖π_ref) is
about 0.1 per token and DPO's implicit rewards are O(1), as early in fine-tuning.

Before timing, each provider runs once and is compared with a float64 (CPU) or float32 (CUDA)
ground truth computed by materialising the logits in chunks (``LINEAR_KL.reference``,
``DPO.reference``): values and gradients, within ``TOLERANCES`` plus ``bench.EAGER_ERROR_FACTOR``
times eager PyTorch's own error in the benchmark dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import fastalign
from fastalign import bench
from fastalign.bench import (
    LOGIT_STD,
    BenchConfig,
    BenchResult,
    CheckResult,
    ModeFn,
    Provider,
    ProviderMismatchError,
    ProviderUnavailable,
    Shape,
    TimingOptions,
)
from fastalign.ops.linear_kl import linear_kl_reference

OPS_NAMES = ("linear_kl", "dpo")
REF_NOISE = 0.1  # reference = policy + REF_NOISE·(noise of the policy's own scale)
DPO_BETA = 0.1
IGNORE_INDEX = -100
_MiB = 1024 * 1024
_CHUNK_BYTES = 512 * _MiB  # the ground truth materialises logits this many bytes at a time

Tensors = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    value_atol: float  # on max|value − ref| (KL per token; the DPO loss)
    grad_rtol: float  # on max|grad − ref| / max|ref|, for dhidden and dweight


TOLERANCES = {
    torch.float32: Tolerance(2e-4, 2e-3),
    torch.float16: Tolerance(1e-2, 1e-2),
    torch.bfloat16: Tolerance(3e-2, 3e-2),
}
# In half precision eager PyTorch is the yardstick of the other providers (they may be off by
# bench.EAGER_ERROR_FACTOR times its error), and its own check only guards against gross errors:
# it gets this multiple of TOLERANCES. linear_kl's gradients need it: they are driven by
# log p − log q of two nearly equal heads (≈ 0.4), so bf16 logits alone (≈ 0.01 absolute) leave
# eager's dhidden about 6 % off.
EAGER_HALF_PRECISION_SLACK = 5.0


def output_errors(outputs: Tensors, reference: Tensors, value_key: str) -> dict[str, float]:
    """``value_key``: max|out − ref| (absolute); gradients: max|out − ref| / max|ref|."""
    errors = {}
    for key, ref in reference.items():
        diff = float((outputs[key].double() - ref.double()).abs().max())
        errors[key] = diff if key == value_key else diff / max(float(ref.abs().max()), 1e-30)
    return errors


def check_outputs(outputs: Tensors, reference: Tensors, value_key: str, dtype: torch.dtype,
                  eager_errors: dict[str, float] | None = None,
                  is_eager: bool = False) -> CheckResult:
    """Compare with the ground truth: ``TOLERANCES`` (times ``EAGER_HALF_PRECISION_SLACK`` for
    eager itself in half precision) plus ``EAGER_ERROR_FACTOR`` times eager's own errors."""
    tol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    slack = EAGER_HALF_PRECISION_SLACK if is_eager and dtype in (torch.bfloat16,
                                                                  torch.float16) else 1.0
    errors = output_errors(outputs, reference, value_key)
    allowed = {key: slack * (tol.value_atol if key == value_key else tol.grad_rtol)
               for key in errors}
    for key in allowed:
        if eager_errors is not None and math.isfinite(eager_errors.get(key, math.nan)):
            allowed[key] += bench.EAGER_ERROR_FACTOR * eager_errors[key]
    ok = all(math.isfinite(errors[key]) and errors[key] <= allowed[key] for key in allowed)
    return CheckResult(ok, errors, allowed)


def _reference_dtype(device: torch.device) -> torch.dtype:
    # float64 where it is cheap enough (CPU); float32 on CUDA, where float64 matmuls are slow.
    return torch.float64 if device.type == "cpu" else torch.float32


def _perturbed(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """tensor + REF_NOISE·scale·N(0, 1), in tensor's dtype, without grad."""
    noise = torch.randn(tensor.shape, device=tensor.device) * (REF_NOISE * scale)
    return (tensor.detach().float() + noise).to(tensor.dtype)


def _policy_head(n_rows: Sequence[int], h: int, v: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.randn(*n_rows, h, device=device).to(dtype).requires_grad_()
    weight = torch.randn(v, h, device=device) * (LOGIT_STD / math.sqrt(h))
    return hidden, weight.to(dtype).requires_grad_()


def _float_logits(hidden: torch.Tensor, weight: torch.Tensor,
                  softcap: float | None) -> torch.Tensor:
    """h·Wᵀ in the input dtype, upcast to float32 (float64 stays float64), then the softcap."""
    logits = hidden @ weight.T
    if logits.dtype != torch.float64:
        logits = logits.float()
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


_COMPILED: dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    # One compiled function per op for the whole process: dynamo re-specialises per shape.
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def _fastalign_impl(device: torch.device, dtype: torch.dtype) -> str:
    """The fused implementation to benchmark on ``device``, or raise ProviderUnavailable."""
    impl = "triton" if device.type == "cuda" else "cpp"
    if impl not in fastalign.available_implementations(device):
        from fastalign.ops._backends import cpp_unavailable_reason, triton_unavailable_reason

        reason = (triton_unavailable_reason if impl == "triton" else cpp_unavailable_reason)(device)
        raise ProviderUnavailable(reason or f"fastalign impl {impl!r} cannot run on {device}")
    return impl


# ----------------------------------------------------------------------------------------------
# linear_kl
# ----------------------------------------------------------------------------------------------


@dataclass
class KLInputs:
    """hidden [N, H], weight [V, H] (requires_grad); ref_hidden, ref_weight (no grad), all in the
    benchmark dtype; grad_kl [N] float32 upstream gradient."""

    shape: Shape
    hidden: torch.Tensor
    weight: torch.Tensor
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    grad_kl: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype


def eager_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
             ref_weight: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Plain PyTorch: both heads' logits in the input dtype → float32 → softcap → log_softmax,
    then Σ_v p_v (log p_v − log q_v). Returns float32 [N]."""
    log_p = torch.log_softmax(_float_logits(hidden, weight, softcap), dim=-1)
    log_q = torch.log_softmax(_float_logits(ref_hidden, ref_weight, softcap), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class LinearKLBench:
    """What ``run_benchmark`` needs to know about ``linear_kl``."""

    name = "linear_kl"
    modes = ("forward", "full")
    default_modes = ("forward", "full")
    providers = ("fastalign-triton", "fastalign-cpp", "eager", "compile")
    value_key = "kl"
    shape_syntax = "N,H,V[,SOFTCAP]"
    csv_columns = (
        "op", "provider", "mode", "N", "H", "V", "softcap", "dtype", "ms_median", "ms_p20",
        "ms_p80", "tflops", "frac_of_matmul", "peak_mem_mb", "device", "torch", "triton", "date",
    )
    flops_note = ("FLOPs credited: forward 4·N·H·V (both heads' logits), full 12·N·H·V (forward "
                  "4 + backward 8: recompute of both heads 4, dh 2, dW 2), for every provider.")

    @staticmethod
    def parse_shape(text: str) -> Shape:
        return bench.parse_shape(text)

    @staticmethod
    def default_shapes(device: torch.device | str) -> list[Shape]:
        """CPU: N=1024, H=1024, V=32000. CUDA: the Llama-3 head at 4k and 8k tokens."""
        if torch.device(device).type == "cuda":
            return [Shape(n, 4096, 128256, None, "llama3") for n in (4096, 8192)]
        return [Shape(1024, 1024, 32000)]

    @staticmethod
    def small_shape(device: torch.device | str) -> Shape:
        return bench.small_shape(device)

    @staticmethod
    def flops(mode: str, shape: Shape) -> int:
        """Forward: the two heads' logits, 2·N·H·V each. Full: forward + backward, where backward
        recomputes both heads' logits (4·N·H·V: the reference's are needed for q) and forms the
        policy's dh = G·W and dW = Gᵀ·h (2·N·H·V each). The materialising providers do not
        recompute, yet are credited the same, so that TFLOP/s ranks like time."""
        per_mode = {"forward": 4, "full": 12}
        if mode not in per_mode:
            raise ValueError(f"linear_kl modes are {tuple(per_mode)}, got {mode!r}")
        return per_mode[mode] * shape.n * shape.h * shape.v

    @staticmethod
    def shape_columns(shape: Shape) -> dict:
        return {"N": shape.n, "H": shape.h, "V": shape.v,
                "softcap": "" if shape.softcap is None else shape.softcap}

    @staticmethod
    def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str,
                    seed: int = 0) -> KLInputs:
        device = torch.device(device)
        torch.manual_seed(seed)
        hidden, weight = _policy_head((shape.n,), shape.h, shape.v, dtype, device)
        ref_hidden = _perturbed(hidden, 1.0)
        ref_weight = _perturbed(weight, LOGIT_STD / math.sqrt(shape.h))
        grad_kl = torch.randn(shape.n, device=device)
        return KLInputs(shape, hidden, weight, ref_hidden, ref_weight, grad_kl)

    @staticmethod
    def make_provider(name: str, device: torch.device | str, dtype: torch.dtype) -> Provider:
        device = torch.device(device)
        if name in ("fastalign-cpp", "fastalign-triton"):
            impl = name.removeprefix("fastalign-")
            if impl == "triton" and device.type != "cuda":
                raise ProviderUnavailable(
                    "the Triton kernels run on CUDA; the Triton interpreter on CPU is far too "
                    "slow to time")
            if impl != _fastalign_impl(device, dtype):
                raise ProviderUnavailable(f"fastalign's {impl} kernels do not run on {device}")
            if impl == "cpp":
                from fastalign.ops._extension import EXTENSION

                if not hasattr(EXTENSION, "linear_kl_forward"):
                    raise ProviderUnavailable(
                        "the built fastalign._C has no linear_kl_forward (built before linear_kl "
                        "was added: rebuild the extension)")

            def fn(hidden, weight, ref_hidden, ref_weight, softcap, _impl=impl):
                return fastalign.linear_kl(hidden, weight, ref_hidden, ref_weight,
                                           softcap=softcap, impl=_impl)

            return Provider(name, fn)
        if name == "eager":
            return Provider("eager", eager_kl, "both heads' logits in the input dtype, "
                            "log_softmax in float32")
        if name == "compile":
            return Provider("compile", lambda *args: _compiled("linear_kl", eager_kl)(*args),
                            "torch.compile(eager)")
        raise ValueError(f"unknown linear_kl provider {name!r}; known: "
                         f"{', '.join(LinearKLBench.providers)}")

    @staticmethod
    def reference(inputs: KLInputs, chunk_bytes: int = _CHUNK_BYTES) -> Tensors:
        """``fastalign.ops.linear_kl.linear_kl_reference`` in float64 (CPU) or float32 (CUDA) on the
        exactly upcast inputs, in chunks of tokens; kl [N], dhidden [N, H], dweight [V, H]."""
        dtype = _reference_dtype(inputs.device)
        shape = inputs.shape
        weight = inputs.weight.detach().to(dtype).requires_grad_()
        ref_weight = inputs.ref_weight.to(dtype)
        rows = max(1, min(shape.n, chunk_bytes // (dtype.itemsize * shape.v)))
        kls, dhiddens = [], []
        dweight = torch.zeros_like(weight)
        for start in range(0, shape.n, rows):
            part = slice(start, start + rows)
            h = inputs.hidden.detach()[part].to(dtype).requires_grad_()
            kl = linear_kl_reference(h, weight, inputs.ref_hidden[part].to(dtype), ref_weight,
                                     softcap=shape.softcap, compute_dtype=dtype)
            dh, dw = torch.autograd.grad(kl, (h, weight), inputs.grad_kl[part].to(dtype))
            kls.append(kl.detach())
            dhiddens.append(dh)
            dweight += dw
            del kl, dh, dw, h
        return {"kl": torch.cat(kls), "dhidden": torch.cat(dhiddens), "dweight": dweight}

    @staticmethod
    def run_outputs(provider: Provider, inputs: KLInputs) -> Tensors:
        """Forward and backward once (this also compiles / warms up)."""
        kl = provider.fn(inputs.hidden, inputs.weight, inputs.ref_hidden, inputs.ref_weight,
                         inputs.shape.softcap)
        if kl.dtype != torch.float32 or tuple(kl.shape) != (inputs.shape.n,):
            raise ProviderMismatchError(f"{provider.name} returned {kl.dtype} {tuple(kl.shape)}, "
                                        f"expected float32 ({inputs.shape.n},)")
        dhidden, dweight = torch.autograd.grad(kl, (inputs.hidden, inputs.weight), inputs.grad_kl)
        return {"kl": kl.detach(), "dhidden": dhidden, "dweight": dweight}

    @staticmethod
    def make_mode_fn(provider: Provider, inputs: KLInputs, mode: str) -> ModeFn:
        h, w, rh, rw = inputs.hidden, inputs.weight, inputs.ref_hidden, inputs.ref_weight
        sc, g = inputs.shape.softcap, inputs.grad_kl
        if mode == "forward":
            return ModeFn(lambda _: provider.fn(h, w, rh, rw, sc))
        if mode == "full":
            return ModeFn(lambda _: torch.autograd.grad(provider.fn(h, w, rh, rw, sc), (h, w), g))
        raise ValueError(f"linear_kl modes are {LinearKLBench.modes}, got {mode!r}")


# ----------------------------------------------------------------------------------------------
# DPO step
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPOShape:
    """B pairs of sequences of T tokens (N = 2·B·T hidden states), hidden size H, vocabulary V."""

    b: int
    t: int
    h: int
    v: int
    softcap: float | None = None
    label: str = ""

    @property
    def n(self) -> int:
        return 2 * self.b * self.t

    def __str__(self) -> str:
        text = f"B={self.b} T={self.t} (N={self.n}) H={self.h} V={self.v}"
        if self.softcap is not None:
            text += f" softcap={self.softcap:g}"
        return f"{self.label} {text}" if self.label else text


def parse_dpo_shape(text: str) -> DPOShape:
    """Parse ``"B,T,H,V"`` or ``"B,T,H,V,SOFTCAP"`` (softcap 0 means none)."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (4, 5):
        raise ValueError(f"a DPO shape is B,T,H,V or B,T,H,V,SOFTCAP, got {text!r}")
    try:
        b, t, h, v = (int(part) for part in parts[:4])
        softcap = float(parts[4]) if len(parts) == 5 else None
    except ValueError as exc:
        raise ValueError(f"cannot parse DPO shape {text!r}: {exc}") from None
    if min(b, h, v) < 1 or t < 8:
        raise ValueError(f"B, H and V must be positive and T at least 8, got {text!r}")
    return DPOShape(b, t, h, v, softcap or None)


@dataclass
class DPOInputs:
    """hidden [2B, T, H], weight [V, H] (requires_grad), ref_hidden, ref_weight (no grad), in the
    benchmark dtype; labels [2B, T] int64 (-100 on prompts and padding), chosen rows first."""

    shape: DPOShape
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype


def make_dpo_labels(shape: DPOShape, device: torch.device | str) -> torch.Tensor:
    """[2B, T] random token ids; -100 on the prompt (the first quarter of every sequence) and on
    0 to T/32 padding positions at the end of each sequence."""
    labels = torch.randint(0, shape.v, (2 * shape.b, shape.t), device=device)
    labels[:, : shape.t // 4] = IGNORE_INDEX
    max_pad = max(1, shape.t // 32)
    pads = torch.randint(0, max_pad + 1, (2 * shape.b,)).tolist()
    for row, pad in enumerate(pads):
        if pad:
            labels[row, shape.t - pad:] = IGNORE_INDEX
    return labels


def _eager_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's way: [2B, T, V] logits, shift, float32 log_softmax, gather, masked sum per sequence.
    Returns (summed log-probs [2B], float32 or float64 for float64 inputs; number of scored
    tokens [2B])."""
    logits = _float_logits(hidden, weight, softcap)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logps = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1)


def eager_dpo(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
              ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
              softcap: float | None = None) -> tuple[torch.Tensor, dict]:
    """One DPO step's loss as TRL computes it from materialised logits: ``(loss, metrics)``."""
    from fastalign.losses.dpo import dpo_loss

    logps, _ = _eager_sequence_logps(hidden, weight, labels, softcap)
    with torch.no_grad():
        ref_logps, _ = _eager_sequence_logps(ref_hidden, ref_weight, labels, softcap)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    # Sigmoid DPO needs no lengths (passing them costs a device sync, and a graph break).
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=DPO_BETA)


class DPOBench:
    """What ``run_benchmark`` needs to know about one DPO step."""

    name = "dpo"
    modes = ("forward", "full")
    default_modes = ("forward", "full")
    providers = ("fastalign", "eager", "compile")
    value_key = "loss"
    shape_syntax = "B,T,H,V[,SOFTCAP]"
    csv_columns = (
        "op", "provider", "mode", "B", "T", "N", "H", "V", "softcap", "dtype", "ms_median",
        "ms_p20", "ms_p80", "tflops", "frac_of_matmul", "peak_mem_mb", "device", "torch",
        "triton", "date",
    )
    flops_note = ("N = 2·B·T. FLOPs credited: forward 4·N·H·V (policy 2 + reference 2), full "
                  "10·N·H·V (policy 8: forward 2, recompute 2, dh 2, dW 2; reference 2), for "
                  "every provider; all N tokens count, though the fused op skips tiles of "
                  "prompt and padding tokens.")

    @staticmethod
    def parse_shape(text: str) -> DPOShape:
        return parse_dpo_shape(text)

    @staticmethod
    def default_shapes(device: torch.device | str) -> list[DPOShape]:
        """CPU: B=2 pairs of T=512 (2048 tokens), H=1024, V=32000. CUDA: the Llama-3 head,
        B=4, T=1024 (8192 tokens)."""
        if torch.device(device).type == "cuda":
            return [DPOShape(4, 1024, 4096, 128256, None, "llama3")]
        return [DPOShape(2, 512, 1024, 32000)]

    @staticmethod
    def small_shape(device: torch.device | str) -> DPOShape:
        if torch.device(device).type == "cuda":
            return DPOShape(2, 256, 1024, 32000)
        return DPOShape(2, 64, 128, 4000)

    @staticmethod
    def flops(mode: str, shape: DPOShape) -> int:
        """Forward: policy and reference logits, 2·N·H·V each. Full: the policy's fused
        forward + backward with recompute, 8·N·H·V (as ``bench.flops("full")``), plus the
        reference forward, 2·N·H·V."""
        per_mode = {"forward": 4, "full": 10}
        if mode not in per_mode:
            raise ValueError(f"dpo modes are {tuple(per_mode)}, got {mode!r}")
        return per_mode[mode] * shape.n * shape.h * shape.v

    @staticmethod
    def shape_columns(shape: DPOShape) -> dict:
        return {"B": shape.b, "T": shape.t, "N": shape.n, "H": shape.h, "V": shape.v,
                "softcap": "" if shape.softcap is None else shape.softcap}

    @staticmethod
    def make_inputs(shape: DPOShape, dtype: torch.dtype, device: torch.device | str,
                    seed: int = 0) -> DPOInputs:
        device = torch.device(device)
        torch.manual_seed(seed)
        hidden, weight = _policy_head((2 * shape.b, shape.t), shape.h, shape.v, dtype, device)
        ref_hidden = _perturbed(hidden, 1.0)
        ref_weight = _perturbed(weight, LOGIT_STD / math.sqrt(shape.h))
        labels = make_dpo_labels(shape, device)
        return DPOInputs(shape, hidden, weight, labels, ref_hidden, ref_weight)

    @staticmethod
    def make_provider(name: str, device: torch.device | str, dtype: torch.dtype) -> Provider:
        device = torch.device(device)
        if name == "fastalign":
            from fastalign.fused import FusedDPOLoss

            impl = _fastalign_impl(device, dtype)

            def fn(hidden, weight, labels, ref_hidden, ref_weight, softcap, _impl=impl):
                loss_fn = FusedDPOLoss(beta=DPO_BETA, softcap=softcap, impl=_impl)
                return loss_fn(hidden, weight, labels, ref_hidden=ref_hidden,
                               ref_weight=ref_weight)

            return Provider("fastalign", fn, f"FusedDPOLoss(beta={DPO_BETA}), impl={impl!r}")
        if name == "eager":
            return Provider("eager", eager_dpo, "TRL-style: [2B, T, V] logits, float32 "
                            "log_softmax, gather, masked sums, dpo_loss")
        if name == "compile":
            return Provider("compile", lambda *args: _compiled("dpo", eager_dpo)(*args),
                            "torch.compile(eager)")
        raise ValueError(f"unknown dpo provider {name!r}; known: {', '.join(DPOBench.providers)}")

    @staticmethod
    def reference(inputs: DPOInputs, chunk_bytes: int = _CHUNK_BYTES) -> Tensors:
        """Ground truth in float64 (CPU) or float32 (CUDA), materialising the logits a few
        sequences at a time: (1) summed log-probs of every sequence, policy and reference,
        without grad; (2) the DPO loss and its gradient g [2B] with respect to the policy sums;
        (3) per chunk again, backward of Σ g·logps to hidden and weight."""
        from fastalign.losses.dpo import dpo_loss

        dtype = _reference_dtype(inputs.device)
        shape = inputs.shape
        seqs = max(1, min(2 * shape.b, chunk_bytes // (dtype.itemsize * shape.t * shape.v)))
        chunks = [slice(start, start + seqs) for start in range(0, 2 * shape.b, seqs)]
        weight = inputs.weight.detach().to(dtype).requires_grad_()
        ref_weight = inputs.ref_weight.to(dtype)
        hidden = inputs.hidden.detach()

        def seq_logps(h, w, part):
            return _eager_sequence_logps(h.to(dtype), w, inputs.labels[part], shape.softcap)

        with torch.no_grad():
            policy = [seq_logps(hidden[part], weight, part) for part in chunks]
            ref_sums = torch.cat([seq_logps(inputs.ref_hidden[part], ref_weight, part)[0]
                                  for part in chunks])
        sums = torch.cat([logps for logps, _ in policy]).requires_grad_()
        chosen, rejected = sums.chunk(2)
        ref_chosen, ref_rejected = ref_sums.chunk(2)
        loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=DPO_BETA)
        (grad_sums,) = torch.autograd.grad(loss, sums)
        dhiddens = []
        dweight = torch.zeros_like(weight)
        for part in chunks:
            h = hidden[part].to(dtype).requires_grad_()
            logps, _ = seq_logps(h, weight, part)
            dh, dw = torch.autograd.grad(logps, (h, weight), grad_sums[part])
            dhiddens.append(dh)
            dweight += dw
            del logps, dh, dw, h
        return {"loss": loss.detach(), "dhidden": torch.cat(dhiddens), "dweight": dweight}

    @staticmethod
    def _call(provider: Provider, inputs: DPOInputs):
        return provider.fn(inputs.hidden, inputs.weight, inputs.labels, inputs.ref_hidden,
                           inputs.ref_weight, inputs.shape.softcap)

    @staticmethod
    def run_outputs(provider: Provider, inputs: DPOInputs) -> Tensors:
        loss, _ = DPOBench._call(provider, inputs)
        if loss.dim() != 0 or not loss.dtype.is_floating_point:
            raise ProviderMismatchError(f"{provider.name} returned a loss of shape "
                                        f"{tuple(loss.shape)} {loss.dtype}, expected 0-d float")
        dhidden, dweight = torch.autograd.grad(loss, (inputs.hidden, inputs.weight))
        return {"loss": loss.detach(), "dhidden": dhidden, "dweight": dweight}

    @staticmethod
    def make_mode_fn(provider: Provider, inputs: DPOInputs, mode: str) -> ModeFn:
        h, w = inputs.hidden, inputs.weight
        if mode == "forward":
            return ModeFn(lambda _: DPOBench._call(provider, inputs))
        if mode == "full":
            return ModeFn(lambda _: torch.autograd.grad(DPOBench._call(provider, inputs)[0],
                                                        (h, w)))
        raise ValueError(f"dpo modes are {DPOBench.modes}, got {mode!r}")


LINEAR_KL = LinearKLBench()
DPO = DPOBench()
OPS = {"linear_kl": LINEAR_KL, "dpo": DPO}


def get_op(name: str):
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; known: {', '.join(OPS)}")
    return OPS[name]


# ----------------------------------------------------------------------------------------------
# Checking, measuring, the run
# ----------------------------------------------------------------------------------------------


def check_provider(op, provider: Provider, inputs, reference: Tensors,
                   eager_errors: dict[str, float] | None = None) -> CheckResult:
    """Run ``provider`` forward and backward once and compare with ``reference``; eager's own
    errors widen the tolerance of every other provider. Raises whatever the provider raises."""
    outputs = op.run_outputs(provider, inputs)
    is_eager = provider.name == "eager"
    return check_outputs(outputs, reference, op.value_key, inputs.dtype,
                         None if is_eager else eager_errors, is_eager)


def eager_reference_errors(op, inputs, reference: Tensors) -> dict[str, float] | None:
    """Eager PyTorch's own error in the benchmark dtype (None if it runs out of memory)."""
    try:
        return check_provider(op, op.make_provider("eager", inputs.device, inputs.dtype), inputs,
                              reference).errors
    except Exception as exc:  # noqa: BLE001
        if bench._is_oom(exc):
            bench._free_memory(inputs.device)
            return None
        raise


def measure_mode(op, provider: Provider, inputs, mode: str, timing: TimingOptions,
                 matmul_rate: float | None = None) -> dict:
    """The metrics of ``mode`` of ``provider`` on ``inputs`` (``bench.measure_mode_fn``)."""
    return bench.measure_mode_fn(op.make_mode_fn(provider, inputs, mode), inputs.device,
                                 op.flops(mode, inputs.shape), timing, matmul_rate)


def run_benchmark(op_name: str, config: BenchConfig) -> BenchResult:
    """Check, then measure and time, every (shape, provider, mode) of op ``op_name``.

    ``config`` is ``fastalign.bench.BenchConfig``: empty shapes mean the op's default shapes,
    ``providers=None`` all of the op's providers; modes the op does not have are dropped. The
    loop itself is ``fastalign.bench.run_cases``, shared with ``linear_logprobs``.
    """
    op = get_op(op_name)
    device = bench.check_run_options(config)
    modes = tuple(mode for mode in op.modes if mode in config.modes)
    if not modes:
        raise ValueError(f"{op.name} has modes {op.modes}; none of {config.modes} is one")
    names = list(config.providers or op.providers)
    unknown = [name for name in names if name not in op.providers]
    if unknown:
        raise ValueError(f"unknown {op.name} providers {unknown}; known: {op.providers}")
    config = dataclasses.replace(config, shapes=list(config.shapes or op.default_shapes(device)),
                                 providers=names, modes=modes)

    def build_providers(shape):
        providers, unavailable = [], {}
        for name in names:
            try:
                providers.append(op.make_provider(name, device, config.dtype))
            except ProviderUnavailable as exc:
                unavailable[name] = str(exc)
        return providers, unavailable

    cases = bench.BenchCases(
        op=op.name, shapes=config.shapes, providers=names, modes=modes,
        build_providers=build_providers,
        make_inputs=lambda shape: op.make_inputs(shape, config.dtype, device, config.seed),
        reference=op.reference,
        eager_errors=lambda inputs, reference: eager_reference_errors(op, inputs, reference),
        check=lambda provider, inputs, reference, eager_errors: check_provider(
            op, provider, inputs, reference, eager_errors),
        measure=lambda provider, inputs, mode, rate: measure_mode(op, provider, inputs, mode,
                                                                  config.timing, rate),
        shape_columns=op.shape_columns, truth="ground truth",
    )
    return bench.run_cases(cases, config, device, op=op.name, flops_note=op.flops_note,
                           csv_columns=op.csv_columns)


# The writers are bench's own: they read the op, FLOP note and CSV columns from the result.
format_table = bench.format_table
write_outputs = bench.write_outputs
