"""Hopper compile gate: every Triton kernel of fastalign, compiled for sm_90 and sm_80 without a
GPU, exactly as its launcher would launch it, with its registers, spills and shared memory.

How it works. Each ``Scenario`` calls a real launcher of ``fastalign.kernels`` (forward and
backward of ``linear_logprobs`` and ``linear_kl``, ``linear_nll_forward``, the row kernels of
``sequence_rows``, ``gae_forward``) on ``meta`` tensors, which carry shapes, dtypes and data
pointers (hence alignment) but no memory. ``record_launches``
intercepts every ``kernel[grid](...)`` the launcher issues, after its ``triton.heuristics``, with
the config the launcher pinned (``_default_config`` per dtype and token count, vocabulary splits
for an H100/H200's 132 SMs, the padding and alignment of ``_launch.kernel_head``). Each launch is
specialised as ``JITFunction.run`` would specialise it (``tt.divisibility=16`` on 16-byte
aligned pointers and on integers divisible by 16), compiled once per distinct (kernel,
constexprs, specialisation, arch), and its cubin read with the ``cuobjdump`` shipped in the
Triton wheel. A launch fails the gate if it does not compile, needs more shared memory than the
arch has (227 KiB on sm_90, 163 KiB on sm_80) or spills registers inside a loop (an STL or LDL
between a backward branch and its target in the SASS: the H-loops run H/BLOCK_H times a tile).

Adding a kernel:
  * launched by an existing launcher (say a second backward kernel in ``linear_logprobs.py``):
    nothing to do; the recording sees it. ``unlaunched_kernels`` fails the gate for any
    ``@triton.jit`` kernel of ``KERNEL_MODULES`` that no scenario launches;
  * with a new launcher or op module: add its module to ``KERNEL_MODULES`` and a function
    yielding its scenarios to ``SCENARIO_SOURCES`` (see ``linear_logprobs_scenarios``).

The numbers are ptxas's static allocation; nothing runs. Command line (``make hopper-table``)::

    python -m fastalign.bench.hopper --out benchmarks/results/  # table (md + csv); 1 on failure
    python -m fastalign.bench.hopper --json gate.json  # the report tests/bench/test_hopper.py reads

Run it without ``TRITON_INTERPRET=1``: the interpreter replaces the kernels by Python functions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import datetime
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

# Kernel modules whose every @triton.jit kernel (a name ending in "_kernel") must be launched.
KERNEL_MODULES = ("fastalign.kernels.linear_logprobs", "fastalign.kernels.linear_kl",
                  "fastalign.kernels.linear_nll", "fastalign.kernels.sequence_rows",
                  "fastalign.kernels.gae")
# Shared memory a block may use (opt-in maximum): 227 KiB on H100/H200, 163 KiB on A100.
SMEM_LIMITS = {90: 227 * 1024, 80: 163 * 1024}
SM_COUNT = 132  # H100 SXM / H200: the forward's vocabulary splits follow it
MAIN_SHAPE = (16384, 4096, 128256)   # (N, H, V): 16k tokens on the Llama-3 head
RAGGED_SHAPE = (16383, 4000, 50257)  # N and V no multiples of 16, H no multiple of BLOCK_H
ODD_H_SHAPE = (16384, 4001, 128256)  # H % 16 != 0: the launchers pad it
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# What is compiled where, to stay within a few minutes on two cores: the pinned config of each
# kernel on the main shape for every arch and dtype (tier 0); the ragged shape on sm_90 in every
# dtype (tier 1); the variants (flags, token-count buckets, odd H, misaligned inputs) on sm_90 in
# VARIANT_DTYPES (tier 2). fp16 compiles to the code of bf16 but for the MMA's input type.
VARIANT_DTYPES = ("bf16", "fp32")


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One call of a launcher: ``run()`` calls it on meta tensors; ``tier`` says for which
    archs and dtypes its launches are compiled (see VARIANT_DTYPES). Every scenario's launches
    are recorded and specialised, compiled or not."""

    name: str
    run: Callable[[], object]
    tier: int = 2
    # Inputs the launcher must make aligned: every launch must carry tt.divisibility on all its
    # pointers and on H (the odd-H and misaligned scenarios).
    expect_aligned: bool = False


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict


