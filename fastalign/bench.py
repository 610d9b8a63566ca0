"""Benchmark harness for ``linear_logprobs``, shared by the CLI and the pytest-benchmark suite.

Every provider computes the same thing from the same inputs: per-token log-probabilities
``logp[N]`` (float32) of ``targets[N]`` under ``softmax(softcap(hidden[N, H] @ weight[V, H]ᵀ))``,
differentiable with respect to ``hidden`` and ``weight``. Providers:

* ``fastalign-<impl>``: ``fastalign.linear_logprobs(..., impl=impl)`` for each implementation that
  can run on the device ("triton" on CUDA, or on CPU under ``TRITON_INTERPRET=1``; "cpp" on CPU).
  "reference" is not a fastalign provider: it is the eager baseline below.
* ``eager``: ``hidden @ weight.T`` in the input dtype → float32 → softcap → ``log_softmax`` →
  gather, what a user writes without fastalign (the reference's math; the reference itself
  multiplies in float32 and is used as ground truth, see ``reference_outputs``).
* ``compile``: ``torch.compile`` of ``eager``.
* ``torch-lce``: ``torch.nn.functional.linear_cross_entropy(..., reduction="none",
  options=LinearCrossEntropyOptions(...))``, negated (it returns the NLL), where torch has it.
* ``liger``, ``cce``, ``cce-exact``: Liger-Kernel's fused linear cross entropy and Cut
  Cross-Entropy (its default, which skips small gradients, and ``impl="cce_exact"``), whenever
  they import (CUDA only).

Modes (``MODES``):

* ``forward``: the forward pass with ``requires_grad`` inputs, as in training: it builds the
  autograd graph and saves what backward needs, so its peak memory includes those saved tensors.
* ``backward``: ``torch.autograd.grad(logp, (hidden, weight), g)`` alone. Before every timed
  call the forward pass runs again, untimed (``ModeFn.setup``), and the timed call consumes that
  fresh graph exactly as a training step does. We do not time repeated backwards through one
  retained graph: ``retain_graph=True`` is refused by ``torch.compile``'s donated buffers, and
  providers that precompute gradients in forward consume them in backward. On CUDA, CUDA events
  bracket the backward only (``triton.testing.do_bench`` has no untimed setup); on CPU, a timer.
  Peak memory is what backward adds on top of what forward left saved. Providers that do their
  gradient work inside forward (Liger) look cheap here and expensive in ``forward``: compare
  them in ``full``.
* ``full``: forward then ``torch.autograd.grad`` (no retained graph): one training step of the op.

``g`` is a random float32 upstream gradient; inputs are random (never zeros), with logits of
standard deviation ``LOGIT_STD`` so that a Gemma-style softcap of 30 is actually exercised.
Gradients are taken with ``torch.autograd.grad`` so nothing accumulates into ``.grad``.

Before any timing, each provider runs forward and backward once and is compared with the
float32 reference (``check_outputs``); a disagreement beyond a dtype-appropriate tolerance raises
``ProviderMismatchError`` (or, with ``on_mismatch="skip"``, skips the provider with a loud note).
"""

from __future__ import annotations

import csv
import datetime
import gc
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fastalign
from fastalign.memory import measure_peak_memory
from fastalign.ops._backends import cpp_unavailable_reason, triton_unavailable_reason
from fastalign.ops.linear_logprobs import linear_logprobs_reference

OP = "linear_logprobs"
MODES = ("forward", "backward", "full")
CSV_COLUMNS = (
    "op", "provider", "mode", "N", "H", "V", "dtype", "ms_median", "ms_p20", "ms_p80", "tflops",
    "frac_of_matmul", "peak_mem_mb", "device", "torch", "triton", "date",
)
FASTALIGN_IMPLS = ("triton", "cpp")
PEER_PROVIDERS = ("eager", "compile", "torch-lce", "liger", "cce", "cce-exact")
PROVIDER_NAMES = tuple(f"fastalign-{impl}" for impl in FASTALIGN_IMPLS) + PEER_PROVIDERS
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOGIT_STD = 3.0  # std of the random logits: realistic for an LM head, and makes softcap 30 bite

_MiB = 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Shapes and inputs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One problem: N tokens, hidden size H, vocabulary V, optional final-logit softcap."""

    n: int
    h: int
    v: int
    softcap: float | None = None
    label: str = ""

    def __str__(self) -> str:
        text = f"N={self.n} H={self.h} V={self.v}"
        if self.softcap is not None:
            text += f" softcap={self.softcap:g}"
        return f"{self.label} {text}" if self.label else text


def parse_shape(text: str) -> Shape:
    """Parse ``"N,H,V"`` or ``"N,H,V,SOFTCAP"`` (softcap 0 means none)."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (3, 4):
        raise ValueError(f"a shape is N,H,V or N,H,V,SOFTCAP, got {text!r}")
    try:
        n, h, v = (int(part) for part in parts[:3])
        softcap = float(parts[3]) if len(parts) == 4 else None
    except ValueError as exc:
        raise ValueError(f"cannot parse shape {text!r}: {exc}") from None
    if min(n, h, v) < 1:
        raise ValueError(f"N, H and V must be positive, got {text!r}")
    return Shape(n, h, v, softcap or None)


