"""Shared test helpers: linear_logprobs inputs, runs and dtype-aware comparisons, the eager
(logits-based) sequence log-probs that the trainers are checked against, and the example counts
and C++ tilings of the property tests."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

import fastalign
from fastalign import linear_logprobs, linear_logprobs_reference

FUSED_IMPLS = ("triton", "cpp")


def impl_device(impl: str) -> torch.device:
    """Where an implementation is tested: Triton on CUDA if present, else the CPU interpreter."""
    if impl == "cpp":
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def impl_is_available(impl: str) -> bool:
    return impl in fastalign.available_implementations(impl_device(impl))


@dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    bias: torch.Tensor | None
    grad_logp: torch.Tensor
    grad_entropy: torch.Tensor
    options: dict = field(default_factory=dict)


def make_inputs(
    lead_shape, hidden_size, vocab_size, *, dtype=torch.float32, device="cpu", bias=False,
    ignore_fraction=0.25, logit_scale=3.0, options=None, non_contiguous=False, misaligned=False,
    seed=0,
) -> Inputs:
    """Random inputs with logits of standard deviation about ``logit_scale``.

    Targets include 0 and V − 1 whenever there are at least two tokens, a fraction are ignored, and
    the upstream gradients are random (never zero, never all ones). ``misaligned``: every tensor
    starts off a 16-byte boundary.
    """
    gen = torch.Generator().manual_seed(seed)
    lead_shape = tuple(lead_shape)
    n_tokens = math.prod(lead_shape)
    if non_contiguous:  # a strided view: every other column of a wider, transposed buffer
        buffer = torch.randn(hidden_size * 2, *lead_shape[::-1], generator=gen)
        hidden = buffer.permute(*range(buffer.dim() - 1, 0, -1), 0)[..., ::2]
    else:
        hidden = torch.randn(*lead_shape, hidden_size, generator=gen)
    weight = torch.randn(vocab_size, hidden_size, generator=gen)
    weight = weight * (logit_scale / math.sqrt(hidden_size))
    bias_tensor = torch.randn(vocab_size, generator=gen) if bias else None
    targets = torch.randint(0, vocab_size, (n_tokens,), generator=gen)
    if n_tokens >= 2:
        targets[0], targets[-1] = 0, vocab_size - 1
    ignored = torch.rand(n_tokens, generator=gen) < ignore_fraction
    if n_tokens >= 3:
        ignored[:2] = False
    targets[ignored] = (options or {}).get("ignore_index", -100)
    targets = targets.view(lead_shape)
    if non_contiguous:  # every other element of a wider buffer
        targets = torch.stack([targets, torch.zeros_like(targets)], dim=-1)[..., 0]
    grad_logp = torch.randn(lead_shape, generator=gen)
    grad_entropy = torch.randn(lead_shape, generator=gen)
    to = dict(device=device)
    place = misaligned_copy if misaligned else (lambda x: x)
    return Inputs(
        hidden=place(hidden.to(dtype=dtype, **to)),
        weight=place(weight.to(dtype=dtype, **to)),
        targets=place(targets.to(**to)),
        bias=None if bias_tensor is None else place(bias_tensor.to(dtype=dtype, **to)),
        grad_logp=grad_logp.to(**to),
        grad_entropy=grad_entropy.to(**to),
        options=dict(options or {}),
    )


def misaligned_copy(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x``'s values in a view that starts one element into its buffer: off every 16-byte
    boundary, as a slice such as ``labels[0, 1:]`` is."""
    if x is None:
        return None
    view = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape)
    return view.copy_(x)


def zero_padded(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with its last dimension padded to ``size`` with zeros."""
    return torch.nn.functional.pad(x, (0, size - x.shape[-1]))


@dataclass
class Result:
    logp: torch.Tensor
    entropy: torch.Tensor
    grads: dict


def run(inputs: Inputs, *, impl=None, upcast=None, entropy_only=False) -> Result:
    """Forward + backward under the random upstream gradients; ``impl=None`` runs the reference.

    ``upcast`` (a dtype) runs the reference on inputs converted to that dtype: the ground truth.
    """
    leaves = {"hidden": inputs.hidden, "weight": inputs.weight}
    if inputs.bias is not None:
        leaves["bias"] = inputs.bias
    leaves = {
        name: (t.detach().to(upcast) if upcast else t.detach()).requires_grad_()
        for name, t in leaves.items()
    }
    kwargs = dict(bias=leaves.get("bias"), return_entropy=True, **inputs.options)
    if impl is None:
        logp, entropy = linear_logprobs_reference(
            leaves["hidden"], leaves["weight"], inputs.targets, **kwargs,
            compute_dtype=upcast or torch.float32,
        )
    else:
        logp, entropy = linear_logprobs(
            leaves["hidden"], leaves["weight"], inputs.targets, impl=impl, **kwargs
        )
    grad_logp = torch.zeros_like(inputs.grad_logp) if entropy_only else inputs.grad_logp
    grad_entropy = inputs.grad_entropy.to(logp.dtype)
    loss = (logp * grad_logp.to(logp.dtype)).sum() + (entropy * grad_entropy).sum()
    loss.backward()
    return Result(logp.detach(), entropy.detach(), {k: v.grad for k, v in leaves.items()})


def eager_log_probs(inputs: Inputs) -> tuple[dict, torch.Tensor]:
    """(leaves, log_probs): fresh leaves (hidden, weight, bias) requiring grad and the float32
    log-softmax of their logits, the head matmul at the inputs' dtype (as a PyTorch user has
    them)."""
    leaves = {"hidden": inputs.hidden, "weight": inputs.weight}
    if inputs.bias is not None:
        leaves["bias"] = inputs.bias
    leaves = {k: t.detach().clone().requires_grad_() for k, t in leaves.items()}
    logits = leaves["hidden"] @ leaves["weight"].T
    if "bias" in leaves:
        logits = logits + leaves["bias"]
    logits = logits.float()
    softcap = inputs.options.get("softcap")
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / inputs.options.get("temperature", 1.0)
    return leaves, torch.log_softmax(logits, -1)


def eager_same_dtype(inputs: Inputs, entropy_only=False) -> Result:
    """What a PyTorch user gets at the inputs' own dtype: the head matmul in that dtype, then the
    softmax in float32. Its error against the float64 truth sets the bar for low precision."""
    leaves, log_probs = eager_log_probs(inputs)
    ignore_index = inputs.options.get("ignore_index", -100)
    valid = inputs.targets != ignore_index
    safe = torch.where(valid, inputs.targets, 0)
    logp = torch.where(valid, log_probs.gather(-1, safe[..., None]).squeeze(-1), 0.0)
    entropy = torch.where(valid, -(log_probs.exp() * log_probs).sum(-1), 0.0)
    grad_logp = torch.zeros_like(inputs.grad_logp) if entropy_only else inputs.grad_logp
    ((logp * grad_logp).sum() + (entropy * inputs.grad_entropy).sum()).backward()
    return Result(logp.detach(), entropy.detach(), {k: v.grad for k, v in leaves.items()})


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item()


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol=1e-5) -> None:
    """Within ``rtol`` relative to the tensor's scale (elementwise relative error is meaningless
    for entries that are zero in the truth)."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    scale = max(expected.double().abs().max().item() if expected.numel() else 0.0, 1e-6)
    error = max_abs_error(actual, expected)
    assert error <= rtol * scale, f"{name}: max abs error {error:.3g} > {rtol} x scale {scale:.3g}"