def _meta(*shape, dtype=torch.float32, offset=0):
    """A meta tensor: shape, dtype and a data pointer ``offset`` elements past an aligned one."""
    if not offset:
        return torch.empty(shape, dtype=dtype, device="meta")
    numel = 1
    for size in shape:
        numel *= size
    return torch.empty(numel + offset, dtype=dtype, device="meta")[offset:].view(shape)


def _token_counts(default_config, kind: str, dtype: torch.dtype, n_max: int) -> dict[int, str]:
    """For each distinct config the launcher's ``default_config`` picks as N varies, the largest
    power-of-2 N that picks it (the main shape's N for the largest tile)."""
    by_config = {}
    n = 1
    while n <= n_max:
        config = default_config(kind, dtype, n)
        by_config[repr((sorted(config.kwargs.items()), config.num_warps, config.num_stages))] = n
        n *= 2
    return {n: f"N={n}" for n in by_config.values() if n != n_max}


def _shapes(dtype: torch.dtype, default_config, kind: str):
    """(tag, N, H, V, misaligned, tier, expect_aligned) the scenarios of an op run through."""
    n, h, v = MAIN_SHAPE
    yield "", n, h, v, False, 0, False
    yield " ragged", *RAGGED_SHAPE, False, 1, False
    yield " odd-H", *ODD_H_SHAPE, False, 2, True
    yield " misaligned", n, h, v, True, 2, True
    for tokens, tag in _token_counts(default_config, kind, dtype, n).items():
        yield f" {tag}", tokens, h, v, False, 2, False


def _head_scenarios(op_name: str, dname: str, default_config, kinds) -> Iterator[Scenario]:
    """The scenarios of an LM-head op: for each (kind, variants, runner) of ``kinds``, every
    variant (a tag, then the runner's options) on the main shape, and the first one on the other
    shapes of ``_shapes``; ``runner(N, H, V, *options, offset)`` calls the launcher."""
    for kind, variants, runner in kinds:
        for tag, n, h, v, misaligned, tier, expect in _shapes(DTYPES[dname], default_config,
                                                              kind):
            for i, (vtag, *options) in enumerate(variants if not tag else variants[:1]):
                yield Scenario(
                    f"{op_name}.{kind} {dname}{vtag}{tag}",
                    lambda n=n, h=h, v=v, options=options, off=int(misaligned), run=runner:
                    run(n, h, v, *options, off),
                    tier=max(tier, 2 * (i > 0)), expect_aligned=expect)


