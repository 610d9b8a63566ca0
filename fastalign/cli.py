"""The ``fastalign`` command line: ``fastalign <command> [options]``.

Commands register themselves in ``COMMANDS`` (name → function adding a subparser); each subparser
sets ``handler``, a function of the parsed arguments that returns an exit status. Run
``fastalign --help`` or ``python -m fastalign.cli --help``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

_BENCH_DESCRIPTION = """\
Benchmark one op of fastalign against eager PyTorch, torch.compile and other providers. Every
provider is first checked against a ground truth (values and gradients), then timed (CUDA:
triton.testing.do_bench; CPU: a warm-up plus repeated timed calls) and its peak memory measured
in a separate call (the workspace beyond the inputs and what the call returns), for each mode.
Writes OUTPUT/<op>_<device>_<date>.csv, .png and .md, and prints the table.

Ops (--op):
  linear_logprobs  fastalign.linear_logprobs vs eager, torch.compile,
                   torch.nn.functional.linear_cross_entropy and (on CUDA, when installed)
                   Liger-Kernel and Cut Cross-Entropy; modes forward, backward, full.
  linear_kl        fastalign.linear_kl (exact per-token KL of a policy head against a frozen
                   reference head) vs eager (both heads' logits materialised) and
                   torch.compile; modes forward, full (gradients of the policy side only).
  dpo              one DPO step's loss work: FusedDPOLoss(beta=0.1) on 2B sequences (chosen
                   stacked on rejected) vs TRL-style eager ([2B, T, V] logits for policy and
                   reference, log_softmax, gather, masked sums, dpo_loss) and torch.compile;
                   modes forward, full (loss, then gradients of hidden and weight).
"""

_BENCH_EPILOG = """\
Shapes (--shapes, one or more, comma-separated integers, SOFTCAP optional, 0 = none):
  linear_logprobs, linear_kl  N,H,V[,SOFTCAP]    N tokens, hidden size H, vocabulary V
  dpo                         B,T,H,V[,SOFTCAP]  B pairs (2B sequences) of T tokens each

Default shapes:
  linear_logprobs  CPU 2048,1024,32000 float32; CUDA the Llama-3 (H=4096, V=128256), Qwen2.5
                   (H=3584, V=152064) and Gemma-2 (H=2304, V=256000, softcap 30) heads at
                   N = 4096, 8192, 16384, bfloat16
  linear_kl        CPU 1024,1024,32000 float32; CUDA the Llama-3 head at N = 4096, 8192, bf16
  dpo              CPU 2,512,1024,32000 float32; CUDA 4,1024,4096,128256 (Llama-3), bf16

Credited FLOPs (the same for every provider; frac_of_matmul compares with a large torch.mm
measured in the same run):
  linear_logprobs  forward 2*N*H*V, backward 6*N*H*V, full 8*N*H*V
  linear_kl        forward 4*N*H*V, full 12*N*H*V (backward recomputes both heads)
  dpo              N = 2*B*T; forward 4*N*H*V, full 10*N*H*V (policy 8, reference 2)

Examples:
  fastalign bench --device cpu --shapes 256,128,4000 --output /tmp/bench
  fastalign bench --op linear_kl --device cpu --shapes 256,128,4000,30 --output /tmp/bench
  fastalign bench --op dpo --device cpu --shapes 2,64,128,4000 --output /tmp/bench
"""


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from fastalign import bench, bench_alignment

    ops = ("linear_logprobs", *bench_alignment.OPS)
    providers = tuple(dict.fromkeys(
        bench.PROVIDER_NAMES + tuple(name for op in bench_alignment.OPS.values()
                                     for name in op.providers)))
    parser = subparsers.add_parser(
        "bench",
        help="benchmark an op (linear_logprobs, linear_kl, dpo) against eager PyTorch and "
             "other providers",
        description=_BENCH_DESCRIPTION,
        epilog=_BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--op", choices=ops, default="linear_logprobs",
        help="what to benchmark (default: %(default)s)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None,
        help="device to run on (default: cuda when available, else cpu)")
    parser.add_argument(
        "--shapes", nargs="+", metavar="SHAPE", default=None,
        help="problem shapes: N,H,V[,SOFTCAP] for linear_logprobs and linear_kl, "
             "B,T,H,V[,SOFTCAP] for dpo (default: the op's default shapes on the device, "
             "see below)")
    parser.add_argument(
        "--dtype", choices=tuple(bench.DTYPES), default=None,
        help="dtype of hidden and weight (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument(
        "--providers", nargs="+", choices=providers, default=None, metavar="PROVIDER",
        help="providers to compare (default: all of the op's; those that cannot run are listed "
             "as skipped); linear_logprobs: " + ", ".join(bench.PROVIDER_NAMES) + "; " + "; ".join(
                 f"{name}: {', '.join(op.providers)}"
                 for name, op in bench_alignment.OPS.items()))
    parser.add_argument(
        "--modes", nargs="+", choices=bench.MODES, default=None,
        help="which passes to time (default: all of the op's: linear_logprobs forward, backward, "
             "full; linear_kl and dpo forward, full)")
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


def _bench_error(message: str) -> int:
    print(f"fastalign bench: error: {message}", file=sys.stderr)
    return 2


def _run_bench(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from fastalign import bench, bench_alignment

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _bench_error("--device cuda, but torch.cuda.is_available() is False")
    op = None if args.op == "linear_logprobs" else bench_alignment.get_op(args.op)
    parse_shape = bench.parse_shape if op is None else op.parse_shape
    try:
        shapes = [parse_shape(text) for text in args.shapes or ()]
    except ValueError as exc:
        return _bench_error(f"argument --shapes: {exc}")
    shapes = shapes or (bench.default_shapes(device) if op is None else op.default_shapes(device))
    if args.softcap is not None:
        shapes = [dataclasses.replace(shape, softcap=args.softcap or None) for shape in shapes]
    op_modes = bench.MODES if op is None else op.modes
    op_providers = bench.PROVIDER_NAMES if op is None else op.providers
    modes = tuple(mode for mode in op_modes if mode in (args.modes or op_modes))
    wrong_modes = sorted(set(args.modes or ()) - set(op_modes))
    if wrong_modes:
        return _bench_error(f"--op {args.op} has modes {', '.join(op_modes)}, not "
                            f"{', '.join(wrong_modes)}")
    wrong_providers = [name for name in args.providers or () if name not in op_providers]
    if wrong_providers:
        return _bench_error(f"--op {args.op} has providers {', '.join(op_providers)}, not "
                            f"{', '.join(wrong_providers)}")
    dtype = bench.DTYPES[args.dtype] if args.dtype else bench.default_dtype(device)
    config = bench.BenchConfig(
        device=device, dtype=dtype, shapes=shapes, providers=args.providers, modes=modes,
        timing=bench.TimingOptions(warmup=args.warmup, reps=args.reps, cuda_rep_ms=args.rep_ms),
        on_mismatch=args.on_mismatch, seed=args.seed, progress=not args.no_progress,
    )
    if op is None:
        result = bench.run_benchmark(config)
    else:
        result = bench_alignment.run_benchmark(args.op, config)
    paths = bench.write_outputs(result, args.output)
    print(bench.format_table(result))
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
