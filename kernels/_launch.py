"""Host-side helpers of the Triton launchers: configs, autotuning, launch guards, layout checks.

Each op module (``linear_logprobs``, ``linear_kl``, ``gae``) holds its kernels and a launcher that
checks → allocates → launches; what those launchers share lives here:

- configs: the pinned, per-GPU-family default config of a logit-tile kernel (``pinned_config``),
  the autotuning space (``config_space``) and the ``FASTALIGN_AUTOTUNE=1`` switch;
- ``autotuned``, the autotune wrapper, with a pre-hook that zeroes the gradient buffers an op
  names (its backward accumulates with atomics) and a host timer under the interpreter;
- ``run_kernel``, which launches a kernel at its pinned config, or autotuned;
- launch helpers: the CUDA device guard, the SM count, the forward's vocabulary splits;
- the chunked backward (``FASTALIGN_TRITON_BACKWARD``): per chunk of tokens a kernel writes
  ∂L/∂logits into a bounded workspace, and tensor-core matrix products turn it into the head's
  gradients (``head_grads_in_chunks``);
- the kernels' view of their inputs (``kernel_head``, ``aligned``): H padded to a multiple of 16
  and every tensor on a 16-byte boundary, so that a launch always gets the JIT's divisibility
  specialisation (see ``kernel_head``);
- cheap layout checks (dims, shape, dtype, contiguity, device). The values of the arguments
  (temperature, softcap, target range, ...) are validated once, at the public entry points in
  ``fastalign``; the launchers only make sure that the kernels read what they are told to read.
  None of these checks synchronises with the device.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Sequence

import torch
import triton

# The chunked head gradients live in a module of their own, free of triton (linear_nll's plain
# PyTorch implementation uses them too); the launchers reach them through this module.
from fastalign.kernels._chunked import (  # noqa: F401
    ALIGNMENT,
    MIN_CHUNK_ROWS,
    WORKSPACE_FRACTION,
    HeadGrads,
    addmm_float32,
    chunk_rows,
    float32_accumulator,
    head_grads_in_chunks,
)

# Set once, when the kernels are imported (Triton itself reads the variable at decoration time).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Vocabulary splits of the forward are multiples of this, hence of every BLOCK_V a config may use.
SPLIT_GRANULE = 256


def head_heuristics(**more: Callable[[dict], object]) -> dict:
    """The variant flags of a logit-tile kernel, derived from its arguments ``h_ptr``, ``b_ptr``,
    ``softcap``, ``H``, ``V`` and its BLOCK_H / BLOCK_V, for ``triton.heuristics``; ``more`` adds
    the kernel's own."""
    return {
        "HAS_BIAS": lambda args: args["b_ptr"] is not None,
        "HAS_SOFTCAP": lambda args: args["softcap"] > 0.0,
        "EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0,
        "EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0,
        # Exact IEEE dots for float32 (see ``_tile.tile_dot``), and for bfloat16 under the
        # interpreter, whose tl.dot gets bfloat16 wrong.
        "DOT_IN_FP32": lambda args: args["h_ptr"].dtype == torch.float32
        or (INTERPRET and args["h_ptr"].dtype == torch.bfloat16),
        **more,
    }


def row_heuristics(**more: Callable[[dict], object]) -> dict:
    """The variant flags of a row kernel (one program a row of a logit tile: ``linear_nll``,
    ``sequence_rows``), derived from its arguments ``b_ptr``, ``softcap``, ``V`` and its BLOCK_V;
    ``more`` adds the kernel's own."""
    return {
        "HAS_BIAS": lambda args: args["b_ptr"] is not None,
        "HAS_SOFTCAP": lambda args: args["softcap"] > 0.0,
        "EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0,
        **more,
    }


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------


def autotune_enabled() -> bool:
    """``FASTALIGN_AUTOTUNE``: 1 autotunes the block sizes per shape, 0 (the default) takes the
    pinned configs."""
    value = os.environ.get("FASTALIGN_AUTOTUNE") or "0"
    if value not in ("0", "1"):
        raise ValueError(f"FASTALIGN_AUTOTUNE must be 0 or 1, got {value!r}")
    return value == "1"