def linear_logprobs_scenarios(dname: str) -> Iterator[Scenario]:
    from fastalign.kernels import linear_logprobs as op

    dtype = DTYPES[dname]
    # (tag, bias, softcap) of the forward; (tag, bias, softcap, entropy, dh, dw, db, strategy)
    # of backward: the default chunked backward, and the atomic one kept for comparison
    forward = [("", False, 0.0), (" bias", True, 0.0), (" softcap", False, 30.0),
               (" bias+softcap", True, 30.0)]
    backward = [(" ent", False, 0.0, True, True, True, False, "chunked"),
                ("", False, 0.0, False, True, True, False, "chunked"),
                (" bias+ent", True, 0.0, True, True, True, True, "chunked"),
                (" softcap+ent", False, 30.0, True, True, True, False, "chunked"),
                (" dh-only", False, 0.0, False, True, False, False, "chunked"),
                (" ent atomic", False, 0.0, True, True, True, False, "atomic"),
                (" bias+softcap+ent atomic", True, 30.0, True, True, True, True, "atomic"),
                (" dh-only atomic", False, 0.0, False, True, False, False, "atomic")]

    def run_forward(n, h, v, bias, softcap, offset):
        op.linear_logprobs_forward(
            _meta(n, h, dtype=dtype, offset=offset), _meta(v, h, dtype=dtype, offset=offset),
            _meta(v, dtype=dtype, offset=offset) if bias else None,
            _meta(n, dtype=torch.int64, offset=offset), 0.7, softcap, -100)

    def run_backward(n, h, v, bias, softcap, entropy, dh, dw, db, strategy, offset):
        f32, f64 = torch.float32, torch.float64
        with _backward_strategy(strategy):
            op.linear_logprobs_backward(
                _meta(n, dtype=f32, offset=offset), _meta(n, dtype=f32) if entropy else None,
                _meta(n, h, dtype=dtype, offset=offset), _meta(v, h, dtype=dtype, offset=offset),
                _meta(v, dtype=dtype) if bias else None, _meta(n, dtype=torch.int64, offset=offset),
                _meta(n, dtype=f64, offset=offset), _meta(n, dtype=f64), 0.7, softcap, -100,
                dh, dw, db)

    yield from _head_scenarios("linear_logprobs", dname, op._default_config,
                               (("forward", forward, run_forward),
                                ("backward", backward, run_backward)))


def linear_kl_scenarios(dname: str) -> Iterator[Scenario]:
    from fastalign.kernels import linear_kl as op

    dtype = DTYPES[dname]
    # (tag, bias, softcap, scored: with the policy's targets, logp and entropy of the same pass)
    forward = [("", False, 0.0, False), (" bias", True, 0.0, False),
               (" softcap", False, 30.0, False), (" scored", False, 0.0, True),
               (" scored bias+softcap", True, 30.0, True)]
    # (tag, bias, softcap, policy gradients (dh, dw, db), reference gradients, strategy, scored:
    # None, or with the targets' gradients "logp" or "logp+ent")
    backward = [("", False, 0.0, (True, True, False), (False, False, False), "chunked", None),
                (" softcap", False, 30.0, (True, True, False), (False, False, False), "chunked",
                 None),
                (" bias", True, 0.0, (True, True, True), (False, False, False), "chunked", None),
                (" both-heads", False, 0.0, (True, True, False), (True, True, False), "chunked",
                 None),
                (" atomic", False, 0.0, (True, True, False), (False, False, False), "atomic",
                 None),
                (" both-heads+bias atomic", True, 0.0, (True, True, True), (True, True, True),
                 "atomic", None),
                (" scored+ent", False, 0.0, (True, True, False), (False, False, False),
                 "chunked", "logp+ent"),
                (" scored bias+softcap", True, 30.0, (True, True, True), (False, False, False),
                 "chunked", "logp"),
                (" scored+ent atomic", False, 0.0, (True, True, False), (False, False, False),
                 "atomic", "logp+ent")]

    def heads(n, h, v, bias, offset):
        return [_meta(n, h, dtype=dtype, offset=offset), _meta(v, h, dtype=dtype, offset=offset),
                _meta(v, dtype=dtype, offset=offset) if bias else None] * 2

    def run_forward(n, h, v, bias, softcap, scored, offset):
        targets = _meta(n, dtype=torch.int64, offset=offset) if scored else None
        op.linear_kl_forward(*heads(n, h, v, bias, offset), 0.7, softcap, targets=targets)

    def run_backward(n, h, v, bias, softcap, grads, ref_grads, strategy, scored, offset):
        f32, f64 = torch.float32, torch.float64
        extra = {}
        if scored:
            extra = dict(targets=_meta(n, dtype=torch.int64, offset=offset),
                         sum_pz=_meta(n, dtype=f64), grad_logp=_meta(n, dtype=f32),
                         grad_entropy=_meta(n, dtype=f32) if "ent" in scored else None)
        with _backward_strategy(strategy):
            op.linear_kl_backward(_meta(n, offset=offset), *heads(n, h, v, bias, offset),
                                  _meta(n, dtype=f64, offset=offset), _meta(n, dtype=f64),
                                  _meta(n, dtype=f64), 0.7, softcap, *grads, *ref_grads,
                                  **extra)

    yield from _head_scenarios("linear_kl", dname, op._default_config,
                               (("forward", forward, run_forward),
                                ("backward", backward, run_backward)))


