"""The ``fastalign`` command line: ``fastalign <command> [options]``.

Commands register themselves in ``COMMANDS`` (name → function adding a subparser); each subparser
sets ``handler``, a function of the parsed arguments that returns an exit status. Run
``fastalign --help`` or ``python -m fastalign.cli --help``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence

_BENCH_INTRO = """\
Benchmark one op of fastalign against eager PyTorch, torch.compile and other providers. Every
provider is first checked against a ground truth (values and gradients), then timed (CUDA:
triton.testing.do_bench; CPU: a warm-up plus repeated timed calls) and its peak memory measured
in a separate call (the workspace beyond the inputs and what the call returns), for each mode.
Writes OUTPUT/<op>_<device>_<date>.csv, .png and .md, and prints the table."""

_HELP_WIDTH = 95


def _help_rows(rows: Sequence[tuple[str, str]]) -> list[str]:
    """``name  text`` rows, the text wrapped and aligned after the longest name."""
    indent = 2 + max(len(name) for name, _ in rows) + 2
    return [textwrap.fill(text, _HELP_WIDTH, initial_indent=f"  {name}".ljust(indent),
                          subsequent_indent=" " * indent, break_on_hyphens=False)
            for name, text in rows]


def _ops_by(benchmarks, key: Callable) -> dict:
    """Op names grouped by ``key(benchmark)``, in the registry's order."""
    groups: dict = {}
    for benchmark in benchmarks:
        groups.setdefault(key(benchmark), []).append(benchmark.name)
    return groups


def _bench_description(benchmarks) -> str:
    ops = _help_rows([(b.name, b.describe()) for b in benchmarks])
    return "\n".join([_BENCH_INTRO, "", "Ops (--op):", *ops]) + "\n"


