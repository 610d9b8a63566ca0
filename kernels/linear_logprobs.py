"""Triton kernels for ``linear_logprobs``: per-token log-probs and entropies from (hidden, LM head).

Math in ``docs/ALGORITHMS.md`` §1; the contract in ``fastalign/linear_logprobs.py``. Nothing here
holds an [N, V] tensor: the logits exist only as one [BLOCK_N, BLOCK_V] tile in registers.

Forward (2·N·H·V FLOPs), two launches:
  1. ``_forward_kernel``, grid (token tiles × vocabulary splits). Each program streams the
     vocabulary tiles of its split, computes each logit tile with an H-loop of ``tl.dot``, and
     merges it into running statistics per token (``_merge_stats``), plus the target logit when
     the target falls in the split. Splitting the vocabulary keeps the GPU busy when there are
     few token tiles (8k tokens are only 64 tiles of 128 for 132 SMs).
  2. ``_forward_merge_kernel`` merges the splits and writes logp, entropy, lse and Σ p·z, the
     last two in float64 (see below).

Backward (6·N·H·V FLOPs), one launch: ``_backward_kernel``, grid (token tiles × vocabulary tiles).
Each program recomputes its logit tile (one H-loop) and its probabilities from the saved lse,
forms ∂L/∂a for the tile, then sweeps H twice more: dh[tile rows] += ∂L/∂a · W[tile] and
dW[tile rows] += (∂L/∂a)ᵀ · h[tile], both with float32 ``tl.atomic_add``; db with one atomic per
column.

The running statistics are ALGORITHMS.md's (m, s, t) in a form that survives peaked
distributions: r = s − 1 (the maximum's own 1 kept apart) and t = Σ e^{z−m}·(z − m) rather than
Σ e^{z−m}·z. Then lse = m + log1p(r) and entropy = log1p(r) − t/s carry no cancellation: with
softcap 30 at temperature 0.7, |z| reaches 43, where lse − Σ p·z would lose ~1e-5 absolute, and
an entropy of 1e-6 would come out as rounding noise.

lse and Σ p·z are saved in float64, because backward forms z − lse and z − Σ p·z, which nearly
cancel for a dominant token: with |z| ≈ 130 one float32 rounding of either is an absolute error
of ~4e-6 in every probability of the row. The merge builds them from exact pieces (m is one of the
float32 logits; log1p(r) and t/s are small and carry float32 relative precision) with a single
float64 addition each. Backward splits each per row into a float32 pair hi + lo and forms
(z − hi) − lo, so that the per-logit arithmetic stays float32: z − hi is exact (Sterbenz) where it
matters, when z is within a factor of 2 of hi.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch
import triton
import triton.language as tl

__all__ = ["linear_logprobs_forward", "linear_logprobs_backward"]

# Set once, when this module is imported (Triton itself reads the variable at decoration time).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Vocabulary splits of the forward are multiples of this, hence of every BLOCK_V a config may use.
_SPLIT_GRANULE = 256


def _autotune_enabled() -> bool:
    return os.environ.get("FASTALIGN_AUTOTUNE", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Shared device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_IN_FP32: tl.constexpr):
    # float32 inputs: exact IEEE products, as the float32 reference (the GPU default is TF32).
    # bfloat16 under the interpreter: tl.dot returns garbage there, so both operands are widened;
    # products of bfloat16 values are exact in float32, so this emulates the GPU's bf16 MMA.
    if DOT_IN_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _raw_logits(
    h_ptr, w_ptr, b_ptr,            # pointers: hidden [N, H], weight [V, H], bias [V]
    offs_n, offs_v, n_mask, v_mask,  # the tile's rows (tokens) and columns (vocabulary)
    H, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_H: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """a = h·Wᵀ + b for one [BLOCK_N, BLOCK_V] tile, accumulated in float32 over H chunks."""
    offs_k = tl.arange(0, BLOCK_H)
    # int64 row offsets: V·H passes 2^31 for the largest heads (128k × 16k).
    h_ptrs = h_ptr + offs_n[:, None].to(tl.int64) * stride_hn + offs_k[None, :]
    wt_ptrs = w_ptr + offs_v[None, :].to(tl.int64) * stride_wv + offs_k[:, None]  # Wᵀ tile [H, V]
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        if EVEN_H:
            h = tl.load(h_ptrs, mask=n_mask[:, None], other=0.0)
            wt = tl.load(wt_ptrs, mask=v_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + offs_k) < H
            h = tl.load(h_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(wt_ptrs, mask=k_mask[:, None] & v_mask[None, :], other=0.0)
        acc = _dot(h, wt, acc, DOT_IN_FP32)
        h_ptrs += BLOCK_H
        wt_ptrs += BLOCK_H
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _tanh_sech2(x):
    """tanh(x) and 1 − tanh²(x), through u = e^{−2|x|} ∈ (0, 1].

    tl has no tanh in every Triton version, and (e^{2x} − 1)/(e^{2x} + 1) overflows for x > 44.
    With u the ratio never overflows, and 1 − tanh² = 4u/(1 + u)² has no cancellation (1 − t·t
    would round to 0 long before the true value does). Below |x| = 0.25, 1 − u loses bits, so an
    odd Taylor polynomial (truncation error < 1e-8 relative there) takes over.
    """
    ax = tl.abs(x)
    u = tl.exp(-2.0 * ax)
    big = (1.0 - u) / (1.0 + u)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0
                                                                     + x2 * (62.0 / 2835.0)))))
    th = tl.where(ax < 0.25, small, big)
    th = tl.where(x < 0, -th, th)
    one_plus_u = 1.0 + u
    return th, 4.0 * u / (one_plus_u * one_plus_u)


@triton.jit
def _merge_stats(m1, r1, t1, m2, r2, t2):
    """Merge the softmax statistics of two disjoint sets of logits.

    Each set is (m, r, t): m = max z, r = Σ e^{z−m} − 1 (s − 1, kept apart from the 1 that the
    maximum contributes, so that log s = log1p(r) is exact for peaked distributions) and
    t = Σ e^{z−m}·(z − m). With m the larger max and α = e^{m_lo − m}, the lower set rescales as
    s_lo → α·s_lo and t_lo → α·(t_lo + s_lo·(m_lo − m)). An empty set is (−inf, −1, 0).
    """
    first_is_max = m1 >= m2
    m = tl.maximum(m1, m2)
    shift = tl.minimum(m1, m2) - m                  # ≤ 0; −inf against an empty set
    alpha = tl.exp(shift)
    shift = tl.where(alpha > 0.0, shift, 0.0)       # an empty set: α·s·shift is 0 · 0 · (−inf)
    r_hi = tl.where(first_is_max, r1, r2)
    t_hi = tl.where(first_is_max, t1, t2)
    s_lo = 1.0 + tl.where(first_is_max, r2, r1)
    t_lo = tl.where(first_is_max, t2, t1)
    return m, r_hi + alpha * s_lo, t_hi + alpha * (t_lo + s_lo * shift)


@triton.jit
def _tile_stats(z):
    """Per-row statistics of one logit tile [BLOCK_N, BLOCK_V] with at least one finite column:
    m = max z, z − m, e = e^{z−m}, and r = Σ e^{z−m} − 1 (see _merge_stats)."""
    m = tl.max(z, axis=1)
    z_rel = z - m[:, None]
    e = tl.exp(z_rel)
    # Compare z itself, not z_rel: fp fusion may compute z_rel with an FMA from the unrounded
    # product, while the max is always one of the z values.
    is_max = z == m[:, None]
    # r = Σ e^{z−m} − 1 without the cancellation: the maxima contribute exactly 1 each.
    r = tl.sum(tl.where(is_max, 0.0, e), axis=1) + (tl.sum(is_max.to(tl.float32), axis=1) - 1.0)
    return m, z_rel, e, r


@triton.jit
def _log1p(r):
    """log(1 + r) for r ≥ 0, accurate to float32 rounding as r → 0, where log s of a peaked
    distribution lives. tl has no log1p, and log(1 + r) would lose r's digits in the rounding of
    1 + r (and in the absolute error of a fast log near 1). Below 0.1 the Taylor series, whose
    truncation after r⁸ is < r⁹/9 ≤ 2e-9 relative; above it log(1 + r) ≥ 0.095 is well conditioned.
    """
    series = r * (1.0 + r * (-1.0 / 2.0 + r * (1.0 / 3.0 + r * (-1.0 / 4.0 + r * (
        1.0 / 5.0 + r * (-1.0 / 6.0 + r * (1.0 / 7.0 + r * (-1.0 / 8.0))))))))
    return tl.where(r < 0.1, series, tl.log(1.0 + r))


@triton.jit
def _split_f64(ptr, mask, other: tl.constexpr):
    """Load float64 values x as a float32 pair: hi = x rounded, lo = (x − hi) rounded.

    x − hi is exact in float64, and lo keeps its leading 24 bits, so hi + lo carries x to ~2⁻⁴⁸
    relative. Masked lanes get (other, 0) without touching float64 infinities (inf − inf = nan).
    """
    x = tl.load(ptr, mask=mask, other=0.0)
    hi = x.to(tl.float32)
    lo = (x - hi.to(tl.float64)).to(tl.float32)
    return tl.where(mask, hi, other), tl.where(mask, lo, 0.0)


@triton.jit
def _accumulate_head_grads(
    da,                                # ∂L/∂a, float32 [BLOCK_N, BLOCK_V], 0 outside the tile
    h_ptr, w_ptr,                      # hidden [N, H], weight [V, H]
    dh_ptr, dw_ptr, db_ptr,            # float32 accumulators [N, H], [V, H], [V] (compact)
    offs_n, offs_v, n_mask, row_mask, v_mask,  # row_mask: the rows that receive dh
    H, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    EVEN_H: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """dh += da·W[tile], dW[tile] += daᵀ·h and db[tile] += Σ_n da, with float32 atomics."""
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(da, axis=0), mask=v_mask, sem="relaxed")
    # The matmuls below take ∂L/∂a in the input dtype (bf16 MMA on GPU), accumulating in fp32.
    da_op = da.to(h_ptr.dtype.element_ty)
    offs_k = tl.arange(0, BLOCK_H)
    rows_n = offs_n[:, None].to(tl.int64)
    rows_v = offs_v[:, None].to(tl.int64)
    if COMPUTE_DH:  # dh[n, :] += Σ_v da[n, v]·W[v, :]
        w_ptrs = w_ptr + rows_v * stride_wv + offs_k[None, :]
        dh_ptrs = dh_ptr + rows_n * H + offs_k[None, :]
        for k0 in range(0, H, BLOCK_H):
            # Masks constant along H when H is even, so that loads and atomics vectorise.
            if EVEN_H:
                w_mask = v_mask[:, None]
                dh_mask = row_mask[:, None]
            else:
                k_mask = (k0 + offs_k) < H
                w_mask = v_mask[:, None] & k_mask[None, :]
                dh_mask = row_mask[:, None] & k_mask[None, :]
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            dh = _dot(da_op, w, tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32), DOT_IN_FP32)
            tl.atomic_add(dh_ptrs, dh, mask=dh_mask, sem="relaxed")
            w_ptrs += BLOCK_H
            dh_ptrs += BLOCK_H
    if COMPUTE_DW:  # dW[v, :] += Σ_n da[n, v]·h[n, :]
        da_t = tl.trans(da_op)
        h_ptrs = h_ptr + rows_n * stride_hn + offs_k[None, :]
        dw_ptrs = dw_ptr + rows_v * H + offs_k[None, :]
        for k0 in range(0, H, BLOCK_H):
            # Only rows with a gradient: an ignored row's hidden state (NaN in padding, say)
            # must not enter dW as 0·NaN.
            if EVEN_H:
                h_mask = row_mask[:, None]
                dw_mask = v_mask[:, None]
            else:
                k_mask = (k0 + offs_k) < H
                h_mask = row_mask[:, None] & k_mask[None, :]
                dw_mask = v_mask[:, None] & k_mask[None, :]
            h = tl.load(h_ptrs, mask=h_mask, other=0.0)
            dw = _dot(da_t, h, tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32), DOT_IN_FP32)
            tl.atomic_add(dw_ptrs, dw, mask=dw_mask, sem="relaxed")
            h_ptrs += BLOCK_H
            dw_ptrs += BLOCK_H


@triton.jit
def _grouped_tile(pid, N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  GROUP_V: tl.constexpr):
    """(token tile, vocabulary tile) of program ``pid`` of a (token × vocabulary)-tile grid.

    Grouped order (Triton tutorial 03): GROUP_V vocabulary tiles sweep all token tiles together,
    so the programs in flight share a few W tiles and a band of h in L2.
    """
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_v_tiles = tl.cdiv(V, BLOCK_V)
    programs_per_group = GROUP_V * num_n_tiles
    first_v_tile = (pid // programs_per_group) * GROUP_V
    group_size = tl.minimum(num_v_tiles - first_v_tile, GROUP_V)
    pid_v = first_v_tile + (pid % programs_per_group) % group_size
    pid_n = (pid % programs_per_group) // group_size
    return pid_n, pid_v


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.heuristics({
    "HAS_BIAS": lambda args: args["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] > 0.0,
    "EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0,
    "EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0,
    "DOT_IN_FP32": lambda args: args["h_ptr"].dtype == torch.float32
    or (_INTERPRET and args["h_ptr"].dtype == torch.bfloat16),
})
@triton.jit
def _forward_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, targets_ptr,  # hidden [N, H], weight [V, H], bias [V] or None, targets [N]
    part_ptr,                          # float32 [4, NUM_SPLITS, N]: m, r, t, target logit per split
    # shapes
    N, V, H, V_PER_SPLIT, N_BUCKET,    # N_BUCKET (N rounded to a power of 2) only keys autotuning
    # strides (the last dimension of hidden and weight is contiguous)
    stride_hn, stride_wv,
    # scalars
    inv_temperature, softcap, ignore_index,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_H: tl.constexpr, EVEN_V: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # Token tiles vary fastest, so programs running together read the same slice of W (from L2).
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n_tiles
    pid_split = pid // num_n_tiles
    num_splits = tl.num_programs(0) // num_n_tiles

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    targets = tl.load(targets_ptr + offs_n, mask=n_mask, other=ignore_index)
    valid = n_mask & (targets != ignore_index)

    # Running statistics of the tokens' logits seen so far (see _merge_stats); "nothing yet" is
    # m = −inf, r = −1 (s = 0), t = 0.
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    r = tl.full([BLOCK_N], -1.0, dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_target = tl.zeros([BLOCK_N], dtype=tl.float32)
    # A tile of ignored tokens only (prompts, padding) needs no logits at all.
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        v_begin = pid_split * V_PER_SPLIT
        v_end = tl.minimum(v_begin + V_PER_SPLIT, V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < V
            z = _raw_logits(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask,
                            H, stride_hn, stride_wv, BLOCK_N, BLOCK_V, BLOCK_H,
                            HAS_BIAS, EVEN_H, DOT_IN_FP32)
            if HAS_SOFTCAP:
                th, _ = _tanh_sech2(z * (1.0 / softcap))
                z = th * (softcap * inv_temperature)
            else:
                z = z * inv_temperature
            if not EVEN_V:  # padding columns are −inf (e^{z−m} = 0), never 0
                z = tl.where(v_mask[None, :], z, float("-inf"))
            z_target += tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), axis=1)

            # The tile's own statistics (every tile has a real column, so m_tile is finite).
            m_tile, z_rel, e, r_tile = _tile_stats(z)
            if EVEN_V:
                t_tile = tl.sum(e * z_rel, axis=1)
            else:
                t_tile = tl.sum(e * tl.where(v_mask[None, :], z_rel, 0.0), axis=1)  # not 0·(−inf)
            m, r, t = _merge_stats(m, r, t, m_tile, r_tile, t_tile)

    # Skipped tiles keep "nothing yet": store (m, r, t) = (0, 0, 0), one finite placeholder, so
    # that the merge stays finite for them (their outputs are zeroed there anyway).
    empty = r < 0.0
    m = tl.where(empty, 0.0, m)
    r = tl.where(empty, 0.0, r)
    out = part_ptr + pid_split * N + offs_n
    split_stride = num_splits * N
    tl.store(out, m, mask=n_mask)
    tl.store(out + split_stride, r, mask=n_mask)
    tl.store(out + 2 * split_stride, t, mask=n_mask)
    tl.store(out + 3 * split_stride, z_target, mask=n_mask)


@triton.jit
def _forward_merge_kernel(
    # pointers
    part_ptr, targets_ptr,                           # partials [4, NUM_SPLITS, N], targets [N]
    logp_ptr, entropy_ptr,                           # outputs, float32 [N]
    lse_ptr, sum_pz_ptr,                             # outputs, float64 [N]
    # shapes
    N, NUM_SPLITS,
    # scalars
    ignore_index,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    r = tl.full([BLOCK], -1.0, dtype=tl.float32)
    t = tl.zeros([BLOCK], dtype=tl.float32)
    z_target = tl.zeros([BLOCK], dtype=tl.float32)
    split_stride = NUM_SPLITS * N
    for i in range(0, NUM_SPLITS):
        ptr = part_ptr + i * N + offs
        m_i = tl.load(ptr, mask=mask, other=0.0)
        r_i = tl.load(ptr + split_stride, mask=mask, other=0.0)
        t_i = tl.load(ptr + 2 * split_stride, mask=mask, other=0.0)
        z_target += tl.load(ptr + 3 * split_stride, mask=mask, other=0.0)  # one split holds y
        m, r, t = _merge_stats(m, r, t, m_i, r_i, t_i)

    log_s = _log1p(r)
    mean_rel = t / (1.0 + r)                          # Σ p·(z − m)
    targets = tl.load(targets_ptr + offs, mask=mask, other=ignore_index)
    valid = targets != ignore_index
    # z_y − lse = (z_y − m) − log s: exact near 0. It can still round a hair above 0 when one
    # logit dominates; a log-probability cannot.
    # propagate_nan: a NaN input must give NaN, not log-prob 0 (minimum would drop the NaN).
    logp = tl.where(valid, tl.minimum((z_target - m) - log_s, 0.0,
                                      propagate_nan=tl.PropagateNan.ALL), 0.0)
    entropy = tl.where(valid, log_s - mean_rel, 0.0)
    tl.store(logp_ptr + offs, logp, mask=mask)
    tl.store(entropy_ptr + offs, entropy, mask=mask)
    # m + log s and m + Σ p·(z − m) in float64: m is exact, the other terms are small, so the
    # sums carry (almost) all of their digits; rounded to float32, backward's z − lse would not.
    m64 = m.to(tl.float64)
    tl.store(lse_ptr + offs, m64 + log_s.to(tl.float64), mask=mask)
    tl.store(sum_pz_ptr + offs, m64 + mean_rel.to(tl.float64), mask=mask)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.heuristics({
    "HAS_BIAS": lambda args: args["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] > 0.0,
    "HAS_GRAD_ENTROPY": lambda args: args["grad_entropy_ptr"] is not None,
    "COMPUTE_DH": lambda args: args["dh_ptr"] is not None,
    "COMPUTE_DW": lambda args: args["dw_ptr"] is not None,
    "COMPUTE_DB": lambda args: args["db_ptr"] is not None,
    "EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0,
    "EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0,
    "DOT_IN_FP32": lambda args: args["h_ptr"].dtype == torch.float32
    or (_INTERPRET and args["h_ptr"].dtype == torch.bfloat16),
})
@triton.jit
def _backward_kernel(
    # pointers: inputs
    h_ptr, w_ptr, b_ptr, targets_ptr,  # hidden [N, H], weight [V, H], bias [V] or None, targets [N]
    lse_ptr, sum_pz_ptr,               # saved by forward, float64 [N]
    grad_logp_ptr, grad_entropy_ptr,   # upstream gradients, float32 [N] (entropy's may be None)
    # pointers: outputs, float32 accumulators zeroed by the launcher (None when not requested)
    dh_ptr, dw_ptr, db_ptr,            # [N, H], [V, H], [V]
    # shapes
    N, V, H, N_BUCKET,                 # N_BUCKET only keys autotuning
    # strides (the last dimension of every [*, H] tensor is contiguous; dh and dW are compact)
    stride_hn, stride_wv,
    # scalars
    inv_temperature, softcap, ignore_index,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_V: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    EVEN_H: tl.constexpr, EVEN_V: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    pid_n, pid_v = _grouped_tile(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP_V)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    n_mask = offs_n < N
    v_mask = offs_v < V
    targets = tl.load(targets_ptr + offs_n, mask=n_mask, other=ignore_index)
    valid = n_mask & (targets != ignore_index)
    # Ignored tokens get no gradient: a tile of them only is skipped outright.
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        a = _raw_logits(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask,
                        H, stride_hn, stride_wv, BLOCK_N, BLOCK_V, BLOCK_H,
                        HAS_BIAS, EVEN_H, DOT_IN_FP32)
        if HAS_SOFTCAP:
            th, sech2 = _tanh_sech2(a * (1.0 / softcap))
            z = th * (softcap * inv_temperature)
        else:
            z = a * inv_temperature
        # lse as a float32 pair hi + lo, and p = e^{(z − hi) − lo}: z − hi is exact when z is
        # near hi (a dominant token), where one rounding of lse to float32 would cost up to
        # ulp(|z|)/2 absolute in p. hi = +inf on ignored rows gives them p = 0 (their saved lse
        # may be a placeholder).
        lse_hi, lse_lo = _split_f64(lse_ptr + offs_n, valid, float("inf"))
        g = tl.load(grad_logp_ptr + offs_n, mask=valid, other=0.0)
        p = tl.exp((z - lse_hi[:, None]) - lse_lo[:, None])
        # ∂logp/∂z_v = 1[v = y] − p_v;   ∂ent/∂z_v = −p_v·(z_v − Σ_u p_u z_u).
        dz = g[:, None] * (tl.where(offs_v[None, :] == targets[:, None], 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            e = tl.load(grad_entropy_ptr + offs_n, mask=valid, other=0.0)
            # z − Σ p·z cancels for a dominant token too: the same hi + lo split.
            spz_hi, spz_lo = _split_f64(sum_pz_ptr + offs_n, valid, 0.0)
            dz -= e[:, None] * p * ((z - spz_hi[:, None]) - spz_lo[:, None])
        # ∂z/∂a = (1/T)·(1 − tanh²(a/c)), or 1/T without softcap. Padding columns (v ≥ V) have
        # a = 0, so p = e^{−lse} ≠ 0 there: they are masked out here.
        if HAS_SOFTCAP:
            da = dz * (sech2 * inv_temperature)
        else:
            da = dz * inv_temperature
        if EVEN_V:
            da = tl.where(valid[:, None], da, 0.0)
        else:
            da = tl.where(valid[:, None] & v_mask[None, :], da, 0.0)

        _accumulate_head_grads(da, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr,
                               offs_n, offs_v, n_mask, valid, v_mask, H, stride_hn, stride_wv,
                               BLOCK_N, BLOCK_V, BLOCK_H, COMPUTE_DH, COMPUTE_DW, COMPUTE_DB,
                               EVEN_H, DOT_IN_FP32)


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------


def _pinned_config(kind: str, dtype: torch.dtype, n_tokens: int,
                   block_v_16bit: int) -> triton.Config:
    """The pinned config of a logit-tile kernel: 16-bit inputs take [128, block_v_16bit] logit
    tiles, H in chunks of 64, 8 warps, a 3-stage pipeline; float32 runs exact IEEE dots (no
    tensor cores) on 64×64 tiles. Few tokens (decoding, tests) shrink BLOCK_N to what is there."""
    block_n = min(128 if dtype != torch.float32 else 64, max(16, triton.next_power_of_2(n_tokens)))
    if dtype == torch.float32:
        kwargs = dict(BLOCK_N=block_n, BLOCK_V=64, BLOCK_H=32)
        num_warps, num_stages = 4, 2
    else:
        kwargs = dict(BLOCK_N=block_n, BLOCK_V=block_v_16bit, BLOCK_H=64)
        num_warps, num_stages = 8, 3
    if kind == "backward":
        kwargs["GROUP_V"] = 8
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


def _default_config(kind: str, dtype: torch.dtype, n_tokens: int) -> triton.Config:
    """The pinned config (H100). Chosen for Hopper's shared memory and MMA shapes; not yet timed.

    16-bit inputs: 128×128 logit tiles ((128 + 128)·64·2 B = 32 KiB a pipeline stage).
    """
    return _pinned_config(kind, dtype, n_tokens, block_v_16bit=128)


def _config_space(kind: str, tiles) -> list[triton.Config]:
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


def _autotune_configs(kind: str) -> list[triton.Config]:
    """The search space of FASTALIGN_AUTOTUNE=1, keyed on (N_BUCKET, V, H) and the dtypes."""
    return _config_space(kind, ((64, 128), (128, 128), (128, 256), (256, 128), (64, 256),
                                (32, 128), (16, 256)))


def _prune_configs(configs, named_args, **kwargs):
    """Drop token tiles far larger than the batch (and bench fp32 only on its small tiles)."""
    n_bucket = named_args["N_BUCKET"]
    is_fp32 = named_args["h_ptr"].dtype == torch.float32
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max(n_bucket, 16)
            and not (is_fp32 and c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"] > 128 * 128)]
    return kept or configs[:1]


def _zero_grad_buffers(nargs, reset_only=False):
    # Autotuning runs the backward once per config; its atomics must start from zero every time.
    # (A hook of our own rather than reset_to_zero: older Triton versions do not skip None.)
    # Every gradient buffer any of the logit-tile kernels has (linear_kl adds the reference's).
    for name in ("dh_ptr", "dw_ptr", "db_ptr", "ref_dh_ptr", "ref_dw_ptr", "ref_db_ptr"):
        if nargs.get(name) is not None:
            nargs[name].zero_()


def _wall_clock_bench(kernel_call, quantiles=None):
    # The interpreter has no GPU driver for Triton's benchmarker; time one call on the host so
    # that FASTALIGN_AUTOTUNE=1 still runs (and is tested) there. The numbers mean nothing.
    kernel_call()
    start = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - start) * 1e3
    return [ms] * len(quantiles) if quantiles is not None else ms


def _autotuned(kernel, kind: str, configs: list[triton.Config], key: list[str]):
    """``kernel`` under FASTALIGN_AUTOTUNE=1: pruned configs, zeroed gradient buffers before each
    backward trial, and a host timer under the interpreter."""
    hooks = {"pre_hook": _zero_grad_buffers} if kind == "backward" else {}
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": _prune_configs},
        do_bench=_wall_clock_bench if _INTERPRET else None, **hooks,
    )(kernel)


_AUTOTUNE_KEY = ["N_BUCKET", "V", "H"]  # plus the dtypes of the tensor arguments, always
_forward_kernel_tuned = _autotuned(_forward_kernel, "forward", _autotune_configs("forward"),
                                   _AUTOTUNE_KEY)
_backward_kernel_tuned = _autotuned(_backward_kernel, "backward", _autotune_configs("backward"),
                                    _AUTOTUNE_KEY)


def _launch(kind: str, kernel, tuned_kernel, grid, args: tuple, dtype: torch.dtype, n_tokens: int,
            default_config=_default_config):
    if _autotune_enabled():
        tuned_kernel[grid](*args)
    else:
        config = default_config(kind, dtype, n_tokens)
        kernel[grid(config.kwargs)](*args, **config.kwargs, num_warps=config.num_warps,
                                    num_stages=config.num_stages)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, so that tests exercise several vocabulary splits


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_head(hidden, weight, bias, names=("hidden", "weight", "bias")) -> None:
    """hidden [N, H], weight [V, H] and bias [V] | None: contiguous, one supported dtype."""
    h_name, w_name, b_name = names
    for name, x in ((h_name, hidden), (w_name, weight)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{h_name} ({hidden.dtype}) and {w_name} ({weight.dtype}) dtypes differ")
    hidden_size = hidden.shape[1]
    vocab_size = weight.shape[0]
    if weight.shape[1] != hidden_size:
        raise ValueError(f"{w_name} must be [V, {hidden_size}], got {tuple(weight.shape)}")
    if vocab_size < 1 or hidden_size < 1:
        raise ValueError(f"need V >= 1 and H >= 1, got V={vocab_size}, H={hidden_size} "
                         f"({w_name} {tuple(weight.shape)})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{b_name} must be a tensor or None, got {type(bias).__name__}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{b_name} must have {w_name}'s dtype {weight.dtype}, "
                            f"got {bias.dtype}")
        if bias.shape != (vocab_size,) or not bias.is_contiguous():
            raise ValueError(f"{b_name} must be contiguous [{vocab_size}], "
                             f"got {tuple(bias.shape)}")


def _check_inputs(hidden, weight, bias, targets) -> None:
    _check_head(hidden, weight, bias)
    n_tokens = hidden.shape[0]
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64, got {targets.dtype}")
    if targets.shape != (n_tokens,) or not targets.is_contiguous():
        raise ValueError(f"targets must be contiguous [{n_tokens}], got {tuple(targets.shape)}")
    devices = {hidden.device, weight.device, targets.device}
    if bias is not None:
        devices.add(bias.device)
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_per_token(name: str, x: torch.Tensor, dtype: torch.dtype, why: str, n_tokens: int,
                     device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a {dtype} tensor ({why}), got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} ({why}), got {x.dtype}")
    if x.shape != (n_tokens,) or not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous [{n_tokens}], got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the inputs on {device}")


def _n_bucket(n_tokens: int) -> int:
    return max(16, triton.next_power_of_2(n_tokens))


def _vocab_splits(vocab_size: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(columns per split, number of splits) for a forward over ``n_tiles`` token tiles.

    Enough vocabulary splits for about two waves of programs, each split a whole number of
    granules (so every split holds at least one real column).
    """
    num_granules = triton.cdiv(vocab_size, _SPLIT_GRANULE)
    wanted = min(num_granules, max(1, triton.cdiv(2 * _num_sms(device), n_tiles)))
    v_per_split = triton.cdiv(num_granules, wanted) * _SPLIT_GRANULE
    return v_per_split, triton.cdiv(vocab_size, v_per_split)