@contextlib.contextmanager
def _backward_strategy(strategy: str) -> Iterator[None]:
    """Launch the backward as ``FASTALIGN_TRITON_BACKWARD=strategy`` would."""
    with mock.patch.dict(os.environ, {"FASTALIGN_TRITON_BACKWARD": strategy}):
        yield


def _row_config(op) -> Callable[[str, torch.dtype, int], object]:
    """The ``default_config`` of a module of row kernels: its one BLOCK_V and NUM_WARPS, whatever
    the kind, dtype and N."""
    import triton

    return lambda kind, dtype, n_tokens: triton.Config({"BLOCK_V": op.BLOCK_V},
                                                       num_warps=op.NUM_WARPS)


def linear_nll_scenarios(dname: str) -> Iterator[Scenario]:
    from fastalign.kernels import linear_nll as op

    dtype = DTYPES[dname]
    # (tag, bias, softcap, dh, dw, db): the row kernel at its one config, on every chunk of the
    # default workspace (the logits and the head's gradients are torch.mm's)
    forward = [("", False, 0.0, True, True, False), (" bias+softcap", True, 30.0, True, True, True),
               (" dh-only", False, 0.0, True, False, False)]

    def run_forward(n, h, v, bias, softcap, dh, dw, db, offset):
        op.linear_nll_forward(
            _meta(n, h, dtype=dtype, offset=offset), _meta(v, h, dtype=dtype, offset=offset),
            _meta(v, dtype=dtype, offset=offset) if bias else None,
            _meta(n, dtype=torch.int64, offset=offset), _meta(1), 0.7, softcap, -100, dh, dw, db)

    yield from _head_scenarios("linear_nll", dname, _row_config(op),
                               (("forward", forward, run_forward),))


def sequence_rows_scenarios(dname: str) -> Iterator[Scenario]:
    import triton

    from fastalign.kernels import _chunked
    from fastalign.kernels import sequence_rows as op

    dtype = DTYPES[dname]
    # The row kernels at their one config, on an [N, V] tile of the engine's workspace (rows
    # padded to a multiple of 16 entries, as _chunked.head_grads_in_chunks pads them; H plays no
    # part). Misaligned: the per-row vectors and the bias, which the launchers align; the tile is
    # written in place, so it is the engine's aligned workspace.
    # (tag, bias, softcap) of the statistics; (tag, bias, softcap, entropy gradient) of the
    # gradient
    stats = [("", False, 0.0), (" bias+softcap", True, 30.0)]
    grad = [(" ent", False, 0.0, True), ("", False, 0.0, False),
            (" bias+softcap+ent", True, 30.0, True)]

    def tile(n, v):
        padded = triton.cdiv(v, _chunked.ALIGNMENT) * _chunked.ALIGNMENT
        return _meta(n, padded, dtype=dtype)[:, :v]

    def run_stats(n, h, v, bias, softcap, offset):
        op.sequence_rows_stats(tile(n, v), _meta(v, dtype=dtype, offset=offset) if bias else None,
                               _meta(n, dtype=torch.int64, offset=offset), 0.7, softcap)

    def run_grad(n, h, v, bias, softcap, entropy, offset):
        f32 = torch.float32
        op.sequence_rows_grad(tile(n, v), _meta(v, dtype=dtype, offset=offset) if bias else None,
                              _meta(n, dtype=torch.int64, offset=offset),
                              _meta(n, dtype=f32, offset=offset), _meta(n, dtype=f32),
                              _meta(n, dtype=f32, offset=offset),
                              _meta(n, dtype=f32, offset=offset) if entropy else None,
                              0.7, softcap)

    yield from _head_scenarios("sequence_rows", dname, _row_config(op),
                               (("stats", stats, run_stats), ("grad", grad, run_grad)))


