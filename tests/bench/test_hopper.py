"""The Hopper compile gate (``fastalign.bench.hopper``): every Triton kernel, at every config its
launcher picks, compiles for sm_90 and sm_80 within shared memory and without spills in loops;
odd hidden sizes and misaligned inputs reach the kernels padded and aligned.

The gate runs once per session in a subprocess: the tests run the kernels through the Triton
interpreter (TRITON_INTERPRET=1), under which they cannot be compiled. About 2-3 minutes on two
cores; skipped, with the reason, when the triton wheel has no NVIDIA backend tools.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastalign.bench import hopper


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    path = tmp_path_factory.mktemp("hopper") / "gate.json"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "fastalign.bench.hopper", "--json", str(path),
         "--jobs", str(os.cpu_count() or 1)],
        env=env, capture_output=True, text=True, timeout=1800)
    if not path.exists():
        pytest.fail(f"the gate wrote no report:\n{done.stdout}\n{done.stderr}")
    report = json.loads(path.read_text())
    print(f"\nhopper gate: {len(report['rows'])} compiles in {report['seconds']} s\n"
          f"{hopper.headline(report)}")
    return report


def _scenarios(gate):
    if not gate["scenarios"]:
        pytest.skip(f"hopper gate skipped: {gate['skipped']}")
    return gate["scenarios"]


def test_every_launch_compiles_within_shared_memory_without_spills_in_loops(gate):
    if gate["skipped"]:
        pytest.skip(f"hopper gate skipped: {gate['skipped']}")
    assert not gate["failures"], "hopper gate:\n  " + "\n  ".join(gate["failures"])
    compiled = {(row["kernel"], row["arch"]) for row in gate["rows"]}
    launched = {launch["kernel"] for entry in gate["scenarios"] for launch in entry["launches"]}
    assert compiled == {(kernel, arch) for kernel in launched for arch in ("sm_90", "sm_80")}


def test_every_kernel_is_launched_by_some_scenario(gate):
    _scenarios(gate)
    assert gate["unlaunched"] == []


def test_odd_hidden_sizes_and_misaligned_inputs_keep_the_full_specialisation(gate):
    """Each launch for H % 16 != 0 or inputs off a 16-byte boundary is specialised on 16-byte
    aligned pointers and on H and the row strides divisible by 16, as an aligned launch is."""
    checked = [entry for entry in _scenarios(gate) if entry["expect_aligned"]]
    ops = {entry["scenario"].split(".")[0] for entry in checked}
    assert {"linear_logprobs", "linear_kl"} <= ops
    assert any("odd-H" in e["scenario"] for e in checked)
    assert any("misaligned" in e["scenario"] for e in checked)
    for entry in checked:
        for launch in entry["launches"]:
            lost = [name for name in launch["not_divisible"]
                    if name.endswith("_ptr") or name in ("H", "H_REF")
                    or name.startswith("stride")]
            assert not lost, f"{entry['scenario']}: {launch['kernel']} loses the divisibility " \
                             f"of {lost}"


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 gdesc[UR4], RZ, !UPT ;
        /*0030*/               @P0 LDL R3, [R1] ;
        /*0040*/                   STL.64 [R1+0x8], R4 ;
        /*0050*/              @!P1 BRA 0x20 ;
        /*0060*/                   LDL R5, [R1] ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""


def test_sass_counts_find_spills_between_a_backward_branch_and_its_target():
    counts = hopper.sass_counts(SASS)
    assert counts == dict(stl=2, ldl=2, loop_stl=1, loop_ldl=1, hgmma=1, hmma=0, loops=1)


def test_problems_name_compile_errors_shared_memory_and_loop_spills():
    row = dict(arch="sm_80", smem=164 * 1024, loop_stl=0, loop_ldl=2)
    assert hopper.problems(row) == ["shared memory 164.0 KiB > 163 KiB",
                                    "spills inside a loop (0 STL, 2 LDL)"]
    assert hopper.problems(dict(row, arch="sm_90", loop_ldl=0)) == []
    assert hopper.problems(dict(error="CompilationError: x")) == [
        "does not compile: CompilationError: x"]
