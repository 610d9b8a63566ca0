"""Options and shared state of the pytest-benchmark suite (not part of the main test run).

Run ``pytest benchmarks --benchmark-only`` (a small shape). Add ``--bench-full`` or set
``FASTALIGN_BENCH_FULL=1`` to also run the default shape of the device. ``FASTALIGN_BENCH_DEVICE``
(cpu / cuda) and ``FASTALIGN_BENCH_DTYPE`` (float32 / bfloat16 / float16) override the defaults
(cuda when available; float32 on cpu, bfloat16 on cuda). ``FASTALIGN_BENCH_ROUNDS`` sets the
number of timed rounds.

A test module sets ``BENCH_OP``, a name in ``fastalign.bench.registry.BENCHMARKS``: its tests are
parametrized over that op's providers and modes, and the op's inputs, providers, ground truth,
FLOP count and memory measurement are the harness's (``fastalign.bench``), as in
``fastalign bench``; only the timing loop is pytest-benchmark's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

from fastalign.bench import harness, measure
from fastalign.bench.registry import BENCHMARKS, get_benchmark

SHAPE_IDS = ("small", "default")


def pytest_addoption(parser):
    parser.addoption(
        "--bench-full", action="store_true", default=False,
        help="fastalign benchmarks: also run the device's default (large) shape "
             "(same as FASTALIGN_BENCH_FULL=1)",
    )


def bench_device() -> str:
    return os.environ.get("FASTALIGN_BENCH_DEVICE") or (
        "cuda" if torch.cuda.is_available() else "cpu")


def bench_dtype(device: str) -> torch.dtype:
    name = os.environ.get("FASTALIGN_BENCH_DTYPE")
    return harness.DTYPES[name] if name else harness.default_dtype(device)


def pytest_generate_tests(metafunc):
    """Parametrize benchmark tests over shapes × providers × modes, shape by shape, for the op
    named by the module's ``BENCH_OP``."""
    names = ("shape_id", "provider_name", "mode")
    if all(name in metafunc.fixturenames for name in names):
        benchmark = BENCHMARKS[metafunc.module.BENCH_OP]
        cases = [(shape_id, provider, mode) for shape_id in SHAPE_IDS
                 for provider in benchmark.providers for mode in benchmark.modes]
        metafunc.parametrize(",".join(names), cases, ids=["-".join(case) for case in cases])


@dataclass
class Case:
    """Inputs, ground truth and eager's own error for one (op, shape), plus per-provider checks."""

    inputs: object
    reference: harness.Outputs
    eager_errors: dict[str, float] | None
    checks: dict[str, harness.CheckResult | BaseException] = field(default_factory=dict)