def gae_scenarios(dname: str) -> Iterator[Scenario]:
    from fastalign.kernels import gae as op

    if dname != "fp32":  # float32 only
        return
    for batch, length in ((1024, 2048), (7, 999)):
        yield Scenario(f"gae.forward fp32 B={batch} T={length}",
                       lambda b=batch, t=length: op.gae_forward(
                           _meta(b, t), _meta(b, t), _meta(b, t, dtype=torch.bool), 0.99, 0.95),
                       tier=0 if batch == 1024 else 1)


# One function per op module: (dtype name) -> its scenarios. A new launcher adds one here.
SCENARIO_SOURCES: tuple[Callable[[str], Iterator[Scenario]], ...] = (
    linear_logprobs_scenarios, linear_kl_scenarios, linear_nll_scenarios,
    sequence_rows_scenarios, gae_scenarios)


def scenarios() -> list[Scenario]:
    return [s for dname in DTYPES for source in SCENARIO_SOURCES for s in source(dname)]


# ----------------------------------------------------------------------------------------------
# Recording and specialising launches
# ----------------------------------------------------------------------------------------------


def interpreter_reason() -> str | None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 replaces the kernels by Python functions; unset it"
    return None


def tools_missing() -> str | None:
    """Why this Triton cannot compile for NVIDIA targets here, or None."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as exc:
        return f"the triton wheel has no NVIDIA backend ({exc})"
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [name for name in ("ptxas", "cuobjdump") if not (tools / name).is_file()]
    if missing:
        return f"the triton wheel lacks {', '.join(missing)} under {tools}"
    return None


def record_launches(run: Callable[[], object]) -> list[Launch]:
    """The kernel launches ``run`` issues, intercepted after the heuristics, none executed."""
    from triton.runtime.jit import JITFunction

    from fastalign.kernels import _launch

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    with mock.patch.object(JITFunction, "run", record), \
            mock.patch.object(_launch, "num_sms", lambda device: SM_COUNT), \
            mock.patch.object(_launch, "autotune_enabled", lambda: False):
        run()
    return launches


@dataclasses.dataclass
class Specialised:
    """A launch as the JIT would compile it for one arch."""

    key: str
    kernel_name: str
    arch: int
    source: object     # triton.compiler.ASTSource
    options: dict
    constexprs: dict   # by argument name
    divisible: list    # arguments marked tt.divisibility=16
    not_divisible: list  # pointer and integer arguments that are not


def specialise(launch: Launch, arch: int) -> Specialised:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    option_names = set(vars(backend.parse_options({})))
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # as JITFunction.run adds
        if name in option_names and hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    names = fn.arg_names
    constexpr_values = {names[path[0]]: value for path, value in constexprs.items()
                        if len(path) == 1}
    divisible = sorted(names[path[0]] for path, attr in attrs.items()
                       if any("divisibility" in str(item) for item in attr))
    not_divisible = sorted(
        name for name, kind in signature.items()
        if name not in divisible and kind != "constexpr" and (kind.startswith("*") or kind in (
            "i32", "i64")))
    options = vars(options)
    key = repr((fn.fn.__module__, fn.fn.__qualname__, arch, sorted(signature.items()),
                sorted(map(repr, constexprs.items())), sorted(map(repr, attrs.items())),
                sorted(map(repr, options.items()))))
    return Specialised(key, f"{fn.fn.__module__.rpartition('.')[2]}.{fn.fn.__name__}", arch,
                       ASTSource(fn, signature, constexprs, attrs), options, constexpr_values,
                       divisible, not_divisible)


def unlaunched_kernels(launched: set[str]) -> list[str]:
    """Kernels of ``KERNEL_MODULES`` that no scenario launches."""
    from triton.runtime.jit import JITFunction

    missing = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            while hasattr(value, "fn") and not isinstance(value, JITFunction):
                value = value.fn  # Heuristics / Autotuner wrappers
            if isinstance(value, JITFunction) and name.endswith("_kernel") and \
                    value.fn.__module__ == module_name:
                label = f"{module_name.rpartition('.')[2]}.{value.fn.__name__}"
                if label not in launched:
                    missing.append(label)
    return missing


# ----------------------------------------------------------------------------------------------
# Reading the cubin
# ----------------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.+?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P[0-9T]\s+")


def sass_counts(sass: str) -> dict[str, int]:
    """Spill instructions (STL/LDL), those inside loops (between a backward branch and its
    target), and Hopper/Ampere MMA instructions, counted statically in the SASS."""
    instructions = []
    for line in sass.splitlines():
        match = _INSTRUCTION.search(line)
        if match:
            text = _PREDICATE.sub("", match.group(2).strip())
            instructions.append((int(match.group(1), 16), text))
    loops = []
    for address, text in instructions:
        if text.startswith(("BRA", "JMP")):
            targets = re.findall(r"0x([0-9a-f]+)", text)
            # A branch to itself is the trap after EXIT, no loop.
            if targets and int(targets[-1], 16) < address:
                loops.append((int(targets[-1], 16), address))
    counts = dict(stl=0, ldl=0, loop_stl=0, loop_ldl=0, hgmma=0, hmma=0, loops=len(loops))
    for address, text in instructions:
        opcode = text.split(".")[0].split()[0] if text else ""
        key = {"STL": "stl", "LDL": "ldl", "HGMMA": "hgmma", "HMMA": "hmma"}.get(opcode)
        if key is None:
            continue
        counts[key] += 1
        if key in ("stl", "ldl") and any(start <= address <= end for start, end in loops):
            counts["loop_" + key] += 1
    return counts


def read_cubin(cubin: bytes) -> dict[str, int]:
    """Registers, stack (spill) bytes and the SASS counts of a cubin, through cuobjdump."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(cubin)
    try:
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", file.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", file.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(file.name)
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {usage[:200]!r}")
    return dict(regs=int(match.group(1)), stack=int(match.group(2)), **sass_counts(sass))


