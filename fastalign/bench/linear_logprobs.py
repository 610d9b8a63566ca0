"""The ``linear_logprobs`` benchmark: ``fastalign.linear_logprobs`` against its peers.

Every provider computes the same thing from the same inputs: per-token log-probabilities
``logp[N]`` (float32) of ``targets[N]`` under ``softmax(softcap(hidden[N, H] @ weight[V, H]ᵀ))``,
differentiable with respect to ``hidden`` and ``weight``. Providers:

* ``fastalign-<impl>``: ``fastalign.linear_logprobs(..., impl=impl)`` for each implementation that
  can run on the device ("triton" on CUDA, or on CPU under ``TRITON_INTERPRET=1``; "cpp" on CPU).
  "reference" is not a fastalign provider: it is the eager baseline below. ``fastalign-triton``
  runs the chunked backward (``FASTALIGN_TRITON_BACKWARD=chunked``, the default),
  ``fastalign-triton-atomic`` the atomic one.
* ``eager``: ``hidden @ weight.T`` in the input dtype → float32 → softcap → ``log_softmax`` →
  gather, what a user writes without fastalign (the reference's math; the reference itself
  multiplies in float32 and is used as ground truth, see ``reference``).
* ``compile``: ``torch.compile`` of ``eager``.
* ``torch-lce``: ``torch.nn.functional.linear_cross_entropy(..., reduction="none",
  options=LinearCrossEntropyOptions(...))``, negated (it returns the NLL), where torch has it.
* ``liger``, ``cce``, ``cce-exact``: Liger-Kernel's fused linear cross entropy and Cut
  Cross-Entropy (its default, which skips small gradients, and ``filter_eps=None``, which skips
  none), whenever they are installed (CUDA only).
* ``cce-compile``: Cut Cross-Entropy's ``impl="torch_compile"``, its chunk-free implementation
  through ``torch.compile``, on any device (the one CCE offers on CPU).

Modes:

* ``forward``: the forward pass with ``requires_grad`` inputs, as in training: it builds the
  autograd graph and saves what backward needs, so its peak memory includes those saved tensors.
* ``backward``: ``torch.autograd.grad(logp, (hidden, weight), g)`` alone. Before every timed
  call the forward pass runs again, untimed (``ModeFn.setup``), and the timed call consumes that
  fresh graph exactly as a training step does. We do not time repeated backwards through one
  retained graph: ``retain_graph=True`` is refused by ``torch.compile``'s donated buffers, and
  providers that precompute gradients in forward consume them in backward. Peak memory is what
  backward adds on top of what forward left saved. Providers that do their gradient work inside
  forward (Liger) look cheap here and expensive in ``forward``: compare them in ``full``.
* ``full``: forward then ``torch.autograd.grad`` (no retained graph): one training step of the op.

``g`` is a random float32 upstream gradient; inputs are random (never zeros), with logits of
standard deviation ``heads.LOGIT_STD`` so that a Gemma-style softcap of 30 is actually exercised.
Gradients are taken with ``torch.autograd.grad`` so nothing accumulates into ``.grad``.
"""

from __future__ import annotations

import warnings
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
    Tolerance,
    dtype_name,
    eager_provider,
    require_impl,
)
from fastalign.bench.heads import Shape
from fastalign.bench.measure import ModeFn
from fastalign.ops.linear_logprobs import linear_logprobs_reference

FASTALIGN_IMPLS = ("triton", "cpp")
PEER_PROVIDERS = ("eager", "compile", "torch-lce", "liger", "cce", "cce-exact", "cce-compile")

# Heads of the models fastalign targets (see ../shared/GPU.md): (label, H, V, softcap).
GPU_HEADS = (
    ("llama3", 4096, 128256, None),
    ("qwen2.5", 3584, 152064, None),
    ("gemma2", 2304, 256000, 30.0),
)
GPU_TOKENS = (4096, 8192, 16384)


@dataclass
class LogprobInputs(heads.HeadInputs):
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