def pinned_config(kind: str, dtype: torch.dtype, n_tokens: int,
                  block_v_16bit: int,
                  fp32_tile: tuple[int, int, int] = (64, 32, 8)) -> triton.Config:
    """The pinned config of a logit-tile kernel: 16-bit inputs take [128, block_v_16bit] logit
    tiles, H in chunks of 64, 8 warps, a 3-stage pipeline; float32 runs exact IEEE dots (no
    tensor cores) on 64 tokens × ``fp32_tile`` = (BLOCK_V, BLOCK_H, warps) (64×64 tiles on 4
    warps spill registers inside the loops of the forward and of the two-head backward:
    ``fastalign.bench.hopper``). Few tokens (decoding, tests) shrink BLOCK_N to what is there.

    Chosen for Hopper (H100/H200): its shared memory and MMA shapes; not yet timed. Each op
    picks the vocabulary tiles and float32 warps for its register pressure (its
    ``_default_config``)."""
    block_n = min(128 if dtype != torch.float32 else 64, max(16, triton.next_power_of_2(n_tokens)))
    if dtype == torch.float32:
        block_v, block_h, num_warps = fp32_tile
        kwargs = dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h)
        num_stages = 2
    else:
        kwargs = dict(BLOCK_N=block_n, BLOCK_V=block_v_16bit, BLOCK_H=64)
        num_warps, num_stages = 8, 3
    if kind == "backward":
        kwargs["GROUP_V"] = 8
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


def config_space(kind: str, tiles) -> list[triton.Config]:
    """Autotuning candidates: each (BLOCK_N, BLOCK_V) of ``tiles`` × BLOCK_H × warps/stages."""
    configs = []
    for block_n, block_v in tiles:
        for block_h in (32, 64):
            for num_warps, num_stages in ((4, 3), (8, 3), (8, 4)):
                kwargs = dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h)
                if kind == "backward":
                    kwargs["GROUP_V"] = 8
                configs.append(triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages))
    return configs


def _prune_configs(configs, named_args, **kwargs):
    """Drop token tiles far larger than the batch (and bench fp32 only on its small tiles)."""
    n_bucket = named_args["N_BUCKET"]
    is_fp32 = named_args["h_ptr"].dtype == torch.float32
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max(n_bucket, 16)
            and not (is_fp32 and c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"] > 128 * 128)]
    return kept or configs[:1]


def _zero_buffers_hook(names: Sequence[str]) -> Callable[..., None]:
    """A pre-hook zeroing the named kernel arguments that are not None.

    Autotuning runs a kernel once per config; a backward's atomics must start from zero every
    time. (A hook of our own rather than reset_to_zero: older Triton versions do not skip None.)
    """
    def zero_buffers(nargs, reset_only=False):
        for name in names:
            if nargs.get(name) is not None:
                nargs[name].zero_()
    return zero_buffers


def _wall_clock_bench(kernel_call, quantiles=None):
    # The interpreter has no GPU driver for Triton's benchmarker; time one call on the host so
    # that FASTALIGN_AUTOTUNE=1 still runs (and is tested) there. The numbers mean nothing.
    kernel_call()
    start = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - start) * 1e3
    return [ms] * len(quantiles) if quantiles is not None else ms


def autotuned(kernel, configs: list[triton.Config], key: list[str],
              zeroed: Sequence[str] = ()):
    """``kernel`` under FASTALIGN_AUTOTUNE=1: pruned configs (``key`` must include N_BUCKET),
    the accumulators named in ``zeroed`` reset before each trial, and a host timer under the
    interpreter."""
    hooks = {"pre_hook": _zero_buffers_hook(tuple(zeroed))} if zeroed else {}
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": _prune_configs},
        do_bench=_wall_clock_bench if INTERPRET else None, **hooks,
    )(kernel)


def run_kernel(kind: str, kernel, tuned_kernel, grid, args: tuple, dtype: torch.dtype,
               n_tokens: int,
               default_config: Callable[[str, torch.dtype, int], triton.Config]) -> None:
    """Launch ``kernel`` at ``default_config(kind, dtype, n_tokens)``, or ``tuned_kernel`` (its
    ``autotuned`` wrapper) under FASTALIGN_AUTOTUNE=1. ``grid`` maps the config's kwargs to the
    grid."""
    if autotune_enabled():
        tuned_kernel[grid](*args)
    else:
        config = default_config(kind, dtype, n_tokens)
        kernel[grid(config.kwargs)](*args, **config.kwargs, num_warps=config.num_warps,
                                    num_stages=config.num_stages)


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, so that tests exercise several vocabulary splits


def device_guard(device: torch.device):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def n_bucket(n_tokens: int) -> int:
    """N rounded up to a power of 2 (at least 16): what the autotuning key sees of N."""
    return max(16, triton.next_power_of_2(n_tokens))


