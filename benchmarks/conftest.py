"""Options and shared state of the pytest-benchmark suite (not part of the main test run).

Run ``pytest benchmarks --benchmark-only`` (a small shape). Add ``--bench-full`` or set
``FASTALIGN_BENCH_FULL=1`` to also run the default shape of the device. ``FASTALIGN_BENCH_DEVICE``
(cpu / cuda) and ``FASTALIGN_BENCH_DTYPE`` (float32 / bfloat16 / float16) override the defaults
(cuda when available; float32 on cpu, bfloat16 on cuda). ``FASTALIGN_BENCH_ROUNDS`` sets the
number of timed rounds.

A test module sets ``BENCH_OP`` ("linear_kl", "dpo": ``fastalign.bench_alignment``; default
"linear_logprobs": ``fastalign.bench``) to choose the providers and modes it is parametrized over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

from fastalign import bench, bench_alignment


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
    return bench.DTYPES[name] if name else bench.default_dtype(device)


@dataclass
class ShapeCase:
    """Inputs, float32 reference and eager's own error at one shape, plus per-provider checks."""

    inputs: bench.BenchInputs
    reference: bench.Outputs
    eager_errors: dict[str, float] | None
    checks: dict[str, bench.CheckResult | BaseException] = field(default_factory=dict)