class BenchState:
    """Holds one (op, shape) case at a time (the suite runs op by op, shape by shape) and the
    device's matmul rate."""

    def __init__(self, device: str, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self._case: tuple[tuple[str, object], Case] | None = None
        self._matmul: float | None = None

    def shape(self, op_name: str, shape_id: str):
        benchmark = get_benchmark(op_name)
        if shape_id == "small":
            return benchmark.small_shape(self.device)
        return benchmark.default_shapes(self.device)[0]

    def case(self, op_name: str, shape) -> Case:
        key = (op_name, shape)
        if self._case is None or self._case[0] != key:
            self._case = None  # free the previous case first
            benchmark = get_benchmark(op_name)
            inputs = benchmark.make_inputs(shape, self.dtype, self.device)
            reference = benchmark.reference(inputs)
            self._case = (key, Case(inputs, reference, benchmark.eager_errors(inputs, reference)))
        return self._case[1]

    @property
    def matmul_tflops(self) -> float:
        if self._matmul is None:
            self._matmul = measure.matmul_tflops(self.device, self.dtype)
        return self._matmul


@pytest.fixture(scope="session")
def bench_state() -> BenchState:
    device = bench_device()
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("FASTALIGN_BENCH_DEVICE=cuda but CUDA is not available")
    return BenchState(device, bench_dtype(device))


@pytest.fixture(scope="session")
def bench_full(request) -> bool:
    return request.config.getoption("--bench-full") or os.environ.get(
        "FASTALIGN_BENCH_FULL", "0") == "1"


@pytest.fixture
def op_bench(benchmark, bench_state, bench_full):
    """``op_bench(op_name, shape_id, provider_name, mode)`` runs one benchmark of a
    ``test_bench_<op>.py`` module (see ``_run_op_benchmark``)."""

    def run(op_name: str, shape_id: str, provider_name: str, mode: str) -> None:
        _run_op_benchmark(benchmark, bench_state, bench_full, op_name, shape_id, provider_name,
                          mode)

    return run


def _checked_provider(state: BenchState, op_name: str, shape, name: str) -> harness.Provider:
    """The provider, checked once per shape against the ground truth; skip or fail otherwise."""
    op = get_benchmark(op_name)
    try:
        provider = op.make_provider(name, state.device, state.dtype, shape.softcap)
    except harness.ProviderUnavailable as exc:
        pytest.skip(f"{name}: {exc}")
    case = state.case(op_name, shape)
    if name not in case.checks:
        try:
            case.checks[name] = op.check_provider(provider, case.inputs, case.reference,
                                                  case.eager_errors)
        except Exception as exc:  # noqa: BLE001 - peers that fail to run are skipped
            if name.startswith("fastalign"):
                raise
            case.checks[name] = exc
    check = case.checks[name]
    if isinstance(check, BaseException):
        pytest.skip(f"{name} failed to run: {type(check).__name__}: {check}")
    if not check.ok:
        pytest.fail(f"{name} disagrees with the {op.truth} at {shape}: {check.describe()}")
    return provider


def _run_op_benchmark(benchmark, state: BenchState, full: bool, op_name: str, shape_id: str,
                      provider_name: str, mode: str) -> None:
    """Check the provider once per shape against the ground truth, measure peak memory, time
    ``mode`` with pytest-benchmark and store memory, TFLOP/s and the fraction of the matmul rate
    in ``benchmark.extra_info``. Works under ``--benchmark-disable`` too (one untimed call)."""
    if shape_id != "small" and not full:
        pytest.skip("the default shape runs with --bench-full or FASTALIGN_BENCH_FULL=1")
    op = get_benchmark(op_name)
    shape = state.shape(op_name, shape_id)
    provider = _checked_provider(state, op_name, shape, provider_name)
    device = torch.device(state.device)
    fn = op.make_mode_fn(provider, state.case(op_name, shape).inputs, mode)

    def setup():
        arg = fn.setup()
        measure.synchronize(device)  # the forward of mode "backward" stays outside the timing
        return (arg,), {}

    def target(arg):
        fn.run(arg)
        measure.synchronize(device)

    rounds = int(os.environ.get("FASTALIGN_BENCH_ROUNDS", "10" if shape_id == "small" else "3"))
    benchmark.group = f"{op_name} {shape} {harness.dtype_name(state.dtype)} {mode}"
    with harness.provider_env(provider):  # a variant read from the environment (the backward)
        peak_bytes = measure.measure_mode_memory(fn, device)
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
    benchmark.extra_info.update({
        "op": op_name, "provider": provider_name, "mode": mode, "softcap": shape.softcap,
        **op.shape_columns(shape), "dtype": harness.dtype_name(state.dtype),
        "device": measure.device_name(device), "peak_mem_mb": peak_bytes / 2**20,
        "note": provider.note,
    })
    if benchmark.stats is not None:  # None under --benchmark-disable
        tflops = op.flops(mode, shape) / benchmark.stats.stats.median / 1e12
        benchmark.extra_info.update({"tflops": tflops,
                                     "frac_of_matmul": tflops / state.matmul_tflops})