# ----------------------------------------------------------------------------------------------
# The gate
# ----------------------------------------------------------------------------------------------

_FLAG = re.compile(r"^(HAS_|EVEN_|COMPUTE_|DOT_|STORE_)")


def _plan(only: str | None = None) -> tuple[dict[str, dict], list[dict], set[str]]:
    """Record every scenario's launches and specialise them per arch: (rows to compile by key,
    one entry per scenario with its launches' specialisations, the kernels launched)."""
    rows: dict[str, dict] = {}
    records, launched = [], set()
    for scenario in scenarios():
        if only and not re.search(only, scenario.name):
            continue
        dname = scenario.name.split()[1]
        archs = list(SMEM_LIMITS) if scenario.tier == 0 else [90] if scenario.tier == 1 \
            or dname in VARIANT_DTYPES else []
        launches = record_launches(scenario.run)
        entry = dict(scenario=scenario.name, expect_aligned=scenario.expect_aligned,
                     archs=archs, launches=[])
        for index, launch in enumerate(launches):
            spec = specialise(launch, 90)
            launched.add(spec.kernel_name)
            entry["launches"].append(dict(kernel=spec.kernel_name, divisible=spec.divisible,
                                          not_divisible=spec.not_divisible))
            for arch in archs:
                spec = specialise(launch, arch) if arch != 90 else spec
                row = rows.setdefault(spec.key, dict(
                    kernel=spec.kernel_name, arch=f"sm_{arch}", scenario=scenario.name,
                    launch=index, num_warps=spec.options["num_warps"],
                    num_stages=spec.options["num_stages"],
                    blocks=" ".join(f"{k}={v}" for k, v in spec.constexprs.items()
                                    if k.startswith(("BLOCK", "GROUP"))),
                    flags=" ".join(k for k, v in spec.constexprs.items()
                                   if _FLAG.match(k) and v is True),
                    unaligned=" ".join(spec.not_divisible), also=[]))
                if row["scenario"] != scenario.name:
                    row["also"].append(scenario.name)
        records.append(entry)
    return rows, records, launched


