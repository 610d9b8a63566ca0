"""The benchmark harness, the same for every op: what a benchmark declares, and how it is run.

A benchmarked op is a :class:`Benchmark` (one module per op in this package, all listed in
``fastalign.bench.registry.BENCHMARKS``): its shapes, inputs, providers, modes, FLOP formula,
ground truth and help text. The harness does the rest, alike for every op:

* **Check.** Before any timing, each provider runs forward and backward once and is compared
  with the op's ground truth (``Benchmark.reference``): the op's value within an absolute
  tolerance, the gradients within a tolerance relative to their largest entry, both widened by
  ``EAGER_ERROR_FACTOR`` times eager PyTorch's own error in the benchmark dtype (flash-attention
  and CCE judge low-precision kernels this way). A disagreement raises ``ProviderMismatchError``
  (or, with ``on_mismatch="skip"``, skips the provider with a loud note).
* **Time.** A mode is a :class:`ModeFn`: an untimed ``setup`` (``backward`` runs the forward pass
  there) and a timed ``run``. CUDA: ``triton.testing.do_bench``, or CUDA events around ``run``
  alone when there is a setup (do_bench has none); CPU: a warm-up, then a timer around repeated
  calls. Median, 20th and 80th percentiles.
* **Measure memory**, in a separate untimed call: the workspace ``run`` adds beyond its inputs
  and beyond what it returns (``measure_mode_memory``; the peak itself is ``bench.memory``'s).
* **Credit FLOPs** from the op's written formula, the same for every provider, so that TFLOP/s
  ranks like time, and compare with the device's own ``torch.mm`` rate.
* **Write** ``<op>_<device>_<date>.csv`` (with the hardware and versions), ``.png`` and ``.md``.

Timing, memory and the machine's description are in ``bench.measure``; the CSV, table and plot
writers in ``bench.report``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

import fastalign
from fastalign.bench.measure import (
    ModeFn,
    TimingOptions,
    device_name,
    free_memory,
    is_oom,
    matmul_tflops,
    measure_mode_fn,
    measure_mode_memory,
    time_interleaved,
    timing_metrics,
    versions,
)

MODES = ("forward", "backward", "full")  # every mode an op may have, in the order shown
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Low-precision providers may also be off by this multiple of eager PyTorch's own error in the
# same dtype: |ref − ours| ≤ k·|ref − eager| + tolerance.
EAGER_ERROR_FACTOR = 2.0
APPROX_GRAD_RTOL = 0.2  # providers that skip small gradients by design (CCE's default)
# Metrics columns of every CSV, after the op's shape columns.
METRIC_COLUMNS = ("dtype", "ms_median", "ms_p20", "ms_p80", "tflops", "frac_of_matmul",
                  "peak_mem_mb", "device", "torch", "triton", "date")

_MiB = 1024 * 1024


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dims(text: str, dims: str, what: str = "shape") -> tuple[list[int], float | None]:
    """Split ``text``, ``dims`` (names such as ``"N,H,V"``) optionally followed by ``,SOFTCAP``,
    into the integers and the softcap (None when absent or 0). Range checks are the op's."""
    parts = [part.strip() for part in text.split(",")]
    count = len(dims.split(","))
    if len(parts) not in (count, count + 1):
        raise ValueError(f"a {what} is {dims} or {dims},SOFTCAP, got {text!r}")
    try:
        values = [int(part) for part in parts[:count]]
        softcap = float(parts[count]) if len(parts) > count else None
    except ValueError as exc:
        raise ValueError(f"cannot parse {what} {text!r}: {exc}") from None
    return values, softcap or None


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    """One way to compute the op; ``fn`` takes the op's tensors (see the op's module)."""

    name: str
    fn: Callable
    note: str = ""  # what exactly runs (options, caveats), printed under the table
    exact_grads: bool = True  # False: gradients are approximate by design (checked loosely)
    # Environment variables set while the provider is checked, timed and measured: a variant of
    # an op read from the environment at backward time (FASTALIGN_TRITON_BACKWARD) is a provider.
    env: tuple[tuple[str, str], ...] = ()