def eager_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   softcap: float | None = None) -> torch.Tensor:
    """Plain PyTorch: logits in the input dtype, upcast to float32, softcap, log_softmax, gather."""
    log_probs = torch.log_softmax(heads.float_logits(hidden, weight, softcap), dim=-1)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------


def _fastalign_provider(impl: str, device: torch.device, backward: str | None = None) -> Provider:
    """``fastalign.linear_logprobs(impl=impl)``; for Triton, with ``backward`` (a
    ``FASTALIGN_TRITON_BACKWARD`` strategy, None: the default) set while it runs."""
    require_impl(impl, device)

    def fn(hidden, weight, targets, softcap):
        return fastalign.linear_logprobs(hidden, weight, targets, softcap=softcap, impl=impl)

    notes = []
    if impl == "triton" and device.type == "cpu":
        notes.append("Triton interpreter (TRITON_INTERPRET=1)")
    if backward is not None:
        notes.append(f"FASTALIGN_TRITON_BACKWARD={backward}")
    name = f"fastalign-{impl}" + (f"-{backward}" if backward == "atomic" else "")
    env = (("FASTALIGN_TRITON_BACKWARD", backward),) if backward else ()
    return Provider(name, fn, ", ".join(notes), env=env)


def fastalign_provider(name: str, device: torch.device) -> Provider | None:
    """Provider ``fastalign-<impl>`` or ``fastalign-triton-atomic`` (the Triton op with its old
    atomic backward), or None for a name that is neither."""
    if name == "fastalign-triton-atomic":
        return _fastalign_provider("triton", device, backward="atomic")
    impl = name.removeprefix("fastalign-")
    if name.startswith("fastalign-") and impl in FASTALIGN_IMPLS:
        return _fastalign_provider(impl, device, "chunked" if impl == "triton" else None)
    return None


def _lce_options_candidates() -> list:
    options = torch.nn.LinearCrossEntropyOptions
    # First torch's own per-(device, dtype) pick, then the explicit "accurate" policy that the
    # torch docs recommend on backends without native low-precision matmul.
    return [options(), options(acc_policy="accurate", chunking_method="aspect_ratio")]


def _lce_call(options, hidden, weight, targets, reduction="none"):
    import torch.nn.functional as F

    return F.linear_cross_entropy(hidden, weight, targets, reduction=reduction, options=options)


def as_output(nll: torch.Tensor, reduction: str) -> torch.Tensor:
    """A peer's cross entropy as an op's float32 output: per-token log-probs (−NLL) for
    reduction "none" (``linear_logprobs``), the mean NLL itself for "mean" (``linear_nll``)."""
    return -nll.float() if reduction == "none" else nll.float()