_WORKER_LAUNCHES: dict[str, list[Launch]] = {}


def _compile_row(scenario_name: str, launch_index: int, arch: int) -> dict:
    """Compile one launch for ``arch`` and read its cubin (in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget

    if scenario_name not in _WORKER_LAUNCHES:
        by_name = {s.name: s for s in scenarios()}
        _WORKER_LAUNCHES[scenario_name] = record_launches(by_name[scenario_name].run)
    spec = specialise(_WORKER_LAUNCHES[scenario_name][launch_index], arch)
    start = time.perf_counter()
    try:
        compiled = triton.compile(spec.source, target=GPUTarget("cuda", arch, 32),
                                  options=spec.options)
        result = dict(smem=int(compiled.metadata.shared), **read_cubin(compiled.asm["cubin"]))
    except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is a gate failure
        result = dict(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
                      if str(exc).strip() else type(exc).__name__)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def problems(row: dict) -> list[str]:
    """What fails the gate in one compiled row."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    found = []
    limit = SMEM_LIMITS[int(row["arch"].removeprefix("sm_"))]
    if row["smem"] > limit:
        found.append(f"shared memory {row['smem'] / 1024:.1f} KiB > {limit // 1024} KiB")
    if row["loop_stl"] or row["loop_ldl"]:
        found.append(f"spills inside a loop ({row['loop_stl']} STL, {row['loop_ldl']} LDL)")
    return found


def run_gate(jobs: int = 2, cache_dir: str | None = None, only: str | None = None) -> dict:
    """Record, specialise, compile each distinct launch once (``jobs`` processes) and check it;
    ``only``, a regex on the scenario names, makes a partial run (no unlaunched-kernel check).

    Returns a JSON-able report: ``skipped`` (a reason, or None), ``rows`` (one per compiled
    launch), ``scenarios`` (every launch's specialisation), ``unlaunched`` kernels, ``failures``
    and ``seconds`` (wall time)."""
    import triton

    # Triton 3.9 warns that the FP-fusion default will change: pin today's (fusion on).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    start = time.perf_counter()
    report = dict(triton=triton.__version__, torch=torch.__version__, skipped=None, rows=[],
                  scenarios=[], unlaunched=[], failures=[])
    reason = interpreter_reason()
    if reason is None:
        rows, report["scenarios"], launched = _plan(only)
        report["unlaunched"] = [] if only else unlaunched_kernels(launched)
        reason = tools_missing()
    if reason is not None:
        report["skipped"] = reason
        report["seconds"] = round(time.perf_counter() - start, 1)
        return report
    own_cache = cache_dir is None
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="fastalign-hopper-")
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # inherited by the workers; never ~/.triton
    try:
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch
        with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs),
                                                    mp_context=context) as pool:
            futures = {key: pool.submit(_compile_row, row["scenario"], row["launch"],
                                        int(row["arch"].removeprefix("sm_")))
                       for key, row in rows.items()}
            for key, future in futures.items():
                rows[key].update(future.result())
    finally:
        if own_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
    report["rows"] = sorted(rows.values(), key=lambda r: (r["arch"], r["kernel"], r["scenario"]))
    for row in report["rows"]:
        row["problems"] = problems(row)
        report["failures"] += [f"{row['kernel']} {row['arch']} ({row['scenario']}): {problem}"
                               for problem in row["problems"]]
    report["failures"] += [f"{name}: launched by no scenario of fastalign.bench.hopper"
                           for name in report["unlaunched"]]
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

