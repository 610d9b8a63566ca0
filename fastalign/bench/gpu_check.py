"""The GPU check: one run that fits a lent GPU's 15 minutes (start-up, transfers and a rerun
included), driven by ``benchmarks/gpu_check.sh OUT_DIR`` after it has installed the wheels.

In at most ``TOTAL_BUDGET_S`` seconds of wall time from the script's start, each section under
a hard budget of its own, in this order:

1. install (the shell script: ``benchmarks/wheels/*.whl`` and fastalign without its C++
   extension), whose seconds the script passes in (``--elapsed-s``);
2. the GPU tests, once per Triton backward strategy (``FASTALIGN_TRITON_BACKWARD``): the ops
   against their references on CUDA, bf16 numerics; the CPU-only and property suites stay out;
3. the device's bf16 matrix rate, a square ``torch.mm`` timed by ``do_bench``;
4. the benchmark cases, most important first (``PRIORITY``): each (op, provider) over the
   Llama-3 head at 4k and 16k tokens and the Gemma-2-9B head (softcap 30) at 8k, through the
   harness (check against the ground truth, peak memory, time); a case whose estimate no longer
   fits, or that overruns its own limit, is skipped with a note, and the report is rewritten
   after every case, so that a run cut short still leaves its results;
5. the plots.

``--dry-run`` prints the plan (each step and case with its estimated seconds) and runs nothing:
on CPU too. Estimates come from FLOPs and bytes at the rates of an H100/H200
(``ASSUMED_MATMUL_TFLOPS``, ``ASSUMED_BANDWIDTH_GBS``), a guessed efficiency per provider and
its compilation time (``PROVIDER_COSTS``): they are rough, which is why every section also has a
hard budget.

Outputs in OUT_DIR (at most 8 files come back from the device machine): ``gpu_check.md`` (plan
and what became of it, versions, tests, matrix rate, one table per op), ``tests.txt``,
``<op>.csv`` and ``<op>.png`` per op; the shell script adds ``gpu_check.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TOTAL_BUDGET_S = 480  # wall time of the whole script after the machine has started
REPORT_RESERVE_S = 15  # kept back from the benchmarks for the plots and the last report
WHEELS_DIR = Path("benchmarks/wheels")

# The shapes: (label, N, H, V, softcap).
SHAPES = (
    ("llama3", 4096, 4096, 128256, None),
    ("llama3", 16384, 4096, 128256, None),
    ("gemma2-9b", 8192, 3584, 256000, 30.0),
)
# (op, provider), most important first; each runs over SHAPES before the next starts.
PRIORITY = (
    ("linear_logprobs", "fastalign-triton"),
    ("linear_logprobs", "eager"),
    ("linear_logprobs", "fastalign-triton-atomic"),
    ("linear_nll", "fastalign-nll"),
    ("linear_nll", "liger"),
    ("linear_nll", "cce"),
    ("linear_nll", "cce-exact"),
    ("linear_nll", "eager"),
    ("linear_logprobs", "liger"),
    ("linear_logprobs", "cce"),
    ("linear_logprobs", "cce-exact"),
    ("linear_logprobs", "torch-lce"),
    ("linear_nll", "torch-lce"),
    ("linear_logprobs", "compile"),
)
MODES = ("full",)  # forward + backward: the step a trainer takes, and what peers can all do

# The GPU tests: (name, FASTALIGN_TRITON_BACKWARD, budget s, test files). The chunked backward
# (the default) runs the ops' files; the atomic one the files whose tests take gradients.
TEST_RUNS = (
    ("tests (chunked backward)", "chunked", 100,
     ("tests/ops/test_linear_logprobs.py", "tests/ops/test_linear_kl.py",
      "tests/ops/test_numerics.py", "tests/ops/test_backward_strategies.py",
      "tests/ops/test_linear_nll.py", "tests/kernels/test_sequence_rows.py",
      "tests/losses/test_gradients_in_forward.py",
      "tests/ops/test_linear_argmax.py", "tests/ops/test_gae.py")),
    ("tests (atomic backward)", "atomic", 60,
     ("tests/ops/test_linear_logprobs.py", "tests/ops/test_linear_kl.py",
      "tests/ops/test_numerics.py")),
)
TEST_TIMEOUT_S = 60  # per test (pytest-timeout, when installed)
INSTALL_BUDGET_S, INSTALL_ESTIMATE_S = 30, 15  # enforced by gpu_check.sh
MATMUL_BUDGET_S, MATMUL_ESTIMATE_S = 15, 5
MATMUL_SIZE = 8192

# What the estimates assume about the device (H100/H200, see ../shared/GPU.md): bf16 matrix
# rate on random data, HBM bandwidth, float32 matrix rate of the ground truth.
ASSUMED_MATMUL_TFLOPS = 750.0
ASSUMED_BANDWIDTH_GBS = 3500.0
ASSUMED_FP32_TFLOPS = 45.0


@dataclass(frozen=True)
class ProviderCost:
    """How a provider is expected to cost: matrix work in units of N·H·V, the fraction of the
    matrix rate it reaches, bytes per logit it moves through memory, and its compile time at the
    first shape of an op (``later_compile_s`` at the others)."""

    nhv: int
    efficiency: float
    bytes_per_logit: float
    compile_s: float
    later_compile_s: float


PROVIDER_COSTS = {
    "fastalign-triton": ProviderCost(8, 0.55, 0, 6, 2),
    "fastalign-triton-atomic": ProviderCost(8, 0.35, 0, 4, 2),
    "fastalign-nll": ProviderCost(6, 0.55, 0, 6, 2),
    "eager": ProviderCost(6, 0.75, 40, 1, 0.5),
    "compile": ProviderCost(6, 0.75, 16, 35, 25),
    "torch-lce": ProviderCost(8, 0.5, 4, 5, 2),
    "liger": ProviderCost(8, 0.5, 4, 8, 2),
    "cce": ProviderCost(8, 0.45, 0, 8, 2),
    "cce-exact": ProviderCost(8, 0.4, 0, 4, 2),
}
# Calls per case: the check, the memory measurement, do_bench's five to estimate, then its
# warm-up and repetitions (at least one each) within these budgets.
TIMING_WARMUP_MS, TIMING_REP_MS = 30, 300  # do_bench: at least 3 timed calls below 100 ms
FIXED_CALLS = 7


@dataclass(frozen=True)
class Case:
    op: str
    provider: str
    label: str
    n: int
    h: int
    v: int
    softcap: float | None

    def shape_text(self) -> str:
        text = f"{self.label} N={self.n} H={self.h} V={self.v}"
        return text if self.softcap is None else f"{text} softcap={self.softcap:g}"

    def __str__(self) -> str:
        return f"{self.op} {self.provider} {self.shape_text()}"


def plan_cases(shapes: Sequence[tuple] | None = None) -> list[Case]:
    """PRIORITY over ``shapes`` (default SHAPES): each (op, provider) at every shape in turn."""
    return [Case(op, provider, *shape) for op, provider in PRIORITY for shape in shapes or SHAPES]


def call_ms(case: Case, matmul_tflops: float = ASSUMED_MATMUL_TFLOPS) -> float:
    """Estimated milliseconds of one forward + backward of ``case``."""
    cost = PROVIDER_COSTS[case.provider]
    nhv = case.n * case.h * case.v
    matrix_s = cost.nhv * nhv / (matmul_tflops * 1e12 * cost.efficiency)
    memory_s = cost.bytes_per_logit * case.n * case.v / (ASSUMED_BANDWIDTH_GBS * 1e9)
    return 1e3 * (matrix_s + memory_s)


def shape_setup_s(case: Case) -> float:
    """Inputs, the float32 ground truth (6·N·H·V) and eager's own error, once per (op, shape)."""
    return 6 * case.n * case.h * case.v / (ASSUMED_FP32_TFLOPS * 1e12) + 1.0