def assert_low_precision_ok(actual, torch_same_dtype, truth, name, factor=2.0) -> None:
    """|truth − ours| ≤ factor·|truth − torch at the same dtype| + a small absolute slack."""
    assert actual.shape == truth.shape, f"{name}: shape {actual.shape} != {truth.shape}"
    ours = max_abs_error(actual, truth)
    theirs = max_abs_error(torch_same_dtype, truth)
    scale = truth.double().abs().max().item() if truth.numel() else 0.0
    slack = 1e-4 * scale + 1e-6
    assert ours <= factor * theirs + slack, (
        f"{name}: error {ours:.3g} vs PyTorch's own {theirs:.3g} at this dtype (scale {scale:.3g})"
    )


def eager_sequence_logps(model, input_ids, attention_mask, labels, *, entropy=False):
    """Summed log-probs of the labelled tokens (and per-token entropies) through the logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != -100
    token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    if not entropy:
        return token.sum(-1), mask
    return token.sum(-1), mask, -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------------------------
# Property tests (tests/ops/test_ops_properties.py, tests/losses/test_losses_properties.py)
# ----------------------------------------------------------------------------------------------

EXAMPLES = settings.default.max_examples
# Without a GPU the Triton kernels run in the interpreter, about 0.1 s an example on a 2-core
# machine: a tenth of the examples keeps each Triton property under half a minute in CI (200 in
# "ci", 2000 in "thorough"). Compiled on a GPU they take the full count.
TRITON_EXAMPLES = EXAMPLES if torch.cuda.is_available() else max(EXAMPLES // 10, 1)

requires_cpp = pytest.mark.skipif(not impl_is_available("cpp"), reason="C++ extension not built")
requires_triton = pytest.mark.skipif(not impl_is_available("triton"),
                                     reason="triton not available")


# Block sizes, schedule and thread count of the C++ kernels (None: their own choice).
cpu_tiling = st.one_of(st.none(), st.fixed_dictionaries({
    "FASTALIGN_CPU_SCHEDULE": st.sampled_from(["owned", "shared"]),
    "FASTALIGN_CPU_BLOCK_N": st.integers(1, 5),
    "FASTALIGN_CPU_BLOCK_V": st.integers(1, 16),
    "threads": st.integers(1, 2),
}))


@contextlib.contextmanager
def tiled(tiling):
    """Run the C++ kernels with the given block sizes, schedule and threads, then restore."""
    if tiling is None:
        yield
        return
    names = [name for name in tiling if name.startswith("FASTALIGN_")]
    saved = {name: os.environ.get(name) for name in names}
    threads = torch.get_num_threads()
    try:
        for name in names:
            os.environ[name] = str(tiling[name])
        torch.set_num_threads(tiling["threads"])
        yield
    finally:
        torch.set_num_threads(threads)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def scalar_gradcheck(fn, inputs, *, eps: float = 1e-6, atol: float = 1e-7,
                     rtol: float = 1e-3) -> None:
    """torch.autograd.gradcheck for a scalar ``fn`` whose graph takes one backward only (the ops
    that form their gradients in forward hand them over): the analytical gradients of one fresh
    forward against central differences of ``fn`` in float64, element by element."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    analytical = torch.autograd.grad(fn(*leaves), leaves)
    for index, (leaf, grad) in enumerate(zip(leaves, analytical)):
        numerical = torch.zeros_like(leaf)
        flat = numerical.view(-1)
        for k in range(leaf.numel()):
            values = []
            for sign in (1.0, -1.0):
                shifted = [x.detach().clone() for x in leaves]
                shifted[index].view(-1)[k] += sign * eps
                values.append(float(fn(*[x.requires_grad_() for x in shifted]).detach()))
            flat[k] = (values[0] - values[1]) / (2 * eps)
        torch.testing.assert_close(grad, numerical, atol=atol, rtol=rtol,
                                   msg=lambda m, i=index: f"input {i}: {m}")