def linear_logprobs_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    temperature: float, softcap: float, ignore_index: int, off_shard_targets: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse, Σ p·z), each [N], from hidden [N, H] and weight [V, H].

    logp and entropy are float32; lse and Σ p·z are float64, for the backward (module docstring).

    ``softcap`` 0.0 means none. Ignored tokens (target == ignore_index) get logp = entropy = 0;
    their lse and Σ p·z are unspecified (backward gives them no gradient).

    ``off_shard_targets``: ``weight`` is one shard of a vocabulary split across ranks, and a
    target ≥ V lies on another shard. Nothing changes in the kernels (no column of this shard
    matches such a target, so it contributes no target logit here); the flag only mirrors the C++
    kernel's, which otherwise rejects targets ≥ V.
    """
    _check_inputs(hidden, weight, bias, targets)
    n_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    device = hidden.device
    logp, entropy, lse, sum_pz = (
        torch.empty(n_tokens, dtype=dtype, device=device)
        for dtype in (torch.float32, torch.float32, torch.float64, torch.float64)
    )
    if n_tokens == 0:
        return logp, entropy, lse, sum_pz

    nominal_n_tiles = triton.cdiv(n_tokens, _default_config("forward", hidden.dtype,
                                                            n_tokens).kwargs["BLOCK_N"])
    v_per_split, num_splits = _vocab_splits(vocab_size, nominal_n_tiles, device)
    partials = torch.empty((4, num_splits, n_tokens), dtype=torch.float32, device=device)

    args = (hidden, weight, bias, targets, partials,
            n_tokens, vocab_size, hidden_size, v_per_split, _n_bucket(n_tokens),
            hidden.stride(0), weight.stride(0),
            1.0 / float(temperature), float(softcap), int(ignore_index))
    with _device_guard(device):
        _launch("forward", _forward_kernel, _forward_kernel_tuned,
                lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]) * num_splits,),
                args, hidden.dtype, n_tokens)
        merge_block = 1024
        _forward_merge_kernel[(triton.cdiv(n_tokens, merge_block),)](
            partials, targets, logp, entropy, lse, sum_pz,
            n_tokens, num_splits, int(ignore_index),
            BLOCK=merge_block, num_warps=4,
        )
    return logp, entropy, lse, sum_pz


def linear_logprobs_backward(
    grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    lse: torch.Tensor, sum_pz: torch.Tensor,
    temperature: float, softcap: float, ignore_index: int,
    compute_dhidden: bool, compute_dweight: bool, compute_dbias: bool,
    off_shard_targets: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dhidden, dweight, dbias) for upstream gradients of logp and (optionally) entropy.

    ``off_shard_targets`` as in forward; given the whole vocabulary's lse and Σ p·z, the result
    is the exact gradient of this shard's columns.

    Each requested gradient comes back in its input's dtype, accumulated in float32; the others
    are None and cost nothing.
    """
    _check_inputs(hidden, weight, bias, targets)
    n_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    device = hidden.device
    upstream = "upstream gradients reach the kernels in float32 for every input dtype"
    saved = ("as linear_logprobs_forward returns it; float32 loses the digits of z - {} "
             "for a dominant token")
    for name, x, dtype, why in (("grad_logp", grad_logp, torch.float32, upstream),
                                ("grad_entropy", grad_entropy, torch.float32, upstream),
                                ("lse", lse, torch.float64, saved.format("lse")),
                                ("sum_pz", sum_pz, torch.float64, saved.format("sum_pz"))):
        if x is not None or name != "grad_entropy":
            _check_per_token(name, x, dtype, why, n_tokens, device)
    compute_dbias = compute_dbias and bias is not None

    def buffer(wanted: bool, *shape: int) -> torch.Tensor | None:
        return torch.zeros(shape, dtype=torch.float32, device=device) if wanted else None

    dh = buffer(compute_dhidden, n_tokens, hidden_size)
    dw = buffer(compute_dweight, vocab_size, hidden_size)
    db = buffer(compute_dbias, vocab_size)
    if n_tokens > 0 and (dh is not None or dw is not None or db is not None):
        args = (hidden, weight, bias, targets, lse, sum_pz, grad_logp, grad_entropy,
                dh, dw, db,
                n_tokens, vocab_size, hidden_size, _n_bucket(n_tokens),
                hidden.stride(0), weight.stride(0),
                1.0 / float(temperature), float(softcap), int(ignore_index))
        with _device_guard(device):
            _launch("backward", _backward_kernel, _backward_kernel_tuned,
                    lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"])
                                  * triton.cdiv(vocab_size, meta["BLOCK_V"]),),
                    args, hidden.dtype, n_tokens)
    return (
        None if dh is None else dh.to(hidden.dtype),
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )
