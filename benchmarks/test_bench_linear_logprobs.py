"""pytest-benchmark suite for ``linear_logprobs``: providers × modes at a small and a default shape.

Uses ``fastalign.bench`` for the providers, the modes, the correctness check, the FLOP count and
the memory measurement; only the timing loop is pytest-benchmark's. Each test checks its provider
against the float32 reference before timing it, and stores peak memory, TFLOP/s and the fraction
of the device's matmul rate in ``benchmark.extra_info``. See ``conftest.py`` for the options.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastalign import bench


def _rounds(shape_id: str) -> int:
    return int(os.environ.get("FASTALIGN_BENCH_ROUNDS", "10" if shape_id == "small" else "3"))


def _checked_provider(state, case, shape: bench.Shape, name: str) -> bench.Provider:
    """The provider, checked once per shape against the reference; skip or fail otherwise."""
    try:
        provider = bench.make_provider(name, state.device, state.dtype, shape.softcap)
    except bench.ProviderUnavailable as exc:
        pytest.skip(f"{name}: {exc}")
    if name not in case.checks:
        try:
            case.checks[name] = bench.check_provider(provider, case.inputs, case.reference,
                                                     case.eager_errors)
        except Exception as exc:  # noqa: BLE001 - peers that fail to run are skipped
            if name.startswith("fastalign-"):
                raise
            case.checks[name] = exc
    check = case.checks[name]
    if isinstance(check, BaseException):
        pytest.skip(f"{name} failed to run: {type(check).__name__}: {check}")
    if not check.ok:
        pytest.fail(f"{name} disagrees with the reference at {shape}: {check.describe()}")
    return provider


def test_linear_logprobs(benchmark, bench_state, bench_full, shape_id, provider_name, mode):
    """Parametrized by conftest.pytest_generate_tests over shapes × providers × modes."""
    if shape_id != "small" and not bench_full:
        pytest.skip("the default shape runs with --bench-full or FASTALIGN_BENCH_FULL=1")
    shape = bench_state.shapes[shape_id]
    case = bench_state.case(shape)
    provider = _checked_provider(bench_state, case, shape, provider_name)
    device = torch.device(bench_state.device)
    fn = bench.make_mode_fn(provider, case.inputs, mode)
    peak_bytes = bench.measure_mode_memory(fn, device)

    def setup():
        state = fn.setup()
        bench.synchronize(device)  # the forward of mode "backward" stays outside the timing
        return (state,), {}

    def target(state):
        fn.run(state)
        bench.synchronize(device)

    benchmark.group = f"{bench.OP} {shape} {bench.dtype_name(bench_state.dtype)} {mode}"
    benchmark.pedantic(target, setup=setup, rounds=_rounds(shape_id), warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, untimed
        return
    median_s = benchmark.stats.stats.median
    tflops = bench.flops(mode, shape) / median_s / 1e12
    benchmark.extra_info.update({
        "op": bench.OP, "provider": provider_name, "mode": mode, "N": shape.n, "H": shape.h,
        "V": shape.v, "softcap": shape.softcap, "dtype": bench.dtype_name(bench_state.dtype),
        "device": bench.device_name(device), "peak_mem_mb": peak_bytes / 2**20,
        "tflops": tflops, "frac_of_matmul": tflops / bench_state.matmul_tflops,
        "note": provider.note,
    })
