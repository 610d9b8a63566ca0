"""Options and shared state of the pytest-benchmark suite (not part of the main test run).

Run ``pytest benchmarks --benchmark-only`` (a small shape). Add ``--bench-full`` or set
``FASTALIGN_BENCH_FULL=1`` to also run the default shape of the device. ``FASTALIGN_BENCH_DEVICE``
(cpu / cuda) and ``FASTALIGN_BENCH_DTYPE`` (float32 / bfloat16 / float16) override the defaults
(cuda when available; float32 on cpu, bfloat16 on cuda). ``FASTALIGN_BENCH_ROUNDS`` sets the
number of timed rounds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

from fastalign import bench


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
    """Parametrize benchmark tests over shapes × providers × modes, shape by shape."""
    names = ("shape_id", "provider_name", "mode")
    if all(name in metafunc.fixturenames for name in names):
        cases = [(shape_id, provider, mode) for shape_id in bench_shapes(bench_device())
                 for provider in bench.PROVIDER_NAMES for mode in bench.MODES]
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