def vocab_splits(vocab_size: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(columns per split, number of splits) for a forward over ``n_tiles`` token tiles.

    Enough vocabulary splits for about two waves of programs, each split a whole number of
    granules (so every split holds at least one real column).
    """
    num_granules = triton.cdiv(vocab_size, SPLIT_GRANULE)
    wanted = min(num_granules, max(1, triton.cdiv(2 * num_sms(device), n_tiles)))
    v_per_split = triton.cdiv(num_granules, wanted) * SPLIT_GRANULE
    return v_per_split, triton.cdiv(vocab_size, v_per_split)


def aligned(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x``, or a copy of it on a fresh (aligned) allocation if it starts off a 16-byte boundary
    (a view at an odd offset, such as ``labels[0, 1:]``)."""
    if x is None or x.data_ptr() % ALIGNMENT == 0:
        return x
    return x.clone()


def kernel_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """hidden [N, H], weight [V, H] and bias as the kernels read them: H zero-padded to a multiple
    of 16 and every tensor on a 16-byte boundary (copies only where that is not so already).

    The JIT specialises a launch on H, the row strides and the pointers being multiples of 16
    (elements, bytes); without that, the H-loops of the logit tiles lose their vectorised,
    multi-stage pipelined loads and spill registers inside the loop (fastalign.bench.hopper shows
    both). The padding columns are zeros, so every logit, and hence every result, is the same,
    bit for bit: the kernels already read zeros past H in the last chunk. Gradients come back
    [*, padded H]; ``unpadded`` cuts them to the caller's H.
    """
    hidden_size = hidden.shape[1]
    padded = triton.cdiv(hidden_size, ALIGNMENT) * ALIGNMENT
    if padded == hidden_size:
        return aligned(hidden), aligned(weight), aligned(bias)
    pad = (0, padded - hidden_size)
    return (torch.nn.functional.pad(hidden, pad), torch.nn.functional.pad(weight, pad),
            aligned(bias))


def unpadded(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """A float32 gradient accumulator, cut to the shape of ``like`` (undoing ``kernel_head``'s
    padding of H) and cast to its dtype; None stays None."""
    if grad is None:
        return None
    if grad.dim() == 2 and grad.shape[1] != like.shape[1]:
        return grad[:, :like.shape[1]].to(like.dtype).contiguous()
    return grad.to(like.dtype)


# ----------------------------------------------------------------------------------------------
# The chunked backward
# ----------------------------------------------------------------------------------------------

BACKWARD_STRATEGIES = ("chunked", "atomic")


def backward_strategy() -> str:
    """``FASTALIGN_TRITON_BACKWARD``: "chunked" (the default) or "atomic".

    chunked: per chunk of tokens, a kernel recomputes the logits and writes ∂L/∂logits (input
    dtype) into a workspace; dh and dW come from matrix products of it (cuBLAS on CUDA), with
    dW accumulated in float32. atomic: one kernel adds every (token tile × vocabulary tile)'s
    share of dh and dW with float32 atomics; kept for comparison.
    """
    strategy = os.environ.get("FASTALIGN_TRITON_BACKWARD", "chunked")
    if strategy not in BACKWARD_STRATEGIES:
        raise ValueError(f"FASTALIGN_TRITON_BACKWARD must be one of {BACKWARD_STRATEGIES}, got "
                         f"{strategy!r}")
    return strategy


# ----------------------------------------------------------------------------------------------
# Layout checks
# ----------------------------------------------------------------------------------------------


def check_layout(name: str, x, dtypes: torch.dtype | tuple[torch.dtype, ...],
                 shape: tuple[int | None, ...]) -> None:
    """``x`` is a contiguous tensor of one of ``dtypes`` with ``shape`` (None: any size)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if x.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be {want}, got {x.dtype}")
    if x.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must be [{want}], got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_head_layout(hidden, weight, bias, prefix: str = "") -> None:
    """hidden [N, H], weight [V, H], bias [V] or None: contiguous, one dtype the kernels take."""
    check_layout(f"{prefix}hidden", hidden, FLOAT_DTYPES, (None, None))
    check_layout(f"{prefix}weight", weight, hidden.dtype, (None, hidden.shape[1]))
    if bias is not None:
        check_layout(f"{prefix}bias", bias, hidden.dtype, (weight.shape[0],))


def check_one_device(*tensors: torch.Tensor | None) -> None:
    devices = {x.device for x in tensors if x is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