# Heads of the models fastalign targets (see ../shared/GPU.md): (label, H, V, softcap).
GPU_HEADS = (
    ("llama3", 4096, 128256, None),
    ("qwen2.5", 3584, 152064, None),
    ("gemma2", 2304, 256000, 30.0),
)
GPU_TOKENS = (4096, 8192, 16384)


def default_shapes(device: torch.device | str) -> list[Shape]:
    """CPU: one modest shape. CUDA: the Llama-3, Qwen2.5 and Gemma-2 heads at 4k, 8k, 16k tokens."""
    if torch.device(device).type == "cuda":
        return [Shape(n, h, v, softcap, label)
                for label, h, v, softcap in GPU_HEADS for n in GPU_TOKENS]
    return [Shape(2048, 1024, 32000)]


def small_shape(device: torch.device | str) -> Shape:
    """A quick shape for smoke runs and the default pytest-benchmark suite."""
    if torch.device(device).type == "cuda":
        return Shape(1024, 1024, 32000)
    return Shape(256, 128, 4000)


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class BenchInputs:
    """The tensors every provider gets: hidden [N, H] and weight [V, H] (benchmark dtype,
    requires_grad), targets [N] int64 (all valid), grad_logp [N] float32 upstream gradient."""

    shape: Shape
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    grad_logp: torch.Tensor

    @property
    def softcap(self) -> float | None:
        return self.shape.softcap

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str,
                seed: int = 0) -> BenchInputs:
    """Random inputs (never zeros): hidden ~ N(0, 1), weight ~ N(0, (LOGIT_STD²/H)), so the logits
    have standard deviation about LOGIT_STD; uniform targets; upstream gradient ~ N(0, 1)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    hidden = torch.randn(shape.n, shape.h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(shape.v, shape.h, device=device) * (LOGIT_STD / math.sqrt(shape.h)))
    weight = weight.to(dtype).requires_grad_()
    targets = torch.randint(0, shape.v, (shape.n,), device=device)
    grad_logp = torch.randn(shape.n, device=device)
    return BenchInputs(shape, hidden, weight, targets, grad_logp)


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------

LogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "float | None"], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    """A way to compute ``logp = fn(hidden, weight, targets, softcap)``, float32 [N]."""

    name: str
    fn: LogprobFn
    note: str = ""
    exact_grads: bool = True  # False: gradients are approximate by design (checked loosely)


class ProviderUnavailable(Exception):
    """The provider cannot run here; the message says why."""


def eager_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   softcap: float | None = None) -> torch.Tensor:
    """Plain PyTorch: logits in the input dtype, upcast to float32, softcap, log_softmax, gather."""
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


_COMPILED: dict[str, Callable] = {}


def _compiled_eager() -> Callable:
    # One compiled function for the whole process: dynamo re-specialises per shape and softcap.
    if "eager" not in _COMPILED:
        _COMPILED["eager"] = torch.compile(eager_logprobs)
    return _COMPILED["eager"]


def _fastalign_provider(impl: str, device: torch.device, dtype: torch.dtype) -> Provider:
    # available_implementations is the one source of truth; the reason functions explain it.
    if impl not in fastalign.available_implementations(device):
        unavailable_reason = (triton_unavailable_reason if impl == "triton"
                              else cpp_unavailable_reason)
        raise ProviderUnavailable(
            unavailable_reason(device)
            or f"fastalign.available_implementations({device.type!r}) does not list {impl!r}")

    def fn(hidden, weight, targets, softcap):
        return fastalign.linear_logprobs(hidden, weight, targets, softcap=softcap, impl=impl)

    note = "Triton interpreter (TRITON_INTERPRET=1)" if (
        impl == "triton" and device.type == "cpu") else ""
    return Provider(f"fastalign-{impl}", fn, note)


def _lce_options_candidates() -> list:
    options = torch.nn.LinearCrossEntropyOptions
    # First torch's own per-(device, dtype) pick, then the explicit "accurate" policy that the
    # torch docs recommend on backends without native low-precision matmul.
    return [options(), options(acc_policy="accurate", chunking_method="aspect_ratio")]


def _lce_call(options, hidden, weight, targets):
    import torch.nn.functional as F

    return F.linear_cross_entropy(hidden, weight, targets, reduction="none", options=options)


def _torch_lce_provider(device: torch.device, dtype: torch.dtype,
                        softcap: float | None) -> Provider:
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn,
                                                            "LinearCrossEntropyOptions"):
        raise ProviderUnavailable(
            f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    if softcap is not None:
        raise ProviderUnavailable("torch.nn.functional.linear_cross_entropy has no softcap")
    # Probe each chunked configuration on a tiny problem; keep the first that runs the chunked
    # path (torch falls back to the materialising reference path with a warning otherwise).
    failures = []
    for options in _lce_options_candidates():
        probe = make_inputs(Shape(64, 32, 500), dtype, device, seed=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                loss = _lce_call(options, probe.hidden, probe.weight, probe.targets)
                torch.autograd.grad(loss, (probe.hidden, probe.weight),
                                    probe.grad_logp.to(loss.dtype))
            except Exception as exc:  # noqa: BLE001 - any failure means "try the next options"
                failures.append(f"{_describe_options(options)}: {type(exc).__name__}: {exc}")
                continue
        fallback = [str(w.message) for w in caught if "linear_cross_entropy" in str(w.message)]
        if fallback:
            failures.append(f"{_describe_options(options)}: {fallback[0]}")
            continue

        def fn(hidden, weight, targets, softcap, _options=options):
            return -_lce_call(_options, hidden, weight, targets).float()

        note = f"chunked, {_describe_options(options)}"
        if "auto" in (options.acc_policy, options.chunking_method):
            note += f" → {_describe_options(_resolve_lce_options(options, dtype, device))}"
        return Provider("torch-lce", fn, note)
    raise ProviderUnavailable("no chunked configuration ran: " + "; ".join(failures))


def _resolve_lce_options(options, dtype: torch.dtype, device: torch.device):
    # What "auto" resolves to for this (device, dtype); a private torch helper, hence the guard.
    try:
        return options._adjust(4096, 1024, 32000, dtype, device)
    except Exception:  # noqa: BLE001
        return options


def _describe_options(options) -> str:
    text = f"acc_policy={options.acc_policy}, chunking_method={options.chunking_method}"
    if options.acc_dtype is not None:
        text += f", acc_dtype={dtype_name(options.acc_dtype)}"
    return text


def _liger_provider(device: torch.device) -> Provider:
    if device.type != "cuda":
        raise ProviderUnavailable("Liger-Kernel runs on CUDA only")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        raise ProviderUnavailable(f"liger_kernel is not importable ({exc})") from None

    def fn(hidden, weight, targets, softcap):
        out = liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none",
                                               softcap=softcap)
        return -(out[0] if isinstance(out, tuple) else out).float()

    return Provider("liger", fn, "gradients computed inside forward")


def _cce_provider(device: torch.device, exact: bool) -> Provider:
    name = "cce-exact" if exact else "cce"
    if device.type != "cuda":
        raise ProviderUnavailable("Cut Cross-Entropy's kernels run on CUDA only")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise ProviderUnavailable(f"cut_cross_entropy is not importable ({exc})") from None
    kwargs = {"impl": "cce_exact"} if exact else {}

    def fn(hidden, weight, targets, softcap):
        return -linear_cross_entropy(hidden, weight, targets, softcap=softcap, reduction="none",
                                     **kwargs).float()

    note = 'impl="cce_exact"' if exact else "default impl: skips small gradients (approximate)"
    return Provider(name, fn, note, exact_grads=exact)


def make_provider(name: str, device: torch.device | str, dtype: torch.dtype,
                  softcap: float | None = None) -> Provider:
    """Build provider ``name`` for (device, dtype, softcap) or raise ProviderUnavailable."""
    device = torch.device(device)
    if name.startswith("fastalign-") and name[len("fastalign-"):] in FASTALIGN_IMPLS:
        return _fastalign_provider(name[len("fastalign-"):], device, dtype)
    if name == "eager":
        return Provider("eager", eager_logprobs, "matmul in input dtype, log_softmax in float32")
    if name == "compile":
        return Provider("compile", lambda h, w, t, sc: _compiled_eager()(h, w, t, sc),
                        "torch.compile(eager)")
    if name == "torch-lce":
        return _torch_lce_provider(device, dtype, softcap)
    if name == "liger":
        return _liger_provider(device)
    if name in ("cce", "cce-exact"):
        return _cce_provider(device, exact=name == "cce-exact")
    raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDER_NAMES)}")


def build_providers(names: Sequence[str] | None, device: torch.device | str, dtype: torch.dtype,
                    softcap: float | None = None) -> tuple[list[Provider], dict[str, str]]:
    """The runnable providers among ``names`` (all when None) and, for the others, why not."""
    providers, unavailable = [], {}
    for name in names or PROVIDER_NAMES:
        try:
            providers.append(make_provider(name, device, dtype, softcap))
        except ProviderUnavailable as exc:
            unavailable[name] = str(exc)
    return providers, unavailable


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------


@dataclass
class Outputs:
    """float32 logp [N], dhidden [N, H], dweight [V, H] for the shared upstream gradient."""

    logp: torch.Tensor
    dhidden: torch.Tensor
    dweight: torch.Tensor


@dataclass(frozen=True)
class Tolerance:
    logp_atol: float  # on max|logp − ref|, where logp ≈ −log V ≈ −11
    grad_rtol: float  # on max|grad − ref| / max|ref|, for dhidden and dweight


TOLERANCES = {
    torch.float32: Tolerance(2e-3, 2e-3),
    torch.float16: Tolerance(1e-2, 1e-2),
    # A logp returned in bf16 (torch-lce) is off by up to 1/16 where it lies in [-32, -16).
    torch.bfloat16: Tolerance(7e-2, 3e-2),
}
# Low-precision providers may also be off by this multiple of eager PyTorch's own error in the
# same dtype (flash-attention and CCE test this way): |ref − ours| ≤ k·|ref − eager| + tolerance.
EAGER_ERROR_FACTOR = 2.0
APPROX_GRAD_RTOL = 0.2  # providers that skip small gradients by design (CCE's default)


class ProviderMismatchError(AssertionError):
    """A provider disagrees with the reference beyond tolerance."""


def reference_outputs(inputs: BenchInputs, chunk_bytes: int = 512 * _MiB) -> Outputs:
    """Ground truth: ``fastalign.ops``' reference in float32 on the (exactly upcast) inputs.

    Processed in chunks of tokens, so that the float32 [chunk, V] logits fit next to the providers
    at the large GPU shapes; dweight is summed over chunks in float32.
    """
    hidden = inputs.hidden.detach()
    weight = inputs.weight.detach().float().requires_grad_()
    rows = max(1, min(inputs.shape.n, chunk_bytes // (4 * inputs.shape.v)))
    logps, dhiddens = [], []
    dweight = torch.zeros_like(weight)
    for start in range(0, inputs.shape.n, rows):
        part = slice(start, start + rows)
        h = hidden[part].float().requires_grad_()
        logp = linear_logprobs_reference(h, weight, inputs.targets[part], softcap=inputs.softcap)
        dh, dw = torch.autograd.grad(logp, (h, weight), inputs.grad_logp[part])
        logps.append(logp.detach())
        dhiddens.append(dh)
        dweight += dw
        del logp, dh, dw, h
    return Outputs(torch.cat(logps), torch.cat(dhiddens), dweight)


def run_outputs(provider: Provider, inputs: BenchInputs) -> Outputs:
    """Run forward and backward once (this also compiles/warms up) and return float32 results."""
    logp = provider.fn(inputs.hidden, inputs.weight, inputs.targets, inputs.softcap)
    if logp.dtype != torch.float32 or tuple(logp.shape) != (inputs.shape.n,):
        raise ProviderMismatchError(
            f"{provider.name} returned {logp.dtype} {tuple(logp.shape)}, "
            f"expected float32 ({inputs.shape.n},)")
    dhidden, dweight = torch.autograd.grad(logp, (inputs.hidden, inputs.weight), inputs.grad_logp)
    return Outputs(logp.detach(), dhidden.float(), dweight.float())


@dataclass
class CheckResult:
    ok: bool
    errors: dict[str, float]  # see output_errors
    allowed: dict[str, float]

    def describe(self) -> str:
        return ", ".join(f"{key} {self.errors[key]:.2e} (allowed {self.allowed[key]:.2e})"
                         for key in self.errors)


def output_errors(outputs: Outputs, reference: Outputs) -> dict[str, float]:
    """logp: max|out − ref| (absolute); dhidden, dweight: max|out − ref| / max|ref|."""
    errors = {"logp": float((outputs.logp - reference.logp).abs().max())}
    for key in ("dhidden", "dweight"):
        got, ref = getattr(outputs, key), getattr(reference, key)
        errors[key] = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return errors


def check_outputs(outputs: Outputs, reference: Outputs, dtype: torch.dtype,
                  eager_errors: dict[str, float] | None = None,
                  exact_grads: bool = True) -> CheckResult:
    """Compare with the reference: ``TOLERANCES`` plus a multiple of eager's own error."""
    tol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    errors = output_errors(outputs, reference)
    grad_rtol = tol.grad_rtol if exact_grads else APPROX_GRAD_RTOL
    allowed = {"logp": tol.logp_atol, "dhidden": grad_rtol, "dweight": grad_rtol}
    for key in allowed:
        if eager_errors is not None and math.isfinite(eager_errors.get(key, math.nan)):
            allowed[key] += EAGER_ERROR_FACTOR * eager_errors[key]
    ok = all(math.isfinite(errors[key]) and errors[key] <= allowed[key] for key in allowed)
    return CheckResult(ok, errors, allowed)


