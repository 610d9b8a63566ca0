"""The GPU check (``benchmarks/gpu_check.sh``): its dry run plans every case the check must
measure within the 8-minute budget, and the driver, run on CPU at tiny shapes, keeps to its
budgets, skips what is not installed and picks up ``fastalign.linear_nll`` when it exists."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import impl_is_available

import fastalign
from fastalign.bench import gpu_check
from fastalign.bench.linear_logprobs import BENCHMARK as LOGPROBS
from fastalign.ops.linear_logprobs import linear_logprobs_reference

REPO = Path(__file__).resolve().parents[2]
LLAMA3_4K = "llama3 N=4096 H=4096 V=128256"
LLAMA3_16K = "llama3 N=16384 H=4096 V=128256"
GEMMA2_8K = "gemma2-9b N=8192 H=3584 V=256000 softcap=30"
# What issue 14 item 6 asks the check to measure, at each of the three heads.
REQUIRED = [("linear_logprobs", provider) for provider in (
    "fastalign-triton", "fastalign-triton-atomic", "eager", "compile", "torch-lce", "liger",
    "cce", "cce-exact")] + [("linear_nll", "fastalign-nll")]


def _dry_run(tmp_path) -> str:
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path), "--dry-run"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dry_run_plans_every_case_within_eight_minutes(tmp_path):
    text = _dry_run(tmp_path)
    cases = re.findall(r"^\s*\d+\. case (\S+)\s+(\S+)\s+(.+?)\s+([\d.]+) s\s+[\d.]+ s$", text,
                       re.MULTILINE)
    planned = {(op, provider, shape) for op, provider, shape, _ in cases}
    for op, provider in REQUIRED:
        for shape in (LLAMA3_4K, LLAMA3_16K, GEMMA2_8K):
            assert (op, provider, shape) in planned, (op, provider, shape)
    assert cases[0][:2] == ("linear_logprobs", "fastalign-triton")  # ours first
    assert cases[-1][1] == "compile"  # the slowest to start, last

    steps = re.findall(r"^\d\. (.+?)\s+(\d+)\s+(\d+)  ", text, re.MULTILINE)
    names = [name for name, _, _ in steps]
    assert names == ["install", "tests (chunked backward)", "tests (atomic backward)",
                     "matmul rate", "benchmarks", "report"]
    budgets = {name: int(budget) for name, budget, _ in steps}
    estimates = {name: int(estimate) for name, _, estimate in steps}
    assert all(estimates[name] <= budgets[name] for name in names), steps
    assert sum(budgets.values()) <= 480
    # The benchmarks' estimate is the sum of its cases'; the whole plan's is under 8 minutes.
    assert abs(sum(float(seconds) for *_, seconds in cases) - estimates["benchmarks"]) < 1
    total = float(re.search(r"estimated (\d+) s", text).group(1))
    assert total == pytest.approx(sum(estimates.values()), abs=len(steps))
    assert total < 8 * 60
    assert "liger_kernel" in text and "cut_cross_entropy" in text  # the wheels it installs


def test_the_wheels_install_without_a_registry():
    wheels = sorted(path.name for path in (REPO / "benchmarks" / "wheels").glob("*.whl"))
    assert [name.split("-")[0] for name in wheels] == ["cut_cross_entropy", "liger_kernel"]
    assert all(name.endswith("-py3-none-any.whl") for name in wheels)  # any Python 3, any CPU
    assert sum((REPO / "benchmarks" / "wheels" / name).stat().st_size for name in wheels) < 8e6


def test_a_case_over_its_time_limit_is_interrupted():
    start = time.monotonic()
    with pytest.raises(gpu_check.CaseTimeout, match="limit of 0 s"):
        with gpu_check.time_limit(0.2):
            time.sleep(5)
    assert time.monotonic() - start < 2


def test_check_on_cpu_keeps_its_budget_and_notes_every_skip(tmp_path, monkeypatch, capsys):
    def linear_nll(hidden, weight, targets, softcap=None):  # what fastalign.linear_nll computes
        return -linear_logprobs_reference(hidden, weight, targets, softcap=softcap).mean()

    monkeypatch.setattr(fastalign, "linear_nll", linear_nll, raising=False)
    monkeypatch.setattr(gpu_check, "PRIORITY", (
        ("linear_logprobs", "eager"), ("linear_nll", "fastalign-nll"), ("linear_nll", "liger"),
        ("linear_logprobs", "compile")))
    # 40 s in all, 25 s of it for the benchmarks: torch.compile's estimate (35 s) cannot fit.
    status = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--no-tests",
                             "--budget-s", "40", "--shapes", "a:32,16,300", "b:24,16,300,30"])
    assert status == 0
    report = (tmp_path / "gpu_check.md").read_text()
    assert "linear_nll fastalign-nll a N=32 H=16 V=300: done" in report
    assert "linear_nll liger b N=24 H=16 V=300 softcap=30: skipped: Liger-Kernel is not " \
           "installed" in report
    assert re.search(r"linear_logprobs compile a N=32 H=16 V=300: skipped: over the time "
                     r"budget \(estimate 3\d s", report)
    assert "| compile | all modes | skipped: over the GPU check's time budget" in report
    assert "| tests (chunked backward) | 100 | 100 |  | skipped (--no-tests) |" in report
    for op, providers in (("linear_logprobs", {"eager"}),
                          ("linear_nll", {"fastalign-nll"})):
        with open(tmp_path / f"{op}.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert {row["provider"] for row in rows} == providers
        assert {(row["N"], row["mode"]) for row in rows} == {("32", "full"), ("24", "full")}
        # Timed, and compared with the matrix rate measured in the same run.
        assert all(float(row["ms_median"]) > 0 and math.isfinite(float(row["frac_of_matmul"]))
                   for row in rows)
        assert (tmp_path / f"{op}.png").stat().st_size > 1000
    # The benchmarks' budget is what the 40 s left them (about 25 s); 4 cases ran in it.
    assert re.search(r"\| benchmarks \| (1\d|2[0-5]) \| \d+ \| \d+ \| 4 of 8 cases measured",
                     report)


@pytest.mark.skipif(not impl_is_available("triton"), reason="Triton is not available here")
def test_the_atomic_backward_is_a_provider_of_its_own(monkeypatch):
    from fastalign.kernels import _launch

    seen = []
    strategy = _launch.backward_strategy
    monkeypatch.setattr(_launch, "backward_strategy", lambda: seen.append(strategy()) or seen[-1])
    monkeypatch.delenv("FASTALIGN_TRITON_BACKWARD", raising=False)
    inputs = LOGPROBS.make_inputs(LOGPROBS.parse_shape("20,16,70"), torch.float32, "cpu")
    reference = LOGPROBS.reference(inputs)
    for name in ("fastalign-triton-atomic", "fastalign-triton"):
        provider = LOGPROBS.make_provider(name, "cpu", torch.float32)
        assert LOGPROBS.check_provider(provider, inputs, reference).ok
        assert "FASTALIGN_TRITON_BACKWARD" not in os.environ  # restored after the call
    assert seen == ["atomic", "chunked"]


def test_the_script_installs_the_wheels_then_runs_the_check(tmp_path):
    """gpu_check.sh on a machine where ``python3 -m pip`` and the check itself are stand-ins
    that record how they were called: what it would run on the GPU machine, in order."""
    log = tmp_path / "calls.txt"
    python = tmp_path / "python"
    python.write_text(f"""#!/usr/bin/env bash
