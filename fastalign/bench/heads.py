"""What the benchmarked ops share: all three take hidden states through an LM head.

The shape of one problem (N tokens, hidden size H, vocabulary V, optional softcap), random heads
whose logits have a realistic spread, a reference head close to the policy's, the logits as eager
PyTorch computes them, and the per-token ground truth computed a chunk of tokens at a time
(``linear_logprobs``, ``linear_kl``). ``linear_kl`` and ``dpo`` also judge their providers alike
(``GROUND_TRUTH_TOLERANCES``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastalign.bench.harness import Outputs, Tolerance, parse_dims

LOGIT_STD = 3.0  # std of the random logits: realistic for an LM head, and makes softcap 30 bite
REF_NOISE = 0.1  # reference head = policy head + REF_NOISE·(noise of the policy's own scale)
GROUND_TRUTH_CHUNK_BYTES = 512 * 1024 * 1024  # a ground truth materialises logits this much at once

SHAPE_SYNTAX = "N,H,V[,SOFTCAP]"
SHAPE_MEANING = "N tokens, hidden size H, vocabulary V"


@dataclass(frozen=True)
class Shape:
    """One problem: N tokens, hidden size H, vocabulary V, optional final-logit softcap."""

    n: int
    h: int
    v: int
    softcap: float | None = None
    label: str = ""

    def __str__(self) -> str:
        return shape_title(f"N={self.n} H={self.h} V={self.v}", self.softcap, self.label)


def shape_title(dims: str, softcap: float | None, label: str) -> str:
    """``"llama3 N=4096 H=4096 V=128256 softcap=30"``: the label, the dimensions, the softcap."""
    text = dims if softcap is None else f"{dims} softcap={softcap:g}"
    return f"{label} {text}" if label else text


class HeadInputs:
    """Base of the ops' input dataclasses: the benchmark's device and dtype are ``hidden``'s."""

    hidden: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype


def parse_shape(text: str) -> Shape:
    """Parse ``"N,H,V"`` or ``"N,H,V,SOFTCAP"`` (softcap 0 means none)."""
    (n, h, v), softcap = parse_dims(text, "N,H,V")
    if min(n, h, v) < 1:
        raise ValueError(f"N, H and V must be positive, got {text!r}")
    return Shape(n, h, v, softcap)


def small_shape(device: torch.device | str) -> Shape:
    """A quick shape for smoke runs and the default pytest-benchmark suite."""
    if torch.device(device).type == "cuda":
        return Shape(1024, 1024, 32000)
    return Shape(256, 128, 4000)


def random_head(rows: Sequence[int], h: int, v: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [*rows, H] ~ N(0, 1) and weight [V, H] ~ N(0, LOGIT_STD²/H), both in ``dtype`` and
    requiring grad: the logits have standard deviation about LOGIT_STD."""
    hidden = torch.randn(*rows, h, device=device).to(dtype).requires_grad_()
    weight = torch.randn(v, h, device=device) * (LOGIT_STD / math.sqrt(h))
    return hidden, weight.to(dtype).requires_grad_()


def perturbed(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """tensor + REF_NOISE·scale·N(0, 1), in tensor's dtype, without grad."""
    noise = torch.randn(tensor.shape, device=tensor.device) * (REF_NOISE * scale)
    return (tensor.detach().float() + noise).to(tensor.dtype)


def reference_head(hidden: torch.Tensor,
                   weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen reference close to the policy (``random_head``): KL(π‖π_ref) is about 0.1 per
    token, as early in fine-tuning."""
    return perturbed(hidden, 1.0), perturbed(weight, LOGIT_STD / math.sqrt(weight.shape[-1]))


def float_logits(hidden: torch.Tensor, weight: torch.Tensor,
                 softcap: float | None) -> torch.Tensor:
    """h·Wᵀ in the input dtype, upcast to float32 (float64 stays float64), then the softcap."""
    logits = hidden @ weight.T
    if logits.dtype != torch.float64:
        logits = logits.float()
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def token_chunked_ground_truth(inputs: HeadInputs, upstream: torch.Tensor, dtype: torch.dtype,
                               value_fn: Callable, value_key: str,
                               chunk_bytes: int = GROUND_TRUTH_CHUNK_BYTES) -> Outputs:
    """Ground truth of a per-token op on ``inputs.hidden`` [N, H] and ``inputs.weight`` [V, H],
    upcast exactly to ``dtype``: ``{value_key: value [N], "dhidden", "dweight"}`` for the
    upstream gradient [N].

    ``value_fn(h, weight, part)`` computes the value of the tokens ``part`` from their hidden
    states ``h``. Tokens go a chunk at a time, so that the [chunk, V] logits fit next to the
    providers at the large GPU shapes; dweight is summed over the chunks in ``dtype``.
    """
    n, v = inputs.hidden.shape[0], inputs.weight.shape[0]
    weight = inputs.weight.detach().to(dtype).requires_grad_()
    rows = max(1, min(n, chunk_bytes // (dtype.itemsize * v)))
    values, dhiddens = [], []
    dweight = torch.zeros_like(weight)
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        h = inputs.hidden.detach()[part].to(dtype).requires_grad_()
        value = value_fn(h, weight, part)
        dh, dw = torch.autograd.grad(value, (h, weight), upstream[part].to(dtype))
        values.append(value.detach())
        dhiddens.append(dh)
        dweight += dw
        del value, dh, dw, h
    return {value_key: torch.cat(values), "dhidden": torch.cat(dhiddens), "dweight": dweight}


def ground_truth_dtype(device: torch.device) -> torch.dtype:
    # float64 where it is cheap enough (CPU); float32 on CUDA, where float64 matmuls are slow.
    return torch.float64 if device.type == "cpu" else torch.float32


# The ground truth of linear_kl and dpo (float64 on CPU, float32 on CUDA) judges value and
# gradients within these, plus EAGER_ERROR_FACTOR times eager PyTorch's own error.
GROUND_TRUTH_TOLERANCES = {
    torch.float32: Tolerance(2e-4, 2e-3),
    torch.float16: Tolerance(1e-2, 1e-2),
    torch.bfloat16: Tolerance(3e-2, 3e-2),
}
# In half precision eager PyTorch is the yardstick of the other providers (they may be off by
# EAGER_ERROR_FACTOR times its error), and its own check only guards against gross errors: it
# gets this multiple of GROUND_TRUTH_TOLERANCES. linear_kl's gradients need it: they are driven
# by log p − log q of two nearly equal heads (≈ 0.4), so bf16 logits alone (≈ 0.01 absolute)
# leave eager's dhidden about 6 % off.
EAGER_HALF_PRECISION_SLACK = 5.0