@contextlib.contextmanager
def provider_env(provider: Provider) -> Iterator[None]:
    """Set ``provider.env`` for the duration of the block, then restore the variables."""
    saved = {name: os.environ.get(name) for name, _ in provider.env}
    os.environ.update(dict(provider.env))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class ProviderUnavailable(Exception):
    """The provider cannot run here; the message says why."""


class ProviderMismatchError(AssertionError):
    """A provider disagrees with the ground truth beyond tolerance."""


def require_impl(impl: str, device: torch.device) -> None:
    """Raise ProviderUnavailable, saying why, unless fastalign's ``impl`` runs on ``device``."""
    # available_implementations is the one source of truth; the reason functions explain it.
    if impl in fastalign.available_implementations(device):
        return
    from fastalign.ops._backends import cpp_unavailable_reason, triton_unavailable_reason

    unavailable_reason = triton_unavailable_reason if impl == "triton" else cpp_unavailable_reason
    raise ProviderUnavailable(
        unavailable_reason(device)
        or f"fastalign.available_implementations({device.type!r}) does not list {impl!r}")


def fused_impl(device: torch.device) -> str:
    """The fastalign implementation worth timing on ``device`` ("triton" on CUDA, "cpp" on CPU:
    the Triton interpreter is far too slow), or raise ProviderUnavailable."""
    impl = "triton" if device.type == "cuda" else "cpp"
    require_impl(impl, device)
    return impl


_COMPILED: dict[str, Callable] = {}


def compiled(name: str, fn: Callable) -> Callable:
    """``torch.compile(fn)``, once per process and name: dynamo re-specialises per shape."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def eager_provider(name: str, op: str, eager_fn: Callable, note: str) -> Provider | None:
    """Provider ``eager`` (``eager_fn``, plain PyTorch) or ``compile`` (``torch.compile`` of it,
    compiled on first use) of ``op``; None for any other name."""
    if name == "eager":
        return Provider("eager", eager_fn, note)
    if name == "compile":
        return Provider("compile", lambda *args: compiled(op, eager_fn)(*args),
                        "torch.compile(eager)")
    return None


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------

Outputs = dict[str, torch.Tensor]  # the op's value first, then the gradients of its inputs


@dataclass(frozen=True)
class Tolerance:
    value_atol: float  # on max|value − ref| of the op's value (log-probs, KL, the loss)
    grad_rtol: float  # on max|grad − ref| / max|ref|, for each gradient


@dataclass
class CheckResult:
    ok: bool
    errors: dict[str, float]  # see output_errors
    allowed: dict[str, float]

    def describe(self) -> str:
        return ", ".join(f"{key} {self.errors[key]:.2e} (allowed {self.allowed[key]:.2e})"
                         for key in self.errors)


def output_errors(outputs: Outputs, reference: Outputs, value_key: str) -> dict[str, float]:
    """``value_key``: max|out − ref| (absolute); the gradients: max|out − ref| / max|ref|."""
    errors = {}
    for key, ref in reference.items():
        diff = float((outputs[key].double() - ref.double()).abs().max())
        errors[key] = diff if key == value_key else diff / max(float(ref.abs().max()), 1e-30)
    return errors


def check_outputs(outputs: Outputs, reference: Outputs, value_key: str, tolerance: Tolerance,
                  eager_errors: dict[str, float] | None = None, *, slack: float = 1.0,
                  exact_grads: bool = True) -> CheckResult:
    """Compare with the ground truth: ``slack`` times ``tolerance`` (``APPROX_GRAD_RTOL`` for
    approximate gradients) plus ``EAGER_ERROR_FACTOR`` times eager's own errors."""
    errors = output_errors(outputs, reference, value_key)
    grad_rtol = tolerance.grad_rtol if exact_grads else APPROX_GRAD_RTOL
    allowed = {key: slack * (tolerance.value_atol if key == value_key else grad_rtol)
               for key in errors}
    for key in allowed:
        if eager_errors is not None and math.isfinite(eager_errors.get(key, math.nan)):
            allowed[key] += EAGER_ERROR_FACTOR * eager_errors[key]
    ok = all(math.isfinite(errors[key]) and errors[key] <= allowed[key] for key in allowed)
    return CheckResult(ok, errors, allowed)


