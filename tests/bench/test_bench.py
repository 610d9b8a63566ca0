"""The benchmark package: the registry drives ``fastalign bench``, one tiny run per op writes what
it always wrote, and the DPO memory report stands apart from the trainers."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import time

import pytest
import torch
from helpers import impl_is_available

from fastalign import assets, data
from fastalign.bench import harness
from fastalign.bench.memory import cpu_peak_supported
from fastalign.bench.registry import BENCHMARKS, all_modes, all_providers
from fastalign.cli import build_parser
from fastalign.cli import main as cli_main

# The CSV columns of each op, as written before the harness was split per op.
CSV_COLUMNS = {
    "linear_logprobs": "op,provider,mode,N,H,V,dtype,ms_median,ms_p20,ms_p80,tflops,"
                       "frac_of_matmul,peak_mem_mb,device,torch,triton,date",
    "linear_nll": "op,provider,mode,N,H,V,dtype,ms_median,ms_p20,ms_p80,tflops,"
                  "frac_of_matmul,peak_mem_mb,device,torch,triton,date",
    "linear_kl": "op,provider,mode,N,H,V,softcap,dtype,ms_median,ms_p20,ms_p80,tflops,"
                 "frac_of_matmul,peak_mem_mb,device,torch,triton,date",
    "dpo": "op,provider,mode,B,T,N,H,V,softcap,dtype,ms_median,ms_p20,ms_p80,tflops,"
           "frac_of_matmul,peak_mem_mb,device,torch,triton,date",
}
# (shape, providers) of a run that takes a second or two on CPU.
TINY_RUNS = {
    "linear_logprobs": ("64,32,500,30", ["fastalign-cpp", "eager"]),
    "linear_nll": ("64,32,500,30", ["fastalign-cpp", "eager"]),
    "linear_kl": ("64,32,500,30", ["fastalign-cpp", "eager"]),
    "dpo": ("2,16,32,500", ["fastalign", "eager"]),
}


def _bench_help() -> str:
    parser = build_parser()
    (bench,) = [action.choices["bench"] for action in parser._subparsers._group_actions]
    return bench.format_help()


def test_every_op_declares_what_the_harness_needs():
    assert list(BENCHMARKS) == ["linear_logprobs", "linear_nll", "linear_kl", "dpo"]
    for name, benchmark in BENCHMARKS.items():
        assert benchmark.name == name
        assert set(benchmark.modes) <= set(harness.MODES)
        assert set(benchmark.flops_per_nhv) == set(benchmark.modes)
        assert ",".join(benchmark.csv_columns) == CSV_COLUMNS[name]
        shape = benchmark.parse_shape(benchmark.example_shapes)
        assert benchmark.small_shape("cpu").n > 0 and benchmark.default_shapes("cpu")
        assert benchmark.flops("full", shape) == (
            benchmark.flops_per_nhv["full"] * shape.n * shape.h * shape.v)
        with pytest.raises(ValueError, match="modes"):
            benchmark.flops("sideways", shape)


def test_bench_help_is_built_from_the_registry():
    text = " ".join(_bench_help().split())
    for benchmark in BENCHMARKS.values():
        for fact in (benchmark.name, benchmark.shape_syntax, benchmark.shape_meaning,
                     benchmark.default_shapes_help, benchmark.describe_flops(),
                     benchmark.describe(), f"--shapes {benchmark.example_shapes}"):
            assert " ".join(fact.split()) in text, fact
    for name in all_providers() + all_modes():
        assert name in text


@pytest.mark.skipif(not impl_is_available("cpp"), reason="C++ extension not built")
@pytest.mark.parametrize("op", list(BENCHMARKS))
def test_tiny_bench_run_writes_csv_table_and_plot(op, tmp_path, capsys):
    shape, providers = TINY_RUNS[op]
    status = cli_main(["bench", "--op", op, "--device", "cpu", "--shapes", shape,
                       "--providers", *providers, "--reps", "1", "--warmup", "0",
                       "--no-progress", "--output", str(tmp_path)])
    assert status == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"## `{op}` on ")
    (csv_path,) = tmp_path.glob(f"{op}_cpu-*.csv")
    assert (csv_path.with_suffix(".md").read_text().strip() in printed)
    assert csv_path.with_suffix(".png").stat().st_size > 1000
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert ",".join(rows[0]) == CSV_COLUMNS[op]
    expected = {(provider, mode) for provider in providers for mode in BENCHMARKS[op].modes}
    assert {(row["provider"], row["mode"]) for row in rows} == expected


@pytest.mark.skipif(not impl_is_available("cpp"), reason="C++ extension not built")
@pytest.mark.parametrize("sequential", [False, True])
def test_cpu_timing_is_interleaved_unless_asked_otherwise(sequential, tmp_path, capsys):
    shape, providers = TINY_RUNS["linear_nll"]
    status = cli_main(["bench", "--op", "linear_nll", "--device", "cpu", "--shapes", shape,
                       "--providers", *providers, "--reps", "2", "--warmup", "1",
                       "--no-progress", "--output", str(tmp_path),
                       *(["--sequential"] if sequential else [])])
    assert status == 0
    printed = capsys.readouterr().out
    how = "one provider after another" if sequential else "in interleaved rounds"
    assert f"Timed on CPU {how}" in printed and "1 warm-up and 2 timed calls each." in printed
    (csv_path,) = tmp_path.glob("linear_nll_cpu-*.csv")
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert {row["provider"] for row in rows} == set(providers)
    for row in rows:
        assert 0 < float(row["ms_p20"]) <= float(row["ms_median"]) <= float(row["ms_p80"])
        assert float(row["tflops"]) > 0 and float(row["peak_mem_mb"]) >= 0


def test_interleaved_rounds_call_every_fn_in_turn_with_setups_untimed():
    from fastalign.bench.measure import ModeFn, TimingOptions, time_interleaved

    calls = []

    def slow_setup():
        calls.append("setup")
        time.sleep(0.05)  # must not be timed
        return "state"

    fns = [ModeFn(lambda state: calls.append(("a", state)), slow_setup),
           lambda: calls.append("b")]
    times = time_interleaved(fns, TimingOptions(warmup=1, reps=3))
    assert calls == ["setup", ("a", "state"), "b"] * 4
    assert len(times) == 2
    for median, p20, p80 in times:
        assert 0 <= p20 <= median <= p80 < 40  # ms: the 50 ms setup is outside


@pytest.mark.parametrize("argv, message", [
    (["--op", "dpo", "--modes", "backward"], "--op dpo has modes forward, full, not backward"),
    (["--op", "linear_kl", "--providers", "liger"], "--op linear_kl has providers"),
    (["--op", "dpo", "--shapes", "1,2,3"], "a DPO shape is B,T,H,V or B,T,H,V,SOFTCAP"),
    (["--shapes", "1,2"], "a shape is N,H,V or N,H,V,SOFTCAP"),
])
def test_bench_rejects_what_the_op_does_not_have(argv, message, capsys):
    assert cli_main(["bench", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("variable, value, message", [
    ("FASTALIGN_CPU_MATMUL", "blas", "FASTALIGN_CPU_MATMUL must be one of auto, onednn, torch"),
    ("FASTALIGN_BACKWARD_WORKSPACE_MIB", "abc",
     "FASTALIGN_BACKWARD_WORKSPACE_MIB must be a positive number of MiB, got 'abc'"),
])
def test_bench_refuses_a_bad_environment_variable_before_it_starts(variable, value, message,
                                                                   tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv(variable, value)
    assert cli_main(["bench", "--op", "linear_nll", "--device", "cpu", "--shapes", "8,4,16",
                     "--output", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastalign bench: error: ") and len(err.splitlines()) == 1
    assert message in err
    assert not list(tmp_path.iterdir())


def test_dpo_memory_report_does_not_import_the_trainers():
    code = ("import sys, fastalign.bench.dpo_memory; "
            "print(sorted(m for m in sys.modules if m.startswith('fastalign.trainers')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")
def test_dpo_memory_report_on_one_batch():
    from fastalign.bench.dpo_memory import loss_memory_report
    from fastalign.losses import DPOOptions

    tokenizer = assets.load_default_tokenizer()
    records = data.load_jsonl(assets.default_data_path("dpo"), "preference")[:4]
    examples = data.encode_preference(records, tokenizer, max_length=64, max_prompt_length=32)
    batch = data.PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(examples)
    model = assets.build_default_model()
    report = loss_memory_report(model, batch, torch.zeros(4, 2), options=DPOOptions(beta=0.1),
                                large_vocab=1000)
    lines = report.splitlines()
    tokens = batch["labels"].numel()
    assert lines[0] == (f"  DPO loss memory, forward + backward from the hidden states of 4 "
                        f"pairs ({tokens} tokens), measured:")
    number = r"\d+\.\d\d MiB"
    assert re.fullmatch(rf"    this model's head \(V=\d+\): fused {number} \(gradients in "
                        rf"forward; streamed {number}\), eager logits {number} "
                        rf"\((\d+|inf)x less\)", lines[1]), lines[1]
    assert lines[2].startswith("    a random 1000-token head (V=1000): fused ")
    assert len(lines) == 3
    streamed_first = loss_memory_report(model, batch, torch.zeros(4, 2),
                                        options=DPOOptions(beta=0.1), large_vocab=None,
                                        gradients_in_forward=False).splitlines()
    assert re.fullmatch(rf"    this model's head \(V=\d+\): fused {number} \(streamed; "
                        rf"gradients in forward {number}\), eager logits {number} "
                        rf"\((\d+|inf)x less\)", streamed_first[1]), streamed_first[1]


@pytest.mark.skipif(not impl_is_available("cpp"), reason="C++ extension not built")
def test_a_second_run_on_the_same_day_keeps_the_first_ones_files(tmp_path, capsys):
    shape, providers = TINY_RUNS["linear_logprobs"]
    argv = ["bench", "--device", "cpu", "--shapes", shape, "--providers", *providers,
            "--reps", "1", "--warmup", "0", "--no-progress", "--output", str(tmp_path)]
    assert cli_main(argv) == 0
    (first,) = tmp_path.glob("linear_logprobs_cpu-*.csv")
    written = first.read_bytes()
    assert cli_main(argv) == 0
    second = first.with_name(first.stem + "-2.csv")
    assert first.read_bytes() == written and second.exists()
    assert second.with_suffix(".md").exists() and second.with_suffix(".png").exists()
    assert f"wrote {second}" in capsys.readouterr().out