def check_provider(provider: Provider, inputs: BenchInputs, reference: Outputs,
                   eager_errors: dict[str, float] | None = None) -> CheckResult:
    """Run ``provider`` forward and backward once and compare with ``reference``.

    ``eager_errors`` (eager's own ``CheckResult.errors`` in this dtype) widens the tolerance of
    every provider but eager itself. Raises whatever the provider raises.
    """
    outputs = run_outputs(provider, inputs)
    return check_outputs(outputs, reference, inputs.dtype,
                         None if provider.name == "eager" else eager_errors,
                         provider.exact_grads)


# ----------------------------------------------------------------------------------------------
# Modes, FLOPs, timing
# ----------------------------------------------------------------------------------------------


def flops(mode: str, shape: Shape) -> int:
    """FLOPs credited to one call, the same for every provider so that TFLOP/s ranks like time.

    With the fused op's exact-gradient work and recompute (ALGORITHMS.md §1):

    * forward:  2·N·H·V   (the logits h·Wᵀ)
    * backward: 6·N·H·V   (recompute the logits 2·N·H·V, dh = G·W 2·N·H·V, dW = Gᵀ·h 2·N·H·V)
    * full:     8·N·H·V

    Softmax, softcap and gather work (O(N·V)) is not counted. A materialising provider does not
    recompute the logits in backward, yet is credited the same 6·N·H·V.
    """
    per_mode = {"forward": 2, "backward": 6, "full": 8}
    if mode not in per_mode:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return per_mode[mode] * shape.n * shape.h * shape.v