COLUMNS = ("kernel", "arch", "scenario", "blocks", "num_warps", "num_stages", "flags", "regs",
           "stack", "stl", "ldl", "loop_stl", "loop_ldl", "smem_kib", "hgmma", "hmma", "seconds",
           "problems")


def _cells(row: dict) -> dict:
    cells = dict(row, smem_kib=f"{row['smem'] / 1024:.1f}" if "smem" in row else "",
                 problems="; ".join(row.get("problems", [])) or "ok")
    if row.get("also"):
        cells["scenario"] += f" (+{len(row['also'])} more)"
    return {column: cells.get(column, "") for column in COLUMNS}


def headline(report: dict) -> str:
    """Max registers, spills and shared memory per arch, in one line each."""
    lines = []
    for arch in sorted({row["arch"] for row in report["rows"]}, reverse=True):
        rows = [r for r in report["rows"] if r["arch"] == arch and "regs" in r]
        if not rows:
            continue
        regs = max(rows, key=lambda r: r["regs"])
        smem = max(rows, key=lambda r: r["smem"])
        spilling = [r for r in rows if r["stack"]]
        lines.append(
            f"{arch}: {len(rows)} launches; max {regs['regs']} registers ({regs['kernel']}, "
            f"{regs['scenario']}); {len(spilling)} with spills (max stack "
            f"{max((r['stack'] for r in spilling), default=0)} B, "
            f"{sum(r['loop_stl'] + r['loop_ldl'] for r in rows)} spill instructions in loops); "
            f"max shared memory {smem['smem'] / 1024:.1f} KiB ({smem['kernel']}, "
            f"{smem['scenario']}) of {SMEM_LIMITS[int(arch[3:])] // 1024} KiB")
    return "\n".join(lines)


def write_table(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"hopper-gate_triton-{report['triton']}_{datetime.date.today().isoformat()}"
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(_cells(row) for row in report["rows"])
    lines = [
        f"# Hopper compile gate: triton {report['triton']}, torch {report['torch']}",
        "",
        "Every Triton kernel of fastalign compiled without a GPU as its launcher launches it "
        f"(main shape N,H,V = {MAIN_SHAPE}; ragged {RAGGED_SHAPE}; odd H {ODD_H_SHAPE}), "
        "read with cuobjdump. regs: registers a thread; stack: spill bytes a thread; STL/LDL: "
        "spill instructions (static), loop STL/LDL: those inside loops; smem: shared memory a "
        "block. Regenerate with `make hopper-table`.",
        "",
        *(f"- {line}" for line in headline(report).splitlines()),
        f"- gate wall time: {report['seconds']} s ({len(report['rows'])} compiles); "
        f"failures: {len(report['failures'])}",
        "",
        "| kernel | arch | scenario | blocks | warps | stages | flags | regs | stack | STL | LDL "
        "| loop STL | loop LDL | smem KiB | HGMMA | HMMA | s | gate |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(v) for v in _cells(row).values()) + " |"
              for row in report["rows"]]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastalign.bench.hopper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the table (markdown + CSV)")
    parser.add_argument("--json", help="write the whole report there")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: the CPU count)")
    parser.add_argument("--cache-dir", help="Triton cache to reuse (default: a fresh temporary "
                        "one, removed afterwards, so that the time is that of a cold gate)")
    parser.add_argument("--only", help="a regex on the scenario names: compile only those")
    args = parser.parse_args(argv)
    report = run_gate(jobs=args.jobs, cache_dir=args.cache_dir, only=args.only)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    if report["skipped"]:
        print(f"hopper gate skipped: {report['skipped']}")
        return 0
    print(headline(report))
    if args.out:
        for path in write_table(report, args.out):
            print(f"wrote {path}")
    print(f"{len(report['rows'])} compiles in {report['seconds']} s; "
          f"{len(report['failures'])} failures")
    for failure in report["failures"]:
        print(f"  FAIL {failure}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