def torch_lce_provider(device: torch.device, dtype: torch.dtype, softcap: float | None,
                       reduction: str = "none") -> Provider:
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
        probe = BENCHMARK.make_inputs(Shape(64, 32, 500), dtype, device, seed=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                loss = _lce_call(options, probe.hidden, probe.weight, probe.targets, reduction)
                torch.autograd.grad(loss.float().sum(), (probe.hidden, probe.weight))
            except Exception as exc:  # noqa: BLE001 - any failure means "try the next options"
                failures.append(f"{_describe_options(options)}: {type(exc).__name__}: {exc}")
                continue
        fallback = [str(w.message) for w in caught if "linear_cross_entropy" in str(w.message)]
        if fallback:
            failures.append(f"{_describe_options(options)}: {fallback[0]}")
            continue

        def fn(hidden, weight, targets, softcap, _options=options):
            return as_output(_lce_call(_options, hidden, weight, targets, reduction), reduction)

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


def liger_provider(device: torch.device, reduction: str = "none") -> Provider:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        raise ProviderUnavailable(f"Liger-Kernel is not installed ({exc}; pip install "
                                  "liger-kernel, or benchmarks/wheels on the GPU)") from None
    if device.type != "cuda":
        raise ProviderUnavailable("Liger-Kernel runs on CUDA only")

    def fn(hidden, weight, targets, softcap):
        out = liger_fused_linear_cross_entropy(hidden, weight, targets, reduction=reduction,
                                               softcap=softcap)
        return as_output(out[0] if isinstance(out, tuple) else out, reduction)

    note = ("gradients computed inside forward" if reduction == "mean"
            else "reduction='none': gradients recomputed in backward")
    return Provider("liger", fn, note)


def cce_provider(device: torch.device, exact: bool, reduction: str = "none",
                 compiled: bool = False) -> Provider:
    """Cut Cross-Entropy: by default it skips the gradient of vocabulary blocks whose softmax is
    negligible (``filter_eps="high"``); exact is ``filter_eps=None``, which filters nothing.
    ``compiled``: its ``impl="torch_compile"`` instead of its Triton kernels, on any device."""
    name = "cce-compile" if compiled else "cce-exact" if exact else "cce"
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise ProviderUnavailable(f"Cut Cross-Entropy is not installed ({exc}; pip install "
                                  "cut-cross-entropy, or benchmarks/wheels on the GPU)") from None
    if compiled:
        def fn(hidden, weight, targets, softcap):
            return as_output(linear_cross_entropy(hidden, weight, targets, softcap=softcap,
                                                  reduction=reduction, impl="torch_compile"),
                             reduction)

        return Provider(name, fn, "impl='torch_compile'")
    if device.type != "cuda":
        raise ProviderUnavailable("Cut Cross-Entropy's kernels run on CUDA only")
    kwargs = {"filter_eps": None} if exact else {}

    def fn(hidden, weight, targets, softcap):
        return as_output(linear_cross_entropy(hidden, weight, targets, softcap=softcap,
                                              reduction=reduction, **kwargs), reduction)

    note = "filter_eps=None (no gradient filtering)" if exact else (
        "default filter_eps: skips small gradients (approximate)")
    return Provider(name, fn, note, exact_grads=exact)


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------


class LinearLogprobsBenchmark(Benchmark):
    name = "linear_logprobs"
    summary = ("fastalign.linear_logprobs vs eager, torch.compile, "
               "torch.nn.functional.linear_cross_entropy and (on CUDA, when installed) "
               "Liger-Kernel and Cut Cross-Entropy")
    modes = ("forward", "backward", "full")
    providers = (*(f"fastalign-{impl}" for impl in FASTALIGN_IMPLS), "fastalign-triton-atomic",
                 *PEER_PROVIDERS)
    shape_syntax = heads.SHAPE_SYNTAX
    shape_meaning = heads.SHAPE_MEANING
    default_shapes_help = (
        "CPU 2048,1024,32000 float32; CUDA the Llama-3 (H=4096, V=128256), Qwen2.5 (H=3584, "
        "V=152064) and Gemma-2 (H=2304, V=256000, softcap 30) heads at 4096, 8192 and 16384 "
        "tokens, bfloat16")
    example_shapes = "256,128,4000"
    # With the fused op's exact-gradient work and recompute (ALGORITHMS.md §1): forward the
    # logits h·Wᵀ; backward recomputes them, then dh = G·W and dW = Gᵀ·h, 2·N·H·V each.
    # Softmax, softcap and gather work (O(N·V)) is not counted. A materialising provider does not
    # recompute the logits in backward, yet is credited the same 6·N·H·V.
    flops_per_nhv = {"forward": 2, "backward": 6, "full": 8}
    flops_note = "FLOPs credited: forward 2·N·H·V, backward 6·N·H·V, full 8·N·H·V."
    shape_columns_names = ("N", "H", "V")
    value_key = "logp"
    tolerances = {
        torch.float32: Tolerance(2e-3, 2e-3),  # logp ≈ −log V ≈ −11
        torch.float16: Tolerance(1e-2, 1e-2),
        # A logp returned in bf16 (torch-lce) is off by up to 1/16 where it lies in [-32, -16).
        torch.bfloat16: Tolerance(7e-2, 3e-2),
    }

    def parse_shape(self, text: str) -> Shape:
        return heads.parse_shape(text)

    def default_shapes(self, device: torch.device | str) -> list[Shape]:
        """CPU: one modest shape. CUDA: the Llama-3, Qwen2.5 and Gemma-2 heads at 4k, 8k, 16k
        tokens."""
        if torch.device(device).type == "cuda":
            return [Shape(n, h, v, softcap, label)
                    for label, h, v, softcap in GPU_HEADS for n in GPU_TOKENS]
        return [Shape(2048, 1024, 32000)]

    def small_shape(self, device: torch.device | str) -> Shape:
        return heads.small_shape(device)

    def shape_columns(self, shape: Shape) -> dict:
        return {"N": shape.n, "H": shape.h, "V": shape.v}

    def make_inputs(self, shape: Shape, dtype: torch.dtype, device: torch.device | str,
                    seed: int = 0) -> LogprobInputs:
        """``heads.random_head`` inputs, uniform targets, upstream gradient ~ N(0, 1)."""
        device = torch.device(device)
        torch.manual_seed(seed)
        hidden, weight = heads.random_head((shape.n,), shape.h, shape.v, dtype, device)
        targets = torch.randint(0, shape.v, (shape.n,), device=device)
        grad_logp = torch.randn(shape.n, device=device)
        return LogprobInputs(shape, hidden, weight, targets, grad_logp)

    def make_provider(self, name: str, device: torch.device | str, dtype: torch.dtype,
                      softcap: float | None = None) -> Provider:
        device = torch.device(device)
        ours = fastalign_provider(name, device)
        if ours is not None:
            return ours
        peer = eager_provider(name, self.name, eager_logprobs,
                              "matmul in input dtype, log_softmax in float32")
        if peer is not None:
            return peer
        if name == "torch-lce":
            return torch_lce_provider(device, dtype, softcap)
        if name == "liger":
            return liger_provider(device)
        if name in ("cce", "cce-exact", "cce-compile"):
            return cce_provider(device, exact=name == "cce-exact", compiled=name == "cce-compile")
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(self.providers)}")

    def reference(self, inputs: LogprobInputs,
                  chunk_bytes: int = heads.GROUND_TRUTH_CHUNK_BYTES) -> Outputs:
        """Ground truth: ``linear_logprobs_reference`` in float32 on the (exactly upcast) inputs,
        in chunks of tokens (``heads.token_chunked_ground_truth``)."""

        def logp(h, weight, part):
            return linear_logprobs_reference(h, weight, inputs.targets[part],
                                             softcap=inputs.softcap)

        return heads.token_chunked_ground_truth(inputs, inputs.grad_logp, torch.float32, logp,
                                                "logp", chunk_bytes)

    def run_outputs(self, provider: Provider, inputs: LogprobInputs) -> Outputs:
        logp = provider.fn(inputs.hidden, inputs.weight, inputs.targets, inputs.softcap)
        if logp.dtype != torch.float32 or tuple(logp.shape) != (inputs.shape.n,):
            raise ProviderMismatchError(
                f"{provider.name} returned {logp.dtype} {tuple(logp.shape)}, "
                f"expected float32 ({inputs.shape.n},)")
        dhidden, dweight = torch.autograd.grad(logp, (inputs.hidden, inputs.weight),
                                               inputs.grad_logp)
        return {"logp": logp.detach(), "dhidden": dhidden.float(), "dweight": dweight.float()}

    def make_mode_fn(self, provider: Provider, inputs: LogprobInputs, mode: str) -> ModeFn:
        """``backward``'s setup runs the forward pass (untimed) and its run backpropagates
        through that graph, freeing it, as in training (see the module docstring)."""
        h, w, t, sc = inputs.hidden, inputs.weight, inputs.targets, inputs.softcap
        g = inputs.grad_logp
        if mode == "forward":
            return ModeFn(lambda _: provider.fn(h, w, t, sc))
        if mode == "backward":
            return ModeFn(lambda logp: torch.autograd.grad(logp, (h, w), g),
                          setup=lambda: provider.fn(h, w, t, sc))
        if mode == "full":
            return ModeFn(lambda _: torch.autograd.grad(provider.fn(h, w, t, sc), (h, w), g))
        raise ValueError(f"{self.name} modes are {self.modes}, got {mode!r}")


BENCHMARK = LinearLogprobsBenchmark()
