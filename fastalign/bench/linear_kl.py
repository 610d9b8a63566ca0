"""The ``linear_kl`` benchmark: per-token exact KL(π‖π_ref) of a policy head against a reference.

A policy head (hidden [N, H], weight [V, H], requiring grad) against a reference head
(ref_hidden, ref_weight: no grad, as in RLHF), float32 [N]. Providers:

* ``fastalign-cpp`` / ``fastalign-triton``: ``fastalign.linear_kl(..., impl=...)``, whichever runs
  on the device. The Triton interpreter on CPU is far too slow to time and is not offered.
* ``eager``: both heads' logits materialised in the input dtype → float32 → (softcap) →
  ``log_softmax`` both → ``Σ p·(log p − log q)``.
* ``compile``: ``torch.compile`` of ``eager``.

Modes: ``forward`` (with requires_grad policy inputs, as in training) and ``full`` (forward, then
``torch.autograd.grad`` to hidden and weight for a random float32 upstream gradient).

The reference head is the policy's perturbed by ``heads.REF_NOISE``, so the KL is about 0.1 per
token. The ground truth is ``fastalign.ops.linear_kl.linear_kl_reference`` in float64 (CPU) or
float32 (CUDA), in chunks of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fastalign
from fastalign.bench import heads
from fastalign.bench.harness import (
    Benchmark,
    Outputs,
    Provider,
    ProviderMismatchError,
    ProviderUnavailable,
    eager_provider,
    fused_impl,
)
from fastalign.bench.heads import Shape
from fastalign.bench.measure import ModeFn
from fastalign.ops.linear_kl import linear_kl_reference


@dataclass
class KLInputs(heads.HeadInputs):
    """hidden [N, H], weight [V, H] (requires_grad); ref_hidden, ref_weight (no grad), all in the
    benchmark dtype; grad_kl [N] float32 upstream gradient."""

    shape: Shape
    hidden: torch.Tensor
    weight: torch.Tensor
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    grad_kl: torch.Tensor


def eager_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
             ref_weight: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Plain PyTorch: both heads' logits in the input dtype → float32 → softcap → log_softmax,
    then Σ_v p_v (log p_v − log q_v). Returns float32 [N]."""
    log_p = torch.log_softmax(heads.float_logits(hidden, weight, softcap), dim=-1)
    log_q = torch.log_softmax(heads.float_logits(ref_hidden, ref_weight, softcap), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class LinearKLBenchmark(Benchmark):
    name = "linear_kl"
    summary = ("fastalign.linear_kl (exact per-token KL of a policy head against a frozen "
               "reference head) vs eager (both heads' logits materialised) and torch.compile")
    modes = ("forward", "full")
    modes_note = "(gradients of the policy side only)"
    providers = ("fastalign-triton", "fastalign-cpp", "eager", "compile")
    shape_syntax = heads.SHAPE_SYNTAX
    shape_meaning = heads.SHAPE_MEANING
    default_shapes_help = ("CPU 1024,1024,32000 float32; CUDA the Llama-3 head at N = 4096, "
                           "8192, bf16")
    example_shapes = "256,128,4000,30"
    # Forward: the two heads' logits, 2·N·H·V each. Full: forward + backward, where backward
    # recomputes both heads' logits (4·N·H·V: the reference's are needed for q) and forms the
    # policy's dh = G·W and dW = Gᵀ·h (2·N·H·V each). The materialising providers do not
    # recompute, yet are credited the same, so that TFLOP/s ranks like time.
    flops_per_nhv = {"forward": 4, "full": 12}
    flops_remark = "(backward recomputes both heads)"
    flops_note = ("FLOPs credited: forward 4·N·H·V (both heads' logits), full 12·N·H·V (forward "
                  "4 + backward 8: recompute of both heads 4, dh 2, dW 2), for every provider.")
    shape_columns_names = ("N", "H", "V", "softcap")
    value_key = "kl"
    tolerances = heads.GROUND_TRUTH_TOLERANCES
    eager_half_precision_slack = heads.EAGER_HALF_PRECISION_SLACK
    truth = "ground truth"

    def parse_shape(self, text: str) -> Shape:
        return heads.parse_shape(text)

    def default_shapes(self, device: torch.device | str) -> list[Shape]:
        """CPU: N=1024, H=1024, V=32000. CUDA: the Llama-3 head at 4k and 8k tokens."""
        if torch.device(device).type == "cuda":
            return [Shape(n, 4096, 128256, None, "llama3") for n in (4096, 8192)]
        return [Shape(1024, 1024, 32000)]

    def small_shape(self, device: torch.device | str) -> Shape:
        return heads.small_shape(device)

    def shape_columns(self, shape: Shape) -> dict:
        return {"N": shape.n, "H": shape.h, "V": shape.v,
                "softcap": "" if shape.softcap is None else shape.softcap}

    def make_inputs(self, shape: Shape, dtype: torch.dtype, device: torch.device | str,
                    seed: int = 0) -> KLInputs:
        device = torch.device(device)
        torch.manual_seed(seed)
        hidden, weight = heads.random_head((shape.n,), shape.h, shape.v, dtype, device)
        ref_hidden, ref_weight = heads.reference_head(hidden, weight)
        grad_kl = torch.randn(shape.n, device=device)
        return KLInputs(shape, hidden, weight, ref_hidden, ref_weight, grad_kl)

    def make_provider(self, name: str, device: torch.device | str, dtype: torch.dtype,
                      softcap: float | None = None) -> Provider:
        device = torch.device(device)
        if name in ("fastalign-cpp", "fastalign-triton"):
            impl = name.removeprefix("fastalign-")
            if impl == "triton" and device.type != "cuda":
                raise ProviderUnavailable(
                    "the Triton kernels run on CUDA; the Triton interpreter on CPU is far too "
                    "slow to time")
            if impl != fused_impl(device):
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
        peer = eager_provider(name, self.name, eager_kl, "both heads' logits in the input "
                              "dtype, log_softmax in float32")
        if peer is not None:
            return peer
        raise ValueError(f"unknown linear_kl provider {name!r}; known: "
                         f"{', '.join(self.providers)}")

    def reference(self, inputs: KLInputs,
                  chunk_bytes: int = heads.GROUND_TRUTH_CHUNK_BYTES) -> Outputs:
        """``fastalign.ops.linear_kl.linear_kl_reference`` in float64 (CPU) or float32 (CUDA) on the
        exactly upcast inputs, in chunks of tokens; kl [N], dhidden [N, H], dweight [V, H]."""
        dtype = heads.ground_truth_dtype(inputs.device)
        ref_weight = inputs.ref_weight.to(dtype)

        def kl(h, weight, part):
            return linear_kl_reference(h, weight, inputs.ref_hidden[part].to(dtype), ref_weight,
                                       softcap=inputs.shape.softcap, compute_dtype=dtype)

        return heads.token_chunked_ground_truth(inputs, inputs.grad_kl, dtype, kl, "kl",
                                                chunk_bytes)

    def run_outputs(self, provider: Provider, inputs: KLInputs) -> Outputs:
        kl = provider.fn(inputs.hidden, inputs.weight, inputs.ref_hidden, inputs.ref_weight,
                         inputs.shape.softcap)
        if kl.dtype != torch.float32 or tuple(kl.shape) != (inputs.shape.n,):
            raise ProviderMismatchError(f"{provider.name} returned {kl.dtype} {tuple(kl.shape)}, "
                                        f"expected float32 ({inputs.shape.n},)")
        dhidden, dweight = torch.autograd.grad(kl, (inputs.hidden, inputs.weight), inputs.grad_kl)
        return {"kl": kl.detach(), "dhidden": dhidden, "dweight": dweight}

    def make_mode_fn(self, provider: Provider, inputs: KLInputs, mode: str) -> ModeFn:
        h, w, rh, rw = inputs.hidden, inputs.weight, inputs.ref_hidden, inputs.ref_weight
        sc, g = inputs.shape.softcap, inputs.grad_kl
        if mode == "forward":
            return ModeFn(lambda _: provider.fn(h, w, rh, rw, sc))
        if mode == "full":
            return ModeFn(lambda _: torch.autograd.grad(provider.fn(h, w, rh, rw, sc), (h, w), g))
        raise ValueError(f"{self.name} modes are {self.modes}, got {mode!r}")


BENCHMARK = LinearKLBenchmark()