# ----------------------------------------------------------------------------------------------
# What an op declares
# ----------------------------------------------------------------------------------------------


class Benchmark:
    """One benchmarked op. A subclass (one module per op) sets the attributes and implements the
    methods that raise NotImplementedError; checking and measuring are the same for every op.

    Every shape has ``n``, ``h``, ``v`` (tokens, hidden size, vocabulary: the FLOP formula's
    units) and ``softcap``; every provider's ``fn`` takes the op's tensors from its inputs.
    """

    name: str
    summary: str  # what is compared with what, for `fastalign bench --help`
    modes: tuple[str, ...]  # a subset of MODES, in its order
    modes_note: str = ""  # what the modes compute, when not obvious
    providers: tuple[str, ...]  # every provider name, fastalign's first
    shape_syntax: str  # e.g. "N,H,V[,SOFTCAP]"
    shape_meaning: str  # e.g. "N tokens, hidden size H, vocabulary V"
    default_shapes_help: str  # the default shapes per device, in words
    example_shapes: str  # a quick CPU shape for the examples in --help
    flops_per_nhv: dict[str, int]  # mode -> FLOPs credited to one call, in units of N·H·V
    flops_remark: str = ""  # after the formulas in --help
    flops_note: str  # the sentence on FLOPs under the table's title
    shape_columns_names: tuple[str, ...]  # the CSV's shape columns (see shape_columns)
    value_key: str  # the key of the op's value in its Outputs
    tolerances: dict[torch.dtype, Tolerance]
    eager_half_precision_slack: float = 1.0  # eager's own check, in half precision, gets this ×
    truth: str = "reference"  # what the messages call the ground truth

    # -- to implement ----------------------------------------------------------------------------

    def parse_shape(self, text: str):
        raise NotImplementedError

    def default_shapes(self, device: torch.device | str) -> list:
        raise NotImplementedError

    def small_shape(self, device: torch.device | str):
        """A quick shape for smoke runs and the default pytest-benchmark suite."""
        raise NotImplementedError

    def shape_columns(self, shape) -> dict:
        raise NotImplementedError

    def make_inputs(self, shape, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
        """Random inputs (never zeros); ``.device``, ``.dtype`` and ``.shape`` attributes."""
        raise NotImplementedError

    def make_provider(self, name: str, device: torch.device | str, dtype: torch.dtype,
                      softcap: float | None = None) -> Provider:
        """Provider ``name`` for (device, dtype, softcap), or raise ProviderUnavailable."""
        raise NotImplementedError

    def reference(self, inputs) -> Outputs:
        """The ground truth of ``run_outputs``."""
        raise NotImplementedError

    def run_outputs(self, provider: Provider, inputs) -> Outputs:
        """Forward and backward once (this also compiles and warms up)."""
        raise NotImplementedError

    def make_mode_fn(self, provider: Provider, inputs, mode: str) -> ModeFn:
        raise NotImplementedError

    # -- the same for every op -------------------------------------------------------------------

    @property
    def csv_columns(self) -> tuple[str, ...]:
        return ("op", "provider", "mode", *self.shape_columns_names, *METRIC_COLUMNS)

    def flops(self, mode: str, shape) -> int:
        """FLOPs credited to one call of ``mode``, the same for every provider (``flops_note``)."""
        if mode not in self.flops_per_nhv:
            raise ValueError(f"{self.name} modes are {self.modes}, got {mode!r}")
        return self.flops_per_nhv[mode] * shape.n * shape.h * shape.v

    def check_provider(self, provider: Provider, inputs, reference: Outputs,
                       eager_errors: dict[str, float] | None = None) -> CheckResult:
        """Run ``provider`` forward and backward once and compare with ``reference``.

        ``eager_errors`` (eager's own ``CheckResult.errors`` in this dtype) widens the tolerance
        of every provider but eager itself. Raises whatever the provider raises.
        """
        with provider_env(provider):
            outputs = self.run_outputs(provider, inputs)
        is_eager = provider.name == "eager"
        half = inputs.dtype in (torch.bfloat16, torch.float16)
        tolerance = self.tolerances.get(inputs.dtype, self.tolerances[torch.float32])
        return check_outputs(outputs, reference, self.value_key, tolerance,
                             None if is_eager else eager_errors,
                             slack=self.eager_half_precision_slack if is_eager and half else 1.0,
                             exact_grads=provider.exact_grads)

    def eager_errors(self, inputs, reference: Outputs) -> dict[str, float] | None:
        """Eager PyTorch's own error in the benchmark dtype (None if it runs out of memory)."""
        try:
            eager = self.make_provider("eager", inputs.device, inputs.dtype)
            return self.check_provider(eager, inputs, reference).errors
        except Exception as exc:  # noqa: BLE001
            if is_oom(exc):
                free_memory(inputs.device)
                return None
            raise

    def build_providers(self, names: Sequence[str] | None, device: torch.device | str,
                        dtype: torch.dtype, softcap: float | None = None
                        ) -> tuple[list[Provider], dict[str, str]]:
        """The runnable providers among ``names`` (all when None) and, for the others, why not."""
        providers, unavailable = [], {}
        for name in names or self.providers:
            try:
                providers.append(self.make_provider(name, device, dtype, softcap))
            except ProviderUnavailable as exc:
                unavailable[name] = str(exc)
        return providers, unavailable

    def measure(self, provider: Provider, inputs, mode: str, timing: TimingOptions,
                matmul_rate: float | None = None) -> dict:
        """The metrics of ``mode`` of ``provider`` on ``inputs`` (``measure_mode_fn``)."""
        with provider_env(provider):
            return measure_mode_fn(self.make_mode_fn(provider, inputs, mode), inputs.device,
                                   self.flops(mode, inputs.shape), timing, matmul_rate)

    def mode_fn_in_env(self, provider: Provider, inputs, mode: str) -> ModeFn:
        """``make_mode_fn`` whose setup and run each set ``provider.env`` while they run (for
        calls made outside ``provider_env``: the rounds of interleaved timing)."""
        fn = self.make_mode_fn(provider, inputs, mode)

        def setup():
            with provider_env(provider):
                return fn.setup()

        def run(state):
            with provider_env(provider):
                return fn.run(state)

        return ModeFn(run, setup)

    def describe_flops(self) -> str:
        """``"forward 2*N*H*V, full 8*N*H*V"`` and the remark, for --help."""
        text = ", ".join(f"{mode} {self.flops_per_nhv[mode]}*N*H*V" for mode in self.modes)
        return f"{text} {self.flops_remark}" if self.flops_remark else text

    def describe(self) -> str:
        """The summary and the modes, for --help."""
        modes = ", ".join(self.modes) + (f" {self.modes_note}" if self.modes_note else "")
        return f"{self.summary}; modes {modes}."


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    shapes: list = field(default_factory=list)  # empty: the op's default shapes on the device
    providers: list[str] | None = None  # None: all of the op's
    modes: tuple[str, ...] = MODES  # those the op does not have are dropped
    timing: TimingOptions = TimingOptions()
    on_mismatch: str = "error"  # "error": raise ProviderMismatchError; "skip": record and go on
    seed: int = 0
    progress: bool = True


@dataclass
class Skip:
    shape: object
    provider: str
    mode: str  # "*" for all modes
    reason: str


@dataclass
class BenchResult:
    config: BenchConfig  # with the shapes, providers and modes that ran
    rows: list[dict]
    skipped: list[Skip]
    notes: dict[str, str]  # provider -> what exactly ran (options, caveats)
    matmul_tflops: float
    device: str
    date: str
    op: str
    flops_note: str
    csv_columns: tuple[str, ...]


def _resolved_config(benchmark: Benchmark, config: BenchConfig,
                     device: torch.device) -> BenchConfig:
    """``config`` with the op's defaults filled in; raises ValueError for what the op lacks."""
    if config.on_mismatch not in ("error", "skip"):
        raise ValueError(f"on_mismatch must be 'error' or 'skip', got {config.on_mismatch!r}")
    modes = tuple(mode for mode in benchmark.modes if mode in config.modes)
    if not modes:
        raise ValueError(f"{benchmark.name} has modes {benchmark.modes}; none of {config.modes} "
                         "is one")
    names = list(config.providers or benchmark.providers)
    unknown = [name for name in names if name not in benchmark.providers]
    if unknown:
        raise ValueError(f"unknown {benchmark.name} providers {unknown}; known: "
                         f"{benchmark.providers}")
    shapes = list(config.shapes or benchmark.default_shapes(device))
    return dataclasses.replace(config, shapes=shapes, providers=names, modes=modes)


@dataclass
class PendingTiming:
    """A row measured for memory whose timing comes later, in the shape's interleaved rounds."""

    row: dict
    fn: ModeFn
    n_flops: int


def interleaves(config: BenchConfig, device: torch.device) -> bool:
    """Whether the providers of a shape are timed in rounds (``TimingOptions.interleave``; CPU
    only: on CUDA, do_bench's short, flushed repetitions are not exposed to minutes of drift)."""
    return config.timing.interleave and device.type == "cpu"


def time_pending(pending: list[PendingTiming], timing: TimingOptions,
                 matmul_rate: float) -> None:
    """Time every pending row in interleaved rounds (``time_interleaved``) and fill in its
    timing fields; the list is emptied."""
    if pending:
        times = time_interleaved([item.fn for item in pending], timing)
        for item, measured in zip(pending, times):
            item.row.update(timing_metrics(measured, item.n_flops, matmul_rate))
    pending.clear()


@dataclass
class ShapeRun:
    """One shape's inputs, ground truth and eager's own error, shared by all its providers."""

    shape: object
    inputs: object
    reference: Outputs
    eager_errors: dict[str, float] | None  # set when eager is checked, if it is a provider


def prepare_shape(benchmark: Benchmark, shape, config: BenchConfig, device: torch.device,
                  eager_is_provider: bool) -> ShapeRun:
    """Inputs and ground truth of ``shape``; eager's own error now unless eager will be checked
    as a provider (then ``run_provider`` fills it in: run eager first)."""
    inputs = benchmark.make_inputs(shape, config.dtype, device, config.seed)
    reference = benchmark.reference(inputs)
    eager_errors = None if eager_is_provider else benchmark.eager_errors(inputs, reference)
    return ShapeRun(shape, inputs, reference, eager_errors)


def run_provider(benchmark: Benchmark, run: ShapeRun, provider: Provider, config: BenchConfig,
                 matmul_rate: float, row_fields: dict,
                 on_step: Callable[[str], None] = lambda step: None,
                 pending: list[PendingTiming] | None = None,
                 ) -> tuple[list[dict], list[Skip], bool]:
    """Check ``provider`` on ``run``, then measure each of ``config.modes``: (rows, skips, checked).

    Providers that run out of memory or (peers only) fail are skipped; a fastalign provider that
    fails or disagrees raises, unless ``config.on_mismatch`` is "skip". ``row_fields`` (device,
    versions, date) go into every row. With ``pending`` (a list) and interleaved timing, rows
    are measured for memory here and appended to ``pending`` for ``time_pending`` to time.
    """
    device, shape = run.inputs.device, run.shape
    ours = provider.name.startswith("fastalign")
    on_step(f"{shape} {provider.name} check")
    try:
        check = benchmark.check_provider(provider, run.inputs, run.reference, run.eager_errors)
    except Exception as exc:  # noqa: BLE001 - recorded below, or re-raised
        free_memory(device)
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        if is_oom(exc) or not ours:
            return [], [Skip(shape, provider.name, "*", reason)], False
        if config.on_mismatch == "error":
            raise
        print(f"\n!!! ERROR: {provider.name} at {shape}: {reason}; skipped", file=sys.stderr)
        return [], [Skip(shape, provider.name, "*", f"ERROR {reason}")], False
    if provider.name == "eager":
        run.eager_errors = check.errors
    if not check.ok:
        message = (f"{provider.name} disagrees with the {benchmark.truth} at {shape} "
                   f"{dtype_name(config.dtype)}: {check.describe()}")
        if config.on_mismatch == "error":
            raise ProviderMismatchError(message)
        print(f"\n!!! MISMATCH: {message}; skipped", file=sys.stderr)
        return [], [Skip(shape, provider.name, "*", f"MISMATCH: {check.describe()}")], False
    rows, skipped = [], []
    defer = pending is not None and interleaves(config, device)
    for mode in config.modes:
        on_step(f"{shape} {provider.name} {mode}")
        try:
            if defer:
                fn = benchmark.mode_fn_in_env(provider, run.inputs, mode)
                metrics = {"peak_mem_mb": measure_mode_memory(fn, device) / 2**20}
            else:
                metrics = benchmark.measure(provider, run.inputs, mode, config.timing,
                                            matmul_rate)
        except Exception as exc:  # noqa: BLE001
            free_memory(device)
            if not (is_oom(exc) or config.on_mismatch == "skip" or not ours):
                raise
            skipped.append(Skip(shape, provider.name, mode,
                                f"{type(exc).__name__}: {_first_line(exc)}"))
            continue
        rows.append({
            "op": benchmark.name, "provider": provider.name, "mode": mode,
            **benchmark.shape_columns(shape), "dtype": dtype_name(config.dtype),
            **metrics, **row_fields, "shape": shape,
        })
        if defer:
            pending.append(PendingTiming(rows[-1], fn, benchmark.flops(mode, shape)))
    free_memory(device)
    return rows, skipped, True


def run_benchmark(benchmark: Benchmark, config: BenchConfig) -> BenchResult:
    """Check, then time and measure, every (shape, provider, mode) of ``benchmark``.

    Providers that cannot run, run out of memory or (peers only) fail are recorded as skipped;
    a fastalign provider that fails or disagrees raises, unless ``config.on_mismatch`` is "skip".
    """
    from tqdm.auto import tqdm

    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch.cuda.is_available() is False")
    config = _resolved_config(benchmark, config, device)
    date = datetime.date.today().isoformat()
    dev_name = device_name(device)
    row_fields = {"device": dev_name, **versions(), "date": date}
    rate = matmul_tflops(device, config.dtype, options=config.timing)
    rows, skipped, notes = [], [], {}
    modes = config.modes
    bar = tqdm(total=len(config.shapes) * len(config.providers) * len(modes),
               desc=f"bench {benchmark.name}", unit="run", disable=not config.progress,
               file=sys.stderr, dynamic_ncols=True)

    def record(new_rows: list[dict], new_skips: list[Skip]) -> None:
        rows.extend(new_rows)
        skipped.extend(new_skips)
        bar.update(len(new_rows) + sum(len(modes) if item.mode == "*" else 1
                                       for item in new_skips))

    for shape in config.shapes:
        providers, unavailable = benchmark.build_providers(config.providers, device, config.dtype,
                                                           shape.softcap)
        record([], [Skip(shape, name, "*", reason) for name, reason in unavailable.items()])
        # eager first: its own error against the ground truth sets the low-precision tolerance.
        providers.sort(key=lambda p: p.name != "eager")
        bar.set_postfix_str(f"{shape} ground truth")
        run = prepare_shape(benchmark, shape, config, device, "eager" in config.providers)
        pending: list[PendingTiming] = []
        for provider in providers:
            new_rows, new_skips, checked = run_provider(benchmark, run, provider, config, rate,
                                                        row_fields, bar.set_postfix_str, pending)
            if checked:
                notes[provider.name] = provider.note
            record(new_rows, new_skips)
        if pending:
            bar.set_postfix_str(f"{shape} timing {len(pending)} runs in interleaved rounds")
            time_pending(pending, config.timing, rate)
        del run
        free_memory(device)
    bar.close()
    return BenchResult(config, rows, skipped, notes, rate, dev_name, date, op=benchmark.name,
                       flops_note=benchmark.flops_note, csv_columns=benchmark.csv_columns)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