def _no_setup() -> None:
    return None


@dataclass(frozen=True)
class ModeFn:
    """One call of a mode is ``run(setup())``; only ``run`` is timed and memory-measured."""

    run: Callable[[object], object]
    setup: Callable[[], object] = _no_setup

    @property
    def has_setup(self) -> bool:
        return self.setup is not _no_setup

    def __call__(self) -> object:
        return self.run(self.setup())


def make_mode_fn(provider: Provider, inputs: BenchInputs, mode: str) -> ModeFn:
    """``mode`` of ``provider`` on ``inputs`` as a ``ModeFn``.

    ``backward``'s setup runs the forward pass (untimed) and its run backpropagates through that
    graph, freeing it, as in training (see the module docstring).
    """
    h, w, t, sc, g = inputs.hidden, inputs.weight, inputs.targets, inputs.softcap, inputs.grad_logp
    if mode == "forward":
        return ModeFn(lambda _: provider.fn(h, w, t, sc))
    if mode == "backward":
        return ModeFn(lambda logp: torch.autograd.grad(logp, (h, w), g),
                      setup=lambda: provider.fn(h, w, t, sc))
    if mode == "full":
        return ModeFn(lambda _: torch.autograd.grad(provider.fn(h, w, t, sc), (h, w), g))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class TimingOptions:
    """CPU: ``warmup`` + ``reps`` timed calls. CUDA: ``triton.testing.do_bench`` budgets in ms."""

    warmup: int = 1
    reps: int = 5
    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100


