"""Triton device functions shared by the logit-tile kernels (``linear_logprobs``, ``linear_kl``)
and the row kernels (``linear_nll``, ``sequence_rows``).

Each op's kernels live in their own module; what both ops compute the same way lives here, once:
the logit tile of one LM head (``raw_logits``, ``scaled_logits``), a row kernel's row of logits
already in memory (``program_row``, ``scaled_row``), the running softmax statistics
(``tile_stats``, ``merge_stats``, ``log1p``) and the log-prob and entropy made from them
(``logp_and_entropy``), the float64 → float32-pair split of saved statistics (``split_f64``),
the head gradients (``accumulate_head_grads``) and the order of the tiles in the grids
(``split_tile`` forward, ``grouped_tile`` backward). The derivations behind the
statistics are in the docstring of ``linear_logprobs`` and ``docs/ALGORITHMS.md`` §1.

Pure ``@triton.jit`` functions: no launch logic, no configs (those are in ``_launch``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_dot(a, b, acc, DOT_IN_FP32: tl.constexpr):
    # float32 inputs: exact IEEE products, as the float32 reference (the GPU default is TF32).
    # bfloat16 under the interpreter: tl.dot returns garbage there, so both operands are widened;
    # products of bfloat16 values are exact in float32, so this emulates the GPU's bf16 MMA.
    if DOT_IN_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def raw_logits(
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
        acc = tile_dot(h, wt, acc, DOT_IN_FP32)
        h_ptrs += BLOCK_H
        wt_ptrs += BLOCK_H
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def scaled_logits(
    h_ptr, w_ptr, b_ptr,              # pointers: hidden [N, H], weight [V, H], bias [V] or None
    offs_n, offs_v, n_mask, v_mask,   # the tile's rows (tokens) and columns (vocabulary)
    H, stride_hn, stride_wv,
    inv_temperature, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_H: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """z = c·tanh(a/c)/T (or a/T) for one tile of one head, and ∂z/∂a.

    Forward and backward both go through here, so that backward recomputes the very bits of z
    that forward saw (identical heads must give p = q exactly).
    """
    a = raw_logits(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask,
                   H, stride_hn, stride_wv, BLOCK_N, BLOCK_V, BLOCK_H,
                   HAS_BIAS, EVEN_H, DOT_IN_FP32)
    return logit_transform(a, inv_temperature, softcap, HAS_SOFTCAP)


@triton.jit
def program_row(logits_ptr, stride_ln, targets_ptr):
    """The row of a row kernel's program (one program a row of a logit tile): its index, the
    pointer to its logits (an int64 offset: n·stride passes 2^31 on large tiles) and its target."""
    row = tl.program_id(0)
    return row, logits_ptr + row.to(tl.int64) * stride_ln, tl.load(targets_ptr + row)


@triton.jit
def scaled_row(row_ptr, b_ptr, v0, offs, V, inv_temperature, softcap,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_V: tl.constexpr):
    """z = c·tanh((a + b)/c)/T (or (a + b)/T) of one column tile [v0, v0 + len(offs)) of a row
    of raw logits a (the row kernels of ``linear_nll`` and ``sequence_rows``), and ∂z/∂a; −inf
    past V."""
    cols = v0 + offs
    mask = cols < V
    a = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    z, dz_da = logit_transform(a, inv_temperature, softcap, HAS_SOFTCAP)
    if not EVEN_V:
        z = tl.where(mask, z, float("-inf"))
    return z, dz_da


@triton.jit
def logit_transform(a, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = c·tanh(a/c)/T (or a/T) of raw logits a, elementwise, and ∂z/∂a (a scalar without
    softcap)."""
    if HAS_SOFTCAP:
        th, sech2 = tanh_sech2(a * (1.0 / softcap))
        z = th * (softcap * inv_temperature)
        dz_da = sech2 * inv_temperature
    else:
        z = a * inv_temperature
        dz_da = inv_temperature
    return z, dz_da


@triton.jit
def tanh_sech2(x):
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
def empty_stats(BLOCK: tl.constexpr):
    """Running statistics (m, r, t) of a block of tokens that has seen no logit yet: m = −inf,
    r = −1 (s = 0), t = 0 (see merge_stats)."""
    return (tl.full([BLOCK], float("-inf"), dtype=tl.float32),
            tl.full([BLOCK], -1.0, dtype=tl.float32),
            tl.zeros([BLOCK], dtype=tl.float32))