def case_estimate_s(case: Case, first_of_provider: bool, first_of_shape: bool,
                    matmul_tflops: float = ASSUMED_MATMUL_TFLOPS) -> float:
    """Estimated seconds of a case: compile, the check and memory calls, do_bench's calls, and
    the shape's setup when it is the first case of its (op, shape)."""
    if case.provider == "torch-lce" and case.softcap is not None:
        return 0.0  # skipped at once: torch's linear_cross_entropy has no softcap
    cost = PROVIDER_COSTS[case.provider]
    ms = call_ms(case, matmul_tflops)
    calls = FIXED_CALLS + max(1, TIMING_WARMUP_MS // ms) + max(1, TIMING_REP_MS // ms)
    compile_s = cost.compile_s if first_of_provider else cost.later_compile_s
    return compile_s + calls * ms / 1e3 + (shape_setup_s(case) if first_of_shape else 0.0)


def estimate_cases(cases: Sequence[Case]) -> list[float]:
    """Each case's estimate, in plan order (compiles and setups counted where they first occur)."""
    seen_providers, seen_shapes, estimates = set(), set(), []
    for case in cases:
        key = (case.op, case.provider)
        shape_key = (case.op, case.label, case.n)
        estimates.append(case_estimate_s(case, key not in seen_providers,
                                         shape_key not in seen_shapes))
        seen_providers.add(key)
        seen_shapes.add(shape_key)
    return estimates


@dataclass
class Step:
    name: str
    budget_s: float
    estimate_s: float
    what: str
    status: str = "planned"
    took_s: float | None = None


def wheels() -> list[Path]:
    return sorted(WHEELS_DIR.glob("*.whl"))


def plan_steps(cases: Sequence[Case], estimates: Sequence[float]) -> list[Step]:
    wheel_names = ", ".join(path.name.split("-py")[0] for path in wheels()) or "none"
    steps = [Step("install", INSTALL_BUDGET_S, INSTALL_ESTIMATE_S,
                  f"gpu_check.sh: wheels from {WHEELS_DIR} ({wheel_names}), then fastalign "
                  "(editable, FASTALIGN_BUILD_EXT=0)")]
    for name, strategy, budget, files in TEST_RUNS:
        steps.append(Step(name, budget, budget, f"FASTALIGN_TRITON_BACKWARD={strategy} pytest "
                                                f"{' '.join(files)}"))
    steps.append(Step("matmul rate", MATMUL_BUDGET_S, MATMUL_ESTIMATE_S,
                      f"torch.mm {MATMUL_SIZE}x{MATMUL_SIZE} bf16, random data, do_bench"))
    fixed = sum(step.budget_s for step in steps)
    steps.append(Step("benchmarks", TOTAL_BUDGET_S - fixed - REPORT_RESERVE_S, sum(estimates),
                      f"{len(cases)} cases, modes {', '.join(MODES)}; the time left when the "
                      "sections before end early"))
    steps.append(Step("report", REPORT_RESERVE_S, 5, "plots; the tables are written after "
                                                      "every case"))
    return steps


def total_estimate_s(steps: Sequence[Step]) -> float:
    return sum(step.estimate_s for step in steps)


def format_plan(steps: Sequence[Step], cases: Sequence[Case], estimates: Sequence[float]) -> str:
    lines = [f"GPU check plan: at most {TOTAL_BUDGET_S} s after start-up, estimated "
             f"{total_estimate_s(steps):.0f} s", "",
             f"{'step':<26} {'budget s':>9} {'estimate s':>11}  what"]
    for number, step in enumerate(steps, 1):
        lines.append(f"{f'{number}. {step.name}':<26} {step.budget_s:>9.0f} "
                     f"{step.estimate_s:>11.0f}  {step.what}")
    lines += ["", f"benchmark cases, in order ({len(cases)}; estimated seconds each, cumulative):"]
    elapsed = 0.0
    for number, (case, estimate) in enumerate(zip(cases, estimates), 1):
        elapsed += estimate
        lines.append(f"  {number:>2}. case {case.op:<16} {case.provider:<24} "
                     f"{case.shape_text():<45} {estimate:6.1f} s {elapsed:7.1f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout in the main thread after ``seconds`` (SIGALRM): a hung compilation or a
    far slower provider cannot eat the sections after it."""
    def expire(signum, frame):
        raise CaseTimeout(f"over its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_tests(out: Path, deadline: float, python: str) -> list[Step]:
    """Each TEST_RUNS entry under its budget (and the deadline); output appended to tests.txt."""
    steps = []
    log = out / "tests.txt"
    log.write_text("")
    parallel = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    timeout = ([f"--timeout={TEST_TIMEOUT_S}"] if importlib.util.find_spec("pytest_timeout")
               else [])
    for name, strategy, budget, files in TEST_RUNS:
        limit = min(budget, deadline - time.monotonic())
        step = Step(name, budget, budget, f"FASTALIGN_TRITON_BACKWARD={strategy}")
        steps.append(step)
        if limit < 10:
            step.status = "skipped: over the time budget"
            continue
        env = {**os.environ, "FASTALIGN_TRITON_BACKWARD": strategy}
        env.pop("TRITON_INTERPRET", None)
        command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                   *parallel, *timeout, *files]
        start = time.monotonic()
        with open(log, "a") as handle:
            handle.write(f"==== {name}: {' '.join(command)}\n")
            handle.flush()
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
            try:
                rc = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # pytest and its xdist workers
                process.wait()
                rc = None
        step.took_s = time.monotonic() - start
        summary = _pytest_summary(log.read_text().split(f"==== {name}:")[-1])
        step.status = (f"TIMED OUT after {limit:.0f} s ({summary or 'no summary'})" if rc is None
                       else f"{'passed' if rc == 0 else f'FAILED (exit {rc})'}: {summary}")
        print(f"{name}: {step.status}", flush=True)
    return steps


def _pytest_summary(text: str) -> str:
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped).*?)\s*=*$", text, re.M)
    return found[-1] if found else ""


@dataclass
class OpResults:
    rows: list[dict] = field(default_factory=list)
    skipped: list = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)


def run_check(args: argparse.Namespace) -> int:
    import torch

    from fastalign.bench import harness, measure, registry, report
    from fastalign.bench.heads import Shape

    start = time.monotonic() - args.elapsed_s
    deadline = start + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: torch.cuda.is_available() is False; use --dry-run to see the "
              "plan on a machine without a GPU", file=sys.stderr)
        return 2
    cases = plan_cases(args.shapes)
    estimates = estimate_cases(cases)
    steps = plan_steps(cases, estimates)
    by_name = {step.name: step for step in steps}
    by_name["install"].status, by_name["install"].took_s = "done (gpu_check.sh)", args.elapsed_s
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    matmul_size = MATMUL_SIZE if device.type == "cuda" else 512
    config = harness.BenchConfig(
        device=str(device), dtype=dtype, modes=MODES, on_mismatch="skip", progress=False,
        timing=measure.TimingOptions(warmup=0, reps=1, cuda_warmup_ms=TIMING_WARMUP_MS,
                                     cuda_rep_ms=TIMING_REP_MS))
    results = {op: OpResults() for op in dict.fromkeys(case.op for case in cases)}
    state = {"rate": math.nan, "case_status": {}}
    date = datetime.date.today().isoformat()
    row_fields = {"device": measure.device_name(device), **measure.versions(), "date": date}
    environment = _environment(device)

    def bench_result(op: str) -> harness.BenchResult:
        benchmark = registry.get_benchmark(op)
        return harness.BenchResult(
            config, results[op].rows, results[op].skipped, results[op].notes, state["rate"],
            row_fields["device"], date, op=op, flops_note=benchmark.flops_note,
            csv_columns=benchmark.csv_columns)

    def write_report() -> None:
        lines = [f"# GPU check on {row_fields['device']}, {date}", "", environment, "",
                 "| step | budget s | estimate s | took s | outcome |", "|---|---:|---:|---:|---|"]
        for step in steps:
            took = "" if step.took_s is None else f"{step.took_s:.0f}"
            lines.append(f"| {step.name} | {step.budget_s:.0f} | {step.estimate_s:.0f} | {took} "
                         f"| {step.status} |")
        lines += ["", f"Matrix rate (`torch.mm` {matmul_size}², {harness.dtype_name(dtype)}, "
                      f"random data): {state['rate']:.4g} TFLOP/s.", "",
                  "Cases, in the order planned:", ""]
        for number, case in enumerate(cases, 1):
            lines.append(f"{number}. {case}: {state['case_status'].get(case, 'not reached')}")
        for op in results:
            lines += ["", report.format_table(bench_result(op))]
            report.write_csv(bench_result(op), out / f"{op}.csv")
        (out / "gpu_check.md").write_text("\n".join(lines) + "\n")

    write_report()
    if args.no_tests:
        for step in steps:
            if step.name.startswith("tests"):
                step.status = "skipped (--no-tests)"
    else:
        for step in run_tests(out, deadline - _later_budgets(), args.python):
            by_name[step.name].status, by_name[step.name].took_s = step.status, step.took_s
    write_report()

    matmul = by_name["matmul rate"]
    began = time.monotonic()
    try:
        with time_limit(MATMUL_BUDGET_S):
            state["rate"] = measure.matmul_tflops(
                device, dtype, size=matmul_size,
                options=measure.TimingOptions(warmup=1, reps=3, cuda_warmup_ms=100,
                                              cuda_rep_ms=400))
        matmul.status = f"{state['rate']:.4g} TFLOP/s"
    except Exception as exc:  # noqa: BLE001 - the benchmarks still run, without the fraction
        matmul.status = f"FAILED: {type(exc).__name__}: {exc}"
    matmul.took_s = time.monotonic() - began
    print(f"matmul rate: {matmul.status}", flush=True)
    write_report()

    bench = by_name["benchmarks"]
    bench.status = "running"
    began = time.monotonic()
    bench_deadline = deadline - REPORT_RESERVE_S
    bench.budget_s = max(0.0, bench_deadline - began)  # what the sections before left of it
    shape_runs: dict[tuple, harness.ShapeRun] = {}
    for case, estimate in zip(cases, estimates):
        left = bench_deadline - time.monotonic()
        if estimate > left:
            state["case_status"][case] = (f"skipped: over the time budget (estimate "
                                          f"{estimate:.0f} s, {max(left, 0):.0f} s left)")
            results[case.op].skipped.append(harness.Skip(
                _shape(Shape, case), case.provider, "*", "over the GPU check's time budget"))
            continue
        state["case_status"][case] = _run_case(case, config, state["rate"], row_fields,
                                               results[case.op], shape_runs,
                                               limit=min(left, max(30.0, 4 * estimate)))
        print(f"{case}: {state['case_status'][case]}", flush=True)
        write_report()
    shape_runs.clear()
    bench.took_s = time.monotonic() - began
    ran = sum(status.startswith("done") for status in state["case_status"].values())
    bench.status = f"{ran} of {len(cases)} cases measured"

    began = time.monotonic()
    for op in results:
        if results[op].rows:
            try:
                report.plot(bench_result(op), out / f"{op}.png")
            except Exception as exc:  # noqa: BLE001 - the tables matter more than the plots
                print(f"plot of {op} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    by_name["report"].status, by_name["report"].took_s = "done", time.monotonic() - began
    write_report()
    print((out / "gpu_check.md").read_text())
    failed = [step for step in steps if "FAILED" in step.status or "TIMED OUT" in step.status]
    return 1 if failed else 0


def _later_budgets() -> float:
    # The tests may not eat into what the matrix rate and a first benchmark case need.
    return MATMUL_BUDGET_S + REPORT_RESERVE_S + 30


def _shape(shape_cls, case: Case):
    return shape_cls(case.n, case.h, case.v, case.softcap, case.label)


def _run_case(case: Case, config, rate: float, row_fields: dict, results: OpResults,
              shape_runs: dict, limit: float) -> str:
    """Check and measure one case within ``limit`` seconds; returns what became of it."""
    import torch

    from fastalign.bench import harness, registry
    from fastalign.bench.heads import Shape

    benchmark = registry.get_benchmark(case.op)
    device = torch.device(config.device)
    shape = _shape(Shape, case)
    began = time.monotonic()
    try:
        with time_limit(limit):
            try:
                provider = benchmark.make_provider(case.provider, device, config.dtype,
                                                   case.softcap)
            except harness.ProviderUnavailable as exc:
                results.skipped.append(harness.Skip(shape, case.provider, "*", str(exc)))
                return f"skipped: {exc}"
            key = (case.op, shape)
            if key not in shape_runs:  # all kept: a few GB each, the H100/H200 has 80/141
                shape_runs[key] = harness.prepare_shape(benchmark, shape, config, device,
                                                        eager_is_provider=False)
            rows, skips, checked = harness.run_provider(benchmark, shape_runs[key], provider,
                                                        config, rate, row_fields)
    except CaseTimeout as exc:
        harness.free_memory(device)
        results.skipped.append(harness.Skip(shape, case.provider, "*", f"timed out: {exc}"))
        return f"TIMED OUT: {exc}"
    except Exception as exc:  # noqa: BLE001 - e.g. the ground truth out of memory: next case
        harness.free_memory(device)
        reason = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        results.skipped.append(harness.Skip(shape, case.provider, "*", f"ERROR {reason}"))
        return f"FAILED: {reason}"
    results.rows.extend(rows)
    results.skipped.extend(skips)
    if checked:
        results.notes[provider.name] = provider.note
    took = time.monotonic() - began
    if rows:
        return f"done in {took:.0f} s, {rows[0]['ms_median']:.2f} ms"
    return f"skipped: {skips[0].reason}" if skips else f"no result ({took:.0f} s)"


def _environment(device) -> str:
    """Versions of what the check depends on, and nvidia-smi's first lines."""
    import platform

    import torch

    import fastalign

    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}",
                f"fastalign {fastalign.__version__}"]
    for module in ("triton", "liger_kernel", "cut_cross_entropy", "transformers"):
        try:
            from importlib.metadata import version

            versions.append(f"{module} {version(module.replace('_', '-'))}")
        except Exception:  # noqa: BLE001 - not installed
            versions.append(f"{module} not installed")
    lines = ["Versions: " + ", ".join(versions) + "."]
    if device.type == "cuda":
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
            lines += ["", "```", *smi.stdout.splitlines()[:12], "```"]
        except (OSError, subprocess.TimeoutExpired) as exc:
            lines.append(f"nvidia-smi: {exc}")
    return "\n".join(lines)