class BenchState:
    """Holds the current shape's case only (the suite runs shape by shape) and the matmul rate."""

    def __init__(self, device: str, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.shapes = bench_shapes(device)
        self._case: tuple[bench.Shape, ShapeCase] | None = None
        self._matmul: float | None = None

    def case(self, shape: bench.Shape) -> ShapeCase:
        if self._case is None or self._case[0] != shape:
            self._case = None  # free the previous shape first
            inputs = bench.make_inputs(shape, self.dtype, self.device)
            reference = bench.reference_outputs(inputs)
            self._case = (shape, ShapeCase(inputs, reference,
                                           bench.eager_reference_errors(inputs, reference)))
        return self._case[1]

    @property
    def matmul_tflops(self) -> float:
        if self._matmul is None:
            self._matmul = bench.matmul_tflops(self.device, self.dtype)
        return self._matmul


def bench_shapes(device: str) -> dict[str, bench.Shape]:
    return {"small": bench.small_shape(device), "default": bench.default_shapes(device)[0]}


def pytest_generate_tests(metafunc):
    """Parametrize benchmark tests over shapes × providers × modes, shape by shape, for the op
    named by the module's ``BENCH_OP`` (default linear_logprobs)."""
    names = ("shape_id", "provider_name", "mode")
    if all(name in metafunc.fixturenames for name in names):
        op_name = getattr(metafunc.module, "BENCH_OP", bench.OP)
        if op_name == bench.OP:
            shape_ids, providers, modes = bench_shapes(bench_device()), bench.PROVIDER_NAMES, \
                bench.MODES
        else:
            op = bench_alignment.get_op(op_name)
            shape_ids, providers, modes = ("small", "default"), op.providers, op.modes
        cases = [(shape_id, provider, mode) for shape_id in shape_ids
                 for provider in providers for mode in modes]
        metafunc.parametrize(",".join(names), cases, ids=["-".join(case) for case in cases])


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


# ----------------------------------------------------------------------------------------------
# linear_kl and dpo (fastalign.bench_alignment)
# ----------------------------------------------------------------------------------------------


@dataclass
class AlignmentCase:
    """Inputs, ground truth and eager's own error for one (op, shape), plus per-provider checks."""

    inputs: object
    reference: dict[str, torch.Tensor]
    eager_errors: dict[str, float] | None
    checks: dict[str, bench_alignment.CheckResult | BaseException] = field(default_factory=dict)


class AlignmentBenchState:
    """Holds one (op, shape) case at a time (the suite runs op by op, shape by shape)."""

    def __init__(self, device: str, dtype: torch.dtype, matmul: BenchState):
        self.device, self.dtype = device, dtype
        self._matmul_state = matmul
        self._case: tuple[tuple[str, object], AlignmentCase] | None = None

    def shape(self, op_name: str, shape_id: str):
        op = bench_alignment.get_op(op_name)
        return op.small_shape(self.device) if shape_id == "small" else (
            op.default_shapes(self.device)[0])

    def case(self, op_name: str, shape) -> AlignmentCase:
        key = (op_name, shape)
        if self._case is None or self._case[0] != key:
            self._case = None  # free the previous case first
            op = bench_alignment.get_op(op_name)
            inputs = op.make_inputs(shape, self.dtype, self.device)
            reference = op.reference(inputs)
            errors = bench_alignment.eager_reference_errors(op, inputs, reference)
            self._case = (key, AlignmentCase(inputs, reference, errors))
        return self._case[1]

    @property
    def matmul_tflops(self) -> float:
        return self._matmul_state.matmul_tflops


@pytest.fixture(scope="session")
def alignment_state(bench_state) -> AlignmentBenchState:
    return AlignmentBenchState(bench_state.device, bench_state.dtype, bench_state)


@pytest.fixture
def alignment_bench(benchmark, alignment_state, bench_full):
    """``alignment_bench(op_name, shape_id, provider_name, mode)`` runs one benchmark of
    test_bench_linear_kl.py or test_bench_dpo.py (see ``_run_alignment_benchmark``)."""

    def run(op_name: str, shape_id: str, provider_name: str, mode: str) -> None:
        _run_alignment_benchmark(benchmark, alignment_state, bench_full, op_name, shape_id,
                                 provider_name, mode)

    return run


def _run_alignment_benchmark(benchmark, state: AlignmentBenchState, full: bool, op_name: str,
                             shape_id: str, provider_name: str, mode: str) -> None:
    """Check the provider once per shape against the ground truth, measure peak memory, time
    ``mode`` with pytest-benchmark and store memory, TFLOP/s and the fraction of the matmul rate
    in ``benchmark.extra_info``. Works under ``--benchmark-disable`` too (one untimed call)."""
    if shape_id != "small" and not full:
        pytest.skip("the default shape runs with --bench-full or FASTALIGN_BENCH_FULL=1")
    op = bench_alignment.get_op(op_name)
    shape = state.shape(op_name, shape_id)
    try:
        provider = op.make_provider(provider_name, state.device, state.dtype)
    except bench.ProviderUnavailable as exc:
        pytest.skip(f"{provider_name}: {exc}")
    case = state.case(op_name, shape)
    if provider_name not in case.checks:
        try:
            case.checks[provider_name] = bench_alignment.check_provider(
                op, provider, case.inputs, case.reference, case.eager_errors)
        except Exception as exc:  # noqa: BLE001 - peers that fail to run are skipped
            if provider_name.startswith("fastalign"):
                raise
            case.checks[provider_name] = exc
    check = case.checks[provider_name]
    if isinstance(check, BaseException):
        pytest.skip(f"{provider_name} failed to run: {type(check).__name__}: {check}")
    if not check.ok:
        pytest.fail(f"{provider_name} disagrees with the ground truth at {shape}: "
                    f"{check.describe()}")

    device = torch.device(state.device)
    fn = op.make_mode_fn(provider, case.inputs, mode)
    peak_bytes = bench.measure_mode_memory(fn, device)

    def setup():
        return (fn.setup(),), {}

    def target(arg):
        fn.run(arg)
        bench.synchronize(device)

    rounds = int(os.environ.get("FASTALIGN_BENCH_ROUNDS", "10" if shape_id == "small" else "3"))
    benchmark.group = f"{op_name} {shape} {bench.dtype_name(state.dtype)} {mode}"
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
    benchmark.extra_info.update({
        "op": op_name, "provider": provider_name, "mode": mode, **op.shape_columns(shape),
        "dtype": bench.dtype_name(state.dtype), "device": bench.device_name(device),
        "peak_mem_mb": peak_bytes / 2**20, "note": provider.note,
    })
    if benchmark.stats is not None:  # None under --benchmark-disable
        tflops = op.flops(mode, shape) / benchmark.stats.stats.median / 1e12
        benchmark.extra_info.update({"tflops": tflops,
                                     "frac_of_matmul": tflops / state.matmul_tflops})