def _bench_epilog(benchmarks, default_op: str) -> str:
    by_shape = _ops_by(benchmarks, lambda b: (b.shape_syntax, b.shape_meaning))
    width = max(len(syntax) for syntax, _ in by_shape)
    shapes = _help_rows([(", ".join(names), f"{syntax.ljust(width)}  {meaning}")
                         for (syntax, meaning), names in by_shape.items()])
    examples = [f"  fastalign bench{'' if b.name == default_op else f' --op {b.name}'} "
                f"--device cpu --shapes {b.example_shapes} --output /tmp/bench"
                for b in benchmarks]
    return "\n".join([
        "Shapes (--shapes, one or more, comma-separated integers, SOFTCAP optional, 0 = none):",
        *shapes, "",
        "Default shapes:", *_help_rows([(b.name, b.default_shapes_help) for b in benchmarks]), "",
        "Credited FLOPs (the same for every provider; frac_of_matmul compares with a large "
        "torch.mm\nmeasured in the same run):",
        *_help_rows([(b.name, b.describe_flops()) for b in benchmarks]), "",
        "Examples:", *examples,
    ]) + "\n"


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from fastalign.bench import harness, registry

    benchmarks = list(registry.BENCHMARKS.values())
    parser = subparsers.add_parser(
        "bench",
        help=f"benchmark an op ({', '.join(registry.BENCHMARKS)}) against eager PyTorch and "
             "other providers",
        description=_bench_description(benchmarks),
        epilog=_bench_epilog(benchmarks, registry.DEFAULT),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--op", choices=tuple(registry.BENCHMARKS), default=registry.DEFAULT,
        help="what to benchmark (default: %(default)s)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None,
        help="device to run on (default: cuda when available, else cpu)")
    parser.add_argument(
        "--shapes", nargs="+", metavar="SHAPE", default=None,
        help="problem shapes: " + ", ".join(
            f"{syntax} for {' and '.join(names)}" for syntax, names in
            _ops_by(benchmarks, lambda b: b.shape_syntax).items())
        + " (default: the op's default shapes on the device, see below)")
    parser.add_argument(
        "--dtype", choices=tuple(harness.DTYPES), default=None,
        help="dtype of hidden and weight (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument(
        "--providers", nargs="+", choices=registry.all_providers(), default=None,
        metavar="PROVIDER",
        help="providers to compare (default: all of the op's; those that cannot run are listed "
             "as skipped); " + "; ".join(f"{b.name}: {', '.join(b.providers)}"
                                         for b in benchmarks))
    parser.add_argument(
        "--modes", nargs="+", choices=registry.all_modes(), default=None,
        help="which passes to time (default: all of the op's: " + "; ".join(
            f"{' and '.join(names)} {', '.join(modes)}" for modes, names in
            _ops_by(benchmarks, lambda b: b.modes).items()) + ")")
    parser.add_argument(
        "--softcap", type=float, default=None, metavar="X",
        help="final-logit softcap for every shape, overriding the shapes' own (0: none)")
    parser.add_argument(
        "--output", default="benchmarks/results", metavar="DIR",
        help="folder for the CSV, PNG and markdown table (default: %(default)s)")
    parser.add_argument(
        "--reps", type=int, default=5,
        help="CPU: timed repetitions per (shape, provider, mode), after --warmup "
             "(default: %(default)s)")
    parser.add_argument(
        "--warmup", type=int, default=1,
        help="CPU: untimed calls before timing (default: %(default)s)")
    parser.add_argument(
        "--sequential", action="store_true",
        help="CPU: time one provider's calls after another's instead of in interleaved rounds "
             "(each round one call of every provider and mode: a CPU's drift over minutes then "
             "falls on all of them alike)")
    parser.add_argument(
        "--rep-ms", type=int, default=100,
        help="CUDA: time budget in ms for triton.testing.do_bench's repetitions "
             "(default: %(default)s)")
    parser.add_argument(
        "--on-mismatch", choices=("error", "skip"), default="error",
        help="when a provider disagrees with the reference (or a fastalign provider raises): "
             "stop with an error, or record it as skipped (printed loudly) and go on "
             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random inputs (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_run_bench)


def _bench_error(message: str) -> int:
    print(f"fastalign bench: error: {message}", file=sys.stderr)
    return 2


def _run_bench(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from fastalign.bench import harness, measure, registry, report
    from fastalign.ops._backends import check_environment

    try:
        check_environment()
    except ValueError as exc:
        return _bench_error(str(exc))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _bench_error("--device cuda, but torch.cuda.is_available() is False")
    benchmark = registry.get_benchmark(args.op)
    try:
        shapes = [benchmark.parse_shape(text) for text in args.shapes or ()]
    except ValueError as exc:
        return _bench_error(f"argument --shapes: {exc}")
    shapes = shapes or benchmark.default_shapes(device)
    if args.softcap is not None:
        shapes = [dataclasses.replace(shape, softcap=args.softcap or None) for shape in shapes]
    modes = tuple(mode for mode in benchmark.modes if mode in (args.modes or benchmark.modes))
    wrong_modes = sorted(set(args.modes or ()) - set(benchmark.modes))
    if wrong_modes:
        return _bench_error(f"--op {args.op} has modes {', '.join(benchmark.modes)}, not "
                            f"{', '.join(wrong_modes)}")
    wrong_providers = [name for name in args.providers or () if name not in benchmark.providers]
    if wrong_providers:
        return _bench_error(f"--op {args.op} has providers {', '.join(benchmark.providers)}, not "
                            f"{', '.join(wrong_providers)}")
    dtype = harness.DTYPES[args.dtype] if args.dtype else harness.default_dtype(device)
    config = harness.BenchConfig(
        device=device, dtype=dtype, shapes=shapes, providers=args.providers, modes=modes,
        timing=measure.TimingOptions(warmup=args.warmup, reps=args.reps,
                                     cuda_rep_ms=args.rep_ms, interleave=not args.sequential),
        on_mismatch=args.on_mismatch, seed=args.seed, progress=not args.no_progress,
    )
    result = harness.run_benchmark(benchmark, config)
    paths = report.write_outputs(result, args.output)
    print(report.format_table(result))
    print()
    for path in paths.values():
        print(f"wrote {path}")
    return 0


# name -> function that adds the command's subparser (and sets ``handler``).
def _add_train(subparsers: argparse._SubParsersAction) -> None:
    from fastalign.trainers.cli import add_train_command

    add_train_command(subparsers)


COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "bench": _add_bench,
    "train": _add_train,
}


def build_parser() -> argparse.ArgumentParser:
    from fastalign import __version__

    parser = argparse.ArgumentParser(
        prog="fastalign",
        description="fastalign: fused kernels for LLM alignment losses that never materialise "
                    "the logits.",
    )
    parser.add_argument("--version", action="version", version=f"fastalign {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS.values():
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastalign`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