def _parse_shape(text: str) -> tuple:
    """``LABEL:N,H,V[,SOFTCAP]`` for --shapes (smoke runs on CPU)."""
    label, _, dims = text.rpartition(":")
    parts = dims.split(",")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"a shape is [LABEL:]N,H,V[,SOFTCAP], got {text!r}")
    n, h, v = (int(part) for part in parts[:3])
    softcap = float(parts[3]) if len(parts) == 4 and float(parts[3]) else None
    return (label or "custom", n, h, v, softcap)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_check", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (required but with --print-budgets)")
    parser.add_argument("--print-budgets", action="store_true",
                        help="print the install budget and the total budget in seconds (for "
                             "gpu_check.sh) and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan with its estimated durations and run nothing")
    parser.add_argument("--elapsed-s", type=float, default=0.0,
                        help="seconds already spent before this program (the install)")
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S,
                        help="wall-time budget from the script's start (default: %(default)s)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=None,
                        metavar="[LABEL:]N,H,V[,SOFTCAP]", help="replace the planned shapes")
    parser.add_argument("--no-tests", action="store_true", help="skip the GPU tests")
    parser.add_argument("--python", default=sys.executable, help="interpreter for pytest")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_budgets:
        print(INSTALL_BUDGET_S, int(args.budget_s))
        return 0
    if not args.out:
        parser.error("--out is required")
    if args.dry_run:
        cases = plan_cases(args.shapes)
        estimates = estimate_cases(cases)
        print(format_plan(plan_steps(cases, estimates), cases, estimates))
        return 0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