@triton.jit
def split_range(pid_split, V_PER_SPLIT, V):
    """The vocabulary columns [v_begin, v_end) that split ``pid_split`` streams."""
    v_begin = pid_split * V_PER_SPLIT
    return v_begin, tl.minimum(v_begin + V_PER_SPLIT, V)


@triton.jit
def merge_stats(m1, r1, t1, m2, r2, t2):
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
def tile_stats(z):
    """Per-row statistics of one logit tile [BLOCK_N, BLOCK_V] with at least one finite column:
    m = max z, z − m, e = e^{z−m}, and r = Σ e^{z−m} − 1 (see merge_stats)."""
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
def logp_and_entropy(m, r, t, z_target, valid):
    """Per row, from the merged statistics (m, r, t) (see merge_stats) and the target logit:
    (logp, entropy), 0 where not ``valid``, and log s and Σ p·(z − m), from which the caller
    builds lse = m + log s and Σ p·z in float64."""
    log_s = log1p(r)
    mean_rel = t / (1.0 + r)                          # Σ p·(z − m)
    # z_y − lse = (z_y − m) − log s: exact near 0. It can still round a hair above 0 when one
    # logit dominates; a log-probability cannot.
    # propagate_nan: a NaN input must give NaN, not log-prob 0 (minimum would drop the NaN).
    logp = tl.where(valid, tl.minimum((z_target - m) - log_s, 0.0,
                                      propagate_nan=tl.PropagateNan.ALL), 0.0)
    entropy = tl.where(valid, log_s - mean_rel, 0.0)
    return logp, entropy, log_s, mean_rel


@triton.jit
def log1p(r):
    """log(1 + r) for r ≥ 0, accurate to float32 rounding as r → 0, where log s of a peaked
    distribution lives. tl has no log1p, and log(1 + r) would lose r's digits in the rounding of
    1 + r (and in the absolute error of a fast log near 1). Below 0.1 the Taylor series, whose
    truncation after r⁸ is < r⁹/9 ≤ 2e-9 relative; above it log(1 + r) ≥ 0.095 is well conditioned.
    """
    series = r * (1.0 + r * (-1.0 / 2.0 + r * (1.0 / 3.0 + r * (-1.0 / 4.0 + r * (
        1.0 / 5.0 + r * (-1.0 / 6.0 + r * (1.0 / 7.0 + r * (-1.0 / 8.0))))))))
    return tl.where(r < 0.1, series, tl.log(1.0 + r))


@triton.jit
def split_f64(ptr, mask, other: tl.constexpr):
    """Load float64 values x as a float32 pair: hi = x rounded, lo = (x − hi) rounded.

    x − hi is exact in float64, and lo keeps its leading 24 bits, so hi + lo carries x to ~2⁻⁴⁸
    relative. Masked lanes get (other, 0) without touching float64 infinities (inf − inf = nan).
    """
    x = tl.load(ptr, mask=mask, other=0.0)
    hi = x.to(tl.float32)
    lo = (x - hi.to(tl.float64)).to(tl.float32)
    return tl.where(mask, hi, other), tl.where(mask, lo, 0.0)


@triton.jit
def accumulate_head_grads(
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
            dh = tile_dot(da_op, w, tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32), DOT_IN_FP32)
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
            dw = tile_dot(da_t, h, tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32), DOT_IN_FP32)
            tl.atomic_add(dw_ptrs, dw, mask=dw_mask, sem="relaxed")
            h_ptrs += BLOCK_H
            dw_ptrs += BLOCK_H


@triton.jit
def store_tile(ptr, tile, offs_n, offs_v, n_mask, v_mask, stride_n, EVEN_V: tl.constexpr):
    """Store a float32 [BLOCK_N, BLOCK_V] tile into rows offs_n, columns offs_v of a row-major
    [N, V] tensor (row stride ``stride_n``), in that tensor's dtype."""
    ptrs = ptr + offs_n[:, None].to(tl.int64) * stride_n + offs_v[None, :]
    if EVEN_V:
        mask = n_mask[:, None]
    else:
        mask = n_mask[:, None] & v_mask[None, :]
    tl.store(ptrs, tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_tile(pid, N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
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


@triton.jit
def split_tile(N, BLOCK_N: tl.constexpr):
    """(token tile, vocabulary split, number of splits) of this program of a forward grid of
    (token tiles × vocabulary splits).

    Token tiles vary fastest, so the programs running together read the same slice of W (of
    each head) from L2.
    """
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n_tiles
    pid_split = pid // num_n_tiles
    num_splits = tl.num_programs(0) // num_n_tiles
    return pid_n, pid_split, num_splits
