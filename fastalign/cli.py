"""The ``fastalign`` command line: ``fastalign <command> [options]``.

Commands register themselves in ``COMMANDS`` (name → function adding a subparser); each subparser
sets ``handler``, a function of the parsed arguments that returns an exit status. Run
``fastalign --help`` or ``python -m fastalign.cli --help``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from fastalign import bench

    parser = subparsers.add_parser(
        "bench",
        help="benchmark linear_logprobs against eager PyTorch and other providers",
        description=(
            "Benchmark fastalign.linear_logprobs against eager PyTorch, torch.compile, "
            "torch.nn.functional.linear_cross_entropy and (on CUDA, when installed) Liger-Kernel "
            "and Cut Cross-Entropy. Every provider is first checked against the float32 reference, "
            "then timed (CUDA: triton.testing.do_bench; CPU: a warm-up plus repeated timed calls) "
            "and its peak memory measured in a separate call, for each mode. Writes "
            "OUTPUT/linear_logprobs_<device>_<date>.csv, .png and .md, and prints the table."
        ),
        epilog=(
            "Modes: forward (with requires_grad inputs, as in training), backward (through a "
            "graph built once outside the timed region), full (forward + backward). Credited "
            "FLOPs: forward 2*N*H*V, backward 6*N*H*V, full 8*N*H*V; frac_of_matmul compares with "
            "a large torch.mm measured in the same run. Default shapes: CPU 2048,1024,32000 "
            "float32; CUDA the Llama-3 (H=4096, V=128256), Qwen2.5 (H=3584, V=152064) and "
            "Gemma-2 (H=2304, V=256000, softcap 30) heads at N = 4096, 8192, 16384, bfloat16. "
            "Example: fastalign bench --device cpu --shapes 256,128,4000 --output /tmp/bench"
        ),
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None,
        help="device to run on (default: cuda when available, else cpu)")
    parser.add_argument(
        "--shapes", nargs="+", metavar="N,H,V[,SOFTCAP]", type=_shape_arg, default=None,
        help="problem shapes: tokens N, hidden size H, vocabulary V and an optional softcap "
             "(default: the device's default shapes, see below)")
    parser.add_argument(
        "--dtype", choices=tuple(bench.DTYPES), default=None,
        help="dtype of hidden and weight (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument(
        "--providers", nargs="+", choices=bench.PROVIDER_NAMES, default=None, metavar="PROVIDER",
        help="providers to compare (default: all that can run; unavailable ones are listed as "
             f"skipped); choices: {', '.join(bench.PROVIDER_NAMES)}")
    parser.add_argument(
        "--modes", nargs="+", choices=bench.MODES, default=list(bench.MODES),
        help="which passes to time (default: all)")
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


def _shape_arg(text: str):
    from fastalign.bench import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run_bench(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from fastalign import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastalign bench: --device cuda, but torch.cuda.is_available() is False",
              file=sys.stderr)
        return 2
    dtype = bench.DTYPES[args.dtype] if args.dtype else bench.default_dtype(device)
    shapes = args.shapes or bench.default_shapes(device)
    if args.softcap is not None:
        shapes = [dataclasses.replace(shape, softcap=args.softcap or None) for shape in shapes]
    config = bench.BenchConfig(
        device=device, dtype=dtype, shapes=shapes, providers=args.providers,
        modes=tuple(mode for mode in bench.MODES if mode in args.modes),
        timing=bench.TimingOptions(warmup=args.warmup, reps=args.reps, cuda_rep_ms=args.rep_ms),
        on_mismatch=args.on_mismatch, seed=args.seed, progress=not args.no_progress,
    )
    result = bench.run_benchmark(config)
    paths = bench.write_outputs(result, args.output)
    print(bench.format_table(result))
    print()
    for path in paths.values():
        print(f"wrote {path}")
    return 0


# name -> function that adds the command's subparser (and sets ``handler``). New commands
# (``train``, ...) add an entry here.
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "bench": _add_bench,
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