echo "PYTHONPATH=${{PYTHONPATH:-}} TRITON_INTERPRET=${{TRITON_INTERPRET:-unset}} $*" >> {log}
case "$1 $2" in
    "-m pip"|"-m fastalign.bench.gpu_check") exit 0 ;;
    *) exec {sys.executable} "$@" ;;
esac
""")
    python.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(python), "TRITON_INTERPRET": "1", "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    site = tmp_path / "fastalign-gpu-check-site"
    assert calls[0].endswith("fastalign/bench/gpu_check.py --print-budgets")
    assert calls[1].endswith(
        f"-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "
        f"{site} benchmarks/wheels/cut_cross_entropy-25.1.1-py3-none-any.whl "
        "benchmarks/wheels/liger_kernel-0.8.5-py3-none-any.whl")
    assert calls[2].endswith("-m pip install -q --no-build-isolation --no-deps --no-cache-dir -e .")
    assert re.fullmatch(rf"PYTHONPATH={site}\S* TRITON_INTERPRET=unset -m "
                        rf"fastalign.bench.gpu_check --out {out} --elapsed-s \d+", calls[3])
    assert len(calls) == 4
    assert "gpu_check: installed in" in (out / "gpu_check.log").read_text()


def test_each_test_run_has_its_strategy_and_a_hard_budget(tmp_path, monkeypatch):
    (tmp_path / "test_quick.py").write_text(
        "import os\n\ndef test_environment():\n"
        "    assert os.environ['FASTALIGN_TRITON_BACKWARD'] == 'chunked'\n"
        "    assert 'TRITON_INTERPRET' not in os.environ\n")
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_hangs():\n"
                                           "    time.sleep(120)\n")
    monkeypatch.setattr(gpu_check, "TEST_RUNS", (
        ("tests (chunked backward)", "chunked", 60, (str(tmp_path / "test_quick.py"),)),
        ("tests (atomic backward)", "atomic", 12, (str(tmp_path / "test_slow.py"),))))
    out = tmp_path / "out"
    out.mkdir()
    start = time.monotonic()
    quick, slow = gpu_check.run_tests(out, start + 200, sys.executable)
    assert time.monotonic() - start < 60  # the hanging test was killed at its budget
    assert quick.status.startswith("passed: 1 passed in "), (out / "tests.txt").read_text()
    assert slow.status.startswith("TIMED OUT after 12 s")
    assert "==== tests (atomic backward):" in (out / "tests.txt").read_text()