def time_fn(fn: Callable[[], object] | ModeFn, device: torch.device | str,
            options: TimingOptions = TimingOptions()) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of ``fn()``, or of ``fn.run`` for a ModeFn
    with a setup (the setup runs before every call, untimed)."""
    device = torch.device(device)
    setup = fn.setup if isinstance(fn, ModeFn) and fn.has_setup else None
    run = fn.run if setup is not None else (lambda _: fn())
    if device.type == "cuda" and setup is None:
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=options.cuda_warmup_ms, rep=options.cuda_rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(median), float(p20), float(p80)
    if device.type == "cuda":
        times = _cuda_times_with_setup(run, setup or _no_setup, device, options)
    else:
        for _ in range(options.warmup):
            run((setup or _no_setup)())
        times = []
        for _ in range(max(1, options.reps)):
            state = (setup or _no_setup)()
            start = time.perf_counter()
            run(state)
            times.append((time.perf_counter() - start) * 1e3)
            del state
    return _quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8)


def _cuda_times_with_setup(run: Callable[[object], object], setup: Callable[[], object],
                           device: torch.device, options: TimingOptions) -> list[float]:
    """do_bench's recipe (flush L2, warm up and repeat for time budgets) with CUDA events around
    ``run`` only; ``setup`` is enqueued before the start event, so its GPU work is not counted."""
    flush = torch.empty(256 * _MiB, dtype=torch.int8, device=device)

    def once() -> float:
        state = setup()
        flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run(state)
        end.record()
        del state
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)

    estimate = statistics.median(once() for _ in range(5))
    for _ in range(max(1, int(options.cuda_warmup_ms / max(estimate, 1e-3)))):
        once()
    return [once() for _ in range(max(1, int(options.cuda_rep_ms / max(estimate, 1e-3))))]


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (as ``torch.quantile`` / ``do_bench``)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def matmul_tflops(device: torch.device | str, dtype: torch.dtype, size: int | None = None,
                  options: TimingOptions = TimingOptions()) -> float:
    """The device's own matrix-product rate: a square ``torch.mm`` of random data in ``dtype``."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    median, _, _ = time_fn(lambda: torch.mm(a, b), device, options)
    return 2 * size**3 / (median * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            match = re.search(r"^model name\s*:\s*(.+)$", info.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_name(device: torch.device | str) -> str:
    """GPU name, or the CPU model string with the number of cores this process may use."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({cpu_cores()} cores)"


def device_slug(device: torch.device | str) -> str:
    """File-name-safe form of ``device_name``: "nvidia-h100-80gb-hbm3", "cpu-intel-xeon-2c"."""
    device = torch.device(device)
    if device.type == "cuda":
        text = torch.cuda.get_device_name(device)
    else:
        text = f"cpu {cpu_model()} {cpu_cores()}c"
    text = re.sub(r"\((r|tm|c)\)|\b(cpu @|processor)\b", " ", text.lower())
    return re.sub(r"[^a-z0-9.]+", "-", text).strip("-.") or device.type


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version}


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    shapes: list[Shape] = field(default_factory=list)  # empty: default_shapes(device)
    providers: list[str] | None = None  # None: all of PROVIDER_NAMES
    modes: tuple[str, ...] = MODES
    timing: TimingOptions = TimingOptions()
    on_mismatch: str = "error"  # "error": raise ProviderMismatchError; "skip": record and go on
    seed: int = 0
    progress: bool = True


@dataclass
class Skip:
    shape: Shape
    provider: str
    mode: str  # "*" for all modes
    reason: str


@dataclass
class BenchResult:
    config: BenchConfig
    rows: list[dict]
    skipped: list[Skip]
    notes: dict[str, str]  # provider -> what exactly ran (options, caveats)
    matmul_tflops: float
    device: str
    date: str
    # What the writers below print; the defaults are linear_logprobs'. Other harnesses
    # (fastalign.bench_alignment) reuse format_table, plot, write_csv and write_outputs with theirs.
    op: str = OP
    flops_note: str = "FLOPs credited: forward 2·N·H·V, backward 6·N·H·V, full 8·N·H·V."
    csv_columns: tuple[str, ...] = CSV_COLUMNS


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _tensor_bytes(value: object) -> int:
    """Bytes held by the tensors in ``value`` (a tensor or nested tuples/lists of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def measure_mode_memory(fn: ModeFn, device: torch.device | str) -> int:
    """Workspace: the peak bytes that ``fn.run`` adds on top of the memory in use after
    ``fn.setup`` (the inputs, and for ``backward`` the saved graph), beyond what it returns.

    What a call returns (log-probs; the gradients of hidden and weight) is the same for every
    provider and is needed by the caller anyway, so it is left out: the number is the memory the
    op itself costs. For ``full`` that excludes the inputs and the returned gradients.
    """
    state = fn.setup()
    synchronize(torch.device(device))
    result, peak_bytes = measure_peak_memory(lambda: fn.run(state), device)
    state = None  # noqa: F841 - drop the graph now
    return max(0, peak_bytes - _tensor_bytes(result))


def measure_mode_fn(fn: ModeFn, device: torch.device, n_flops: int, timing: TimingOptions,
                    matmul_rate: float | None = None) -> dict:
    """Peak memory (one separate, un-timed call) then time of ``fn``; returns the metrics."""
    peak_bytes = measure_mode_memory(fn, device)
    ms_median, ms_p20, ms_p80 = time_fn(fn, device, timing)
    tflops = n_flops / (ms_median * 1e-3) / 1e12
    return {
        "ms_median": ms_median, "ms_p20": ms_p20, "ms_p80": ms_p80, "tflops": tflops,
        "frac_of_matmul": tflops / matmul_rate if matmul_rate else math.nan,
        "peak_mem_mb": peak_bytes / _MiB,
    }


def measure_mode(provider: Provider, inputs: BenchInputs, mode: str, timing: TimingOptions,
                 matmul_rate: float | None = None) -> dict:
    """The metrics of ``mode`` of ``provider`` on ``inputs`` (``measure_mode_fn``)."""
    return measure_mode_fn(make_mode_fn(provider, inputs, mode), inputs.device,
                           flops(mode, inputs.shape), timing, matmul_rate)


@dataclass(frozen=True)
class BenchCases:
    """What the shared check-then-measure loop (``run_cases``) needs to know about one op."""

    op: str
    shapes: list
    providers: list[str]
    modes: tuple[str, ...]
    build_providers: Callable  # shape -> (providers, {name: why unavailable})
    make_inputs: Callable  # shape -> inputs
    reference: Callable  # inputs -> ground truth
    eager_errors: Callable  # (inputs, reference) -> eager's own errors, or None
    check: Callable  # (provider, inputs, reference, eager_errors) -> CheckResult-like
    measure: Callable  # (provider, inputs, mode, matmul_rate) -> metrics
    shape_columns: Callable  # shape -> the CSV's shape columns
    truth: str = "reference"  # what the messages call the ground truth


def check_run_options(config: BenchConfig) -> torch.device:
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch.cuda.is_available() is False")
    if config.on_mismatch not in ("error", "skip"):
        raise ValueError(f"on_mismatch must be 'error' or 'skip', got {config.on_mismatch!r}")
    return device


def run_cases(cases: BenchCases, config: BenchConfig, device: torch.device, **result_fields):
    """Check, then time and measure, every (shape, provider, mode) of ``cases``.

    Providers that cannot run, run out of memory or (peers only) fail are recorded as skipped;
    a fastalign provider that fails or disagrees raises, unless ``config.on_mismatch`` is "skip".
    ``result_fields`` go to the ``BenchResult`` (op, FLOP note, CSV columns).
    """
    from tqdm.auto import tqdm

    env = versions()
    date = datetime.date.today().isoformat()
    dev_name = device_name(device)
    rate = matmul_tflops(device, config.dtype, options=config.timing)
    rows, skipped, notes = [], [], {}
    n_runs = len(cases.shapes) * len(cases.providers) * len(cases.modes)
    desc = "bench" if cases.op == OP else f"bench {cases.op}"
    bar = tqdm(total=n_runs, desc=desc, unit="run", disable=not config.progress,
               file=sys.stderr, dynamic_ncols=True)

    def skip(shape, name, reason, mode="*"):
        skipped.append(Skip(shape, name, mode, reason))
        bar.update(len(cases.modes) if mode == "*" else 1)

    for shape in cases.shapes:
        providers, unavailable = cases.build_providers(shape)
        for name, reason in unavailable.items():
            skip(shape, name, reason)
        # eager first: its own error against the ground truth sets the low-precision tolerance.
        providers.sort(key=lambda p: p.name != "eager")
        inputs = cases.make_inputs(shape)
        bar.set_postfix_str(f"{shape} ground truth")
        reference = cases.reference(inputs)
        eager_errors = (cases.eager_errors(inputs, reference)
                        if "eager" not in cases.providers else None)
        for provider in providers:
            ours = provider.name.startswith("fastalign")
            bar.set_postfix_str(f"{shape} {provider.name} check")
            try:
                check = cases.check(provider, inputs, reference, eager_errors)
            except Exception as exc:  # noqa: BLE001 - recorded below, or re-raised
                _free_memory(device)
                reason = f"{type(exc).__name__}: {_first_line(exc)}"
                if _is_oom(exc) or not ours:
                    skip(shape, provider.name, reason)
                    continue
                if config.on_mismatch == "error":
                    raise
                print(f"\n!!! ERROR: {provider.name} at {shape}: {reason}; skipped",
                      file=sys.stderr)
                skip(shape, provider.name, f"ERROR {reason}")
                continue
            if provider.name == "eager":
                eager_errors = check.errors
            if not check.ok:
                message = (f"{provider.name} disagrees with the {cases.truth} at {shape} "
                           f"{dtype_name(config.dtype)}: {check.describe()}")
                if config.on_mismatch == "error":
                    raise ProviderMismatchError(message)
                print(f"\n!!! MISMATCH: {message}; skipped", file=sys.stderr)
                skip(shape, provider.name, f"MISMATCH: {check.describe()}")
                continue
            notes[provider.name] = provider.note
            for mode in cases.modes:
                bar.set_postfix_str(f"{shape} {provider.name} {mode}")
                try:
                    metrics = cases.measure(provider, inputs, mode, rate)
                except Exception as exc:  # noqa: BLE001
                    _free_memory(device)
                    if not (_is_oom(exc) or config.on_mismatch == "skip" or not ours):
                        raise
                    skip(shape, provider.name, f"{type(exc).__name__}: {_first_line(exc)}", mode)
                    continue
                rows.append({
                    "op": cases.op, "provider": provider.name, "mode": mode,
                    **cases.shape_columns(shape), "dtype": dtype_name(config.dtype), **metrics,
                    "device": dev_name, **env, "date": date, "shape": shape,
                })
                bar.update(1)
            _free_memory(device)
        del inputs, reference
        _free_memory(device)
    bar.close()
    return BenchResult(config, rows, skipped, notes, rate, dev_name, date, **result_fields)


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Check, then time and measure, every (shape, provider, mode); see the module docstring."""
    device = check_run_options(config)
    names = list(config.providers or PROVIDER_NAMES)
    cases = BenchCases(
        op=OP,
        shapes=config.shapes or default_shapes(device),
        providers=names,
        modes=tuple(config.modes),
        build_providers=lambda shape: build_providers(names, device, config.dtype,
                                                      shape.softcap),
        make_inputs=lambda shape: make_inputs(shape, config.dtype, device, config.seed),
        reference=reference_outputs,
        eager_errors=eager_reference_errors,
        check=check_provider,
        measure=lambda provider, inputs, mode, rate: measure_mode(provider, inputs, mode,
                                                                  config.timing, rate),
        shape_columns=lambda shape: {"N": shape.n, "H": shape.h, "V": shape.v},
    )
    return run_cases(cases, config, device)


def eager_reference_errors(inputs: BenchInputs, reference: Outputs) -> dict[str, float] | None:
    """Eager PyTorch's own error in the benchmark dtype (None if it runs out of memory)."""
    try:
        return check_provider(make_provider("eager", inputs.device, inputs.dtype), inputs,
                              reference).errors
    except Exception as exc:  # noqa: BLE001
        if _is_oom(exc):
            _free_memory(inputs.device)
            return None
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# Outputs: CSV, table, plot
# ----------------------------------------------------------------------------------------------

_CSV_FORMATS = {"ms_median": "{:.4f}", "ms_p20": "{:.4f}", "ms_p80": "{:.4f}", "tflops": "{:.4f}",
                "frac_of_matmul": "{:.4f}", "peak_mem_mb": "{:.1f}"}


def write_csv(result: BenchResult, path: str | Path) -> None:
    """One row per (shape, provider, mode), columns ``result.csv_columns``."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=result.csv_columns, extrasaction="ignore")
        writer.writeheader()
        for row in result.rows:
            writer.writerow({key: _CSV_FORMATS[key].format(value) if key in _CSV_FORMATS else value
                             for key, value in row.items()})


def _row_shape(row: dict) -> Shape:
    return row.get("shape") or Shape(row["N"], row["H"], row["V"])


def _shapes_in_order(result: BenchResult) -> list[Shape]:
    seen = {}
    for row in result.rows:
        seen.setdefault(_row_shape(row), None)
    for item in result.skipped:
        seen.setdefault(item.shape, None)
    return list(seen)


def format_table(result: BenchResult) -> str:
    """A markdown table (one block per shape) with time and memory ratios against eager."""
    cfg = result.config
    lines = [
        f"## `{result.op}` on {result.device}, {dtype_name(cfg.dtype)} "
        f"(torch {torch.__version__}, triton {versions()['triton']}, {result.date})",
        "",
        f"Matmul rate (`torch.mm`, {dtype_name(cfg.dtype)}): {result.matmul_tflops:.2f} TFLOP/s. "
        f"{result.flops_note} "
        "Ratios are provider ÷ eager (lower is better).",
    ]
    for shape in _shapes_in_order(result):
        rows = [row for row in result.rows if _row_shape(row) == shape]
        eager = {row["mode"]: row for row in rows if row["provider"] == "eager"}
        lines += ["", f"### {shape}", "",
                  "| provider | mode | ms median [p20, p80] | TFLOP/s | % of matmul | peak MB "
                  "| time ÷ eager | mem ÷ eager |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        skips = [item for item in result.skipped if item.shape == shape]
        order = dict.fromkeys([row["provider"] for row in rows] + [item.provider for item in skips])
        for name in order:
            for row in (row for row in rows if row["provider"] == name):
                base = eager.get(row["mode"])
                time_ratio = _ratio(row["ms_median"], base and base["ms_median"])
                # Below 1 MB, CPU peaks are page-level noise: no memory ratio.
                mem_ratio = _ratio(row["peak_mem_mb"], base and base["peak_mem_mb"], floor=1.0)
                lines.append(
                    f"| {name} | {row['mode']} | {row['ms_median']:.2f} "
                    f"[{row['ms_p20']:.2f}, {row['ms_p80']:.2f}] | {row['tflops']:.3g} "
                    f"| {100 * row['frac_of_matmul']:.1f} | {_format_mb(row['peak_mem_mb'])} "
                    f"| {time_ratio} | {mem_ratio} |")
            for item in (item for item in skips if item.provider == name):
                modes = "all modes" if item.mode == "*" else item.mode
                lines.append(f"| {name} | {modes} | skipped: {item.reason} | | | | | |")
    if result.notes:
        lines += ["", "Providers: " + "; ".join(
            f"`{name}`: {note}" for name, note in result.notes.items() if note) + "."]
    return "\n".join(lines)


def _format_mb(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _ratio(value: float, base: float | None, floor: float = 0.0) -> str:
    if not base or not math.isfinite(base) or base <= floor:
        return "–"
    return f"{value / base:.2f}×"


def plot(result: BenchResult, path: str | Path) -> None:
    """One row of two panels per shape: median ms (with p20–p80 whiskers) and peak memory, as
    bars grouped by mode, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [shape for shape in _shapes_in_order(result)
              if any(_row_shape(row) == shape for row in result.rows)]
    if not shapes:
        return
    providers = list(dict.fromkeys(row["provider"] for row in result.rows))
    modes = list(result.config.modes)
    width = 0.8 / max(1, len(providers))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 3.6 * len(shapes)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, shape in enumerate(shapes):
        rows = {(row["provider"], row["mode"]): row for row in result.rows
                if _row_shape(row) == shape}
        for j, provider in enumerate(providers):
            xs, ms, lo, hi, mem = [], [], [], [], []
            for k, mode in enumerate(modes):
                row = rows.get((provider, mode))
                if row is None:
                    continue
                xs.append(k + (j - (len(providers) - 1) / 2) * width)
                ms.append(row["ms_median"])
                lo.append(row["ms_median"] - row["ms_p20"])
                hi.append(row["ms_p80"] - row["ms_median"])
                mem.append(row["peak_mem_mb"])
            color = colors[j % len(colors)]
            axes[i, 0].bar(xs, ms, width, yerr=[lo, hi], capsize=2, color=color, label=provider)
            axes[i, 1].bar(xs, mem, width, color=color, label=provider)
        for ax, ylabel in zip(axes[i], ("ms (median, p20–p80)", "peak memory (MB)")):
            ax.set_xticks(range(len(modes)), modes)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{shape} {dtype_name(result.config.dtype)}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.set_ylim(bottom=0)
    axes[0, 1].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{result.op} on {result.device} — torch {torch.__version__}, "
                 f"triton {versions()['triton']}, {result.date}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: BenchResult, output_dir: str | Path) -> dict[str, Path]:
    """Write ``<dir>/<op>_<device-slug>_<date>.{csv,png,md}``; returns the paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result.op}_{device_slug(result.config.device)}_{result.date}"
    paths = {ext: output_dir / f"{stem}.{ext}" for ext in ("csv", "png", "md")}
    write_csv(result, paths["csv"])
    paths["md"].write_text(format_table(result) + "\n")
    if result.rows:
        plot(result, paths["png"])
    else:
        del paths["png"]
    return paths
