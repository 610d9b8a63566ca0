"""Triton kernels for ``linear_kl``: the exact per-token KL between two LM heads.

Math in ``docs/ALGORITHMS.md`` §2. The policy logits z come from (hidden [N, H], weight [V, H],
bias), the reference logits z' from (ref_hidden [N, H'], ref_weight [V, H'], ref_bias), both as
z = s(h·Wᵀ + b)/T with s the optional softcap c·tanh(·/c); p = softmax(z), q = softmax(z'). The
kernels compute KL(p‖q) per token (the caller swaps the two heads for KL(q‖p)):

    KL = Σ_v p_v (z_v − z'_v) − lse(z) + lse(z')

Nothing here holds an [N, V] tensor: each logit tile exists only in registers. The building blocks
(logit tiles, softcap, tile statistics, head gradients, float64 splits) are shared with
``linear_logprobs`` in ``_tile``, the configs and launch helpers in ``_launch``; this file holds
what is specific to two heads.

Forward (2·N·V·(H + H') FLOPs), two launches, as in ``linear_logprobs``:
  1. ``_forward_kernel``, grid (token tiles × vocabulary splits). Each program streams the
     vocabulary tiles of its split, computes the tiles z and z' (one H-loop of ``tl.dot`` per
     head) and merges them into running statistics per token: (m', r') for the reference and
     (m, r, y, t) for the policy, where m is the max, r = Σ e^{z−m} − 1 (the maximum's own 1 kept
     apart, so that log s = log1p(r) is exact for peaked rows), y is z' at the maximum of z and
     t = Σ e^{z−m}·((z − m) − (z' − y)): Σ p·(z − z') = (m − y) + t/s, with its large part held
     exactly by the anchors (m, y) and t/s small for a peaked p (see _merge_kl_stats).
  2. ``_forward_merge_kernel`` merges the splits and writes, per token, in float64:
        lse  = m + log1p(r),   lse' = m' + log1p(r'),
        KL   = t/(1 + r) + (m' − y) + (log1p(r') − log1p(r)),   clamped at 0 (rounding).
     The terms are float32 and summed in float64, where m' − y (two float32 logits) is exact:
     identical heads and V = 1 give exactly 0 (t = 0, m' = y, r = r'). The remaining error is
     that of the float32 statistics, about 1e-7·(|log s| + |log s'| + |t/s|) absolute.

Backward (2·N·V·(H + H') for the recompute, + 4·N·V·H for the policy gradients, + 4·N·V·H' for
the reference's): ``_backward_kernel``, grid (token tiles × vocabulary tiles). Each program
recomputes both logit tiles and, from the saved float64 KL, lse and lse' (split into float32
pairs hi + lo as in ``linear_logprobs``: z − lse nearly cancels for a dominant token),

    ∂L/∂z_v  = g·p_v·(x_v − c),  x = z − z',  c = Σ_u p_u·x_u = KL + lse − lse'
    ∂L/∂z'_v = g·(q_v − p_v)

(derivation next to the code; x − c is formed from float32 pairs), then
∂L/∂a = ∂L/∂z·(1/T)·(1 − tanh²(a/c)) per head and the head gradients dh, dW, db: by default
(chunked, as in ``linear_logprobs``) the kernel writes ∂L/∂a of each head per chunk of tokens and
matrix products make dh and dW; with ``FASTALIGN_TRITON_BACKWARD=atomic`` the kernel adds them
with float32 atomics. The work of a head whose gradients are not requested is compiled out (the
reference head normally has none); its logits are still needed for p or q.

With the policy's targets (HAS_TARGETS; PPO with the exact KL), the same pass also gives the
policy's log-prob of each target and its entropy, as ``linear_logprobs`` would: the forward adds
the target logit (gathered in its tile) and t_z = Σ e^{z−m}·(z − m) to the policy's statistics,
the merge writes logp = (z_y − m) − log s, entropy = log s − t_z/s and Σ p·z = m + t_z/s
(float64), and the backward adds the log-prob's and the entropy's terms to ∂L/∂z (derivation
next to the code): one stream over each head instead of two over the policy's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels import _launch
from fastalign.kernels._tile import (
    accumulate_head_grads,
    empty_stats,
    grouped_tile,
    log1p,
    logp_and_entropy,
    merge_stats,
    scaled_logits,
    split_f64,
    split_range,
    split_tile,
    store_tile,
    tile_stats,
)

__all__ = ["linear_kl_forward", "linear_kl_backward"]

# The backward's float32 gradient accumulators, by kernel argument name, of each head.
_GRAD_BUFFERS = ("dh_ptr", "dw_ptr", "db_ptr")
_REF_GRAD_BUFFERS = ("ref_dh_ptr", "ref_dw_ptr", "ref_db_ptr")

# ----------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _two_diff(a, b):
    """a − b as an unevaluated float32 pair (s, e): s = fl(a − b) and e = (a − b) − s exactly
    (Knuth's TwoSum, six additions). On a GPU, FMA contraction may fold the multiplication that
    produced a (softcap, temperature) into a − b; e is then only good to float32 rounding."""
    s = a - b
    a_back = s + b
    return s, (a - a_back) + ((a_back - s) - b)


@triton.jit
def _tile_kl_stats(z, z_ref, v_mask, EVEN_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """The statistics (m, r, y, t) of one tile (see _merge_kl_stats): z [BLOCK_N, BLOCK_V] is −inf
    on padding columns, z_ref finite everywhere; and, WITH_ENTROPY, the policy's own
    t_z = Σ e^{z−m}·(z − m) (``_tile.merge_stats``'s t; else 0)."""
    m, z_rel, e, r = tile_stats(z)
    if WITH_ENTROPY:
        if EVEN_V:
            t_z = tl.sum(e * z_rel, axis=1)
        else:
            t_z = tl.sum(e * tl.where(v_mask[None, :], z_rel, 0.0), axis=1)  # not 0·(−inf)
    else:
        t_z = tl.zeros_like(m)
    # The anchor y: z' at the maximum of z (the largest such z' if several columns tie).
    y = tl.max(tl.where(z == m[:, None], z_ref, float("-inf")), axis=1)
    # (z − m) − (z' − y): both differences are exact near the anchor, and 0 at it (up to a
    # rounding of z or z' where FMA contraction folds their scaling into the subtraction).
    u = z_rel - (z_ref - y[:, None])
    if not EVEN_V:
        u = tl.where(v_mask[None, :], u, 0.0)       # −inf on padding: 0·(−inf) would be nan
    return m, r, y, tl.sum(e * u, axis=1), t_z


@triton.jit
def _merge_kl_stats(m1, r1, y1, t1, m2, r2, y2, t2):
    """Merge the statistics of two disjoint sets of columns.

    Each set is (m, r, y, t): m = max z and r = Σ e^{z−m} − 1 as in
    ``_tile.merge_stats``; y = z' at the maximum of z (the anchor) and
    t = Σ e^{z−m}·((z − m) − (z' − y)).
    Then Σ p·(z − z') = (m − y) + t/s, and KL = t/s + (m' − y) + log s' − log s: the large part
    of Σ p·(z − z') is carried exactly by (m, y), as r keeps the maximum's own 1 apart, and t/s is
    small for a peaked p. V = 1 and identical heads give t = 0 and m' = y, hence KL = 0 exactly.

    With α = e^{m_lo − m}, the lower set rescales as s_lo → α·s_lo and
    t_lo → α·(t_lo + s_lo·((m_lo − m) − (y_lo − y))). An empty set is (−inf, −1, 0, 0); two
    empty sets never meet.
    """
    first_is_max = m1 >= m2
    m = tl.maximum(m1, m2)
    m_shift = tl.minimum(m1, m2) - m                # ≤ 0; −inf against an empty set
    alpha = tl.exp(m_shift)
    r_hi = tl.where(first_is_max, r1, r2)
    y_hi = tl.where(first_is_max, y1, y2)
    t_hi = tl.where(first_is_max, t1, t2)
    s_lo = 1.0 + tl.where(first_is_max, r2, r1)
    y_lo = tl.where(first_is_max, y2, y1)
    t_lo = tl.where(first_is_max, t2, t1)
    shift = tl.where(alpha > 0.0, m_shift - (y_lo - y_hi), 0.0)  # an empty set: not 0·0·(−inf)
    return m, r_hi + alpha * s_lo, y_hi, t_hi + alpha * (t_lo + s_lo * shift)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.heuristics(_launch.head_heuristics(
    HAS_REF_BIAS=lambda args: args["ref_b_ptr"] is not None,
    HAS_TARGETS=lambda args: args["targets_ptr"] is not None,
    EVEN_H_REF=lambda args: args["H_REF"] % args["BLOCK_H"] == 0,
))
@triton.jit
def _forward_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr,               # policy: hidden [N, H], weight [V, H], bias [V] or None
    ref_h_ptr, ref_w_ptr, ref_b_ptr,   # reference: [N, H_REF], [V, H_REF], [V] or None
    targets_ptr,                       # the policy's targets, int64 [N], or None
    part_ptr,                          # float32 [6 (8), NUM_SPLITS, N]: m, r, y, t, m', r'
                                       # (and with targets z_target, t_z) a split
    # shapes
    N, V, H, H_REF, V_PER_SPLIT, N_BUCKET,  # N_BUCKET (N rounded to a power of 2) keys autotuning
    # strides (the last dimension of every hidden and weight is contiguous)
    stride_hn, stride_wv, stride_ref_hn, stride_ref_wv,
    # scalars
    inv_temperature, softcap, ignore_index,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    EVEN_H: tl.constexpr, EVEN_H_REF: tl.constexpr, EVEN_V: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_n, pid_split, num_splits = split_tile(N, BLOCK_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if HAS_TARGETS:
        targets = tl.load(targets_ptr + offs_n, mask=n_mask, other=ignore_index)
    z_target = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Running statistics, "nothing yet" = (−inf, −1, 0, 0); see _merge_kl_stats. The reference
    # side goes through the same merge (so that identical heads give identical bits), without
    # y and t.
    m, r, t = empty_stats(BLOCK_N)
    y = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_ref, r_ref, _ = empty_stats(BLOCK_N)
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)

    v_begin, v_end = split_range(pid_split, V_PER_SPLIT, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        z, _ = scaled_logits(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask,
                             H, stride_hn, stride_wv, inv_temperature, softcap,
                             BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, EVEN_H,
                             DOT_IN_FP32)
        z_ref, _ = scaled_logits(ref_h_ptr, ref_w_ptr, ref_b_ptr, offs_n, offs_v, n_mask, v_mask,
                                 H_REF, stride_ref_hn, stride_ref_wv, inv_temperature, softcap,
                                 BLOCK_N, BLOCK_V, BLOCK_H, HAS_REF_BIAS, HAS_SOFTCAP,
                                 EVEN_H_REF, DOT_IN_FP32)
        if HAS_TARGETS:  # no padding column matches a target
            z_target += tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), axis=1)
        # Every tile has a real column, so the tile maxima are finite.
        if EVEN_V:
            m_tile, r_tile, y_tile, t_tile, t_z_tile = _tile_kl_stats(z, z_ref, v_mask, EVEN_V,
                                                                      HAS_TARGETS)
            m_ref_tile, _, _, r_ref_tile = tile_stats(z_ref)
        else:  # padding columns are −inf (e^{z−m} = 0), never 0
            m_tile, r_tile, y_tile, t_tile, t_z_tile = _tile_kl_stats(
                tl.where(v_mask[None, :], z, float("-inf")), z_ref, v_mask, EVEN_V, HAS_TARGETS)
            m_ref_tile, _, _, r_ref_tile = tile_stats(
                tl.where(v_mask[None, :], z_ref, float("-inf")))
        if HAS_TARGETS:  # before (m, r) move on: the same rescaling as the KL's statistics
            _, _, t_z = merge_stats(m, r, t_z, m_tile, r_tile, t_z_tile)
        m, r, y, t = _merge_kl_stats(m, r, y, t, m_tile, r_tile, y_tile, t_tile)
        m_ref, r_ref, _, _ = _merge_kl_stats(m_ref, r_ref, zero, zero, m_ref_tile, r_ref_tile,
                                             zero, zero)

    out = part_ptr + pid_split * N + offs_n
    split_stride = num_splits * N
    tl.store(out, m, mask=n_mask)
    tl.store(out + split_stride, r, mask=n_mask)
    tl.store(out + 2 * split_stride, y, mask=n_mask)
    tl.store(out + 3 * split_stride, t, mask=n_mask)
    tl.store(out + 4 * split_stride, m_ref, mask=n_mask)
    tl.store(out + 5 * split_stride, r_ref, mask=n_mask)
    if HAS_TARGETS:
        tl.store(out + 6 * split_stride, z_target, mask=n_mask)
        tl.store(out + 7 * split_stride, t_z, mask=n_mask)


@triton.jit
def _forward_merge_kernel(
    # pointers
    part_ptr,                          # float32 [6 (8), NUM_SPLITS, N] from _forward_kernel
    kl_ptr, lse_ptr, ref_lse_ptr,      # outputs, float64 [N]
    targets_ptr,                       # int64 [N] (HAS_TARGETS) or None, and outputs then:
    logp_ptr, entropy_ptr, sum_pz_ptr,  # float32, float32, float64 [N]
    # shapes
    N, NUM_SPLITS,
    # scalars
    ignore_index,
    # meta-parameters
    BLOCK: tl.constexpr, HAS_TARGETS: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    m, r, t = empty_stats(BLOCK)
    y = tl.zeros([BLOCK], dtype=tl.float32)
    m_ref, r_ref, _ = empty_stats(BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    z_target = tl.zeros([BLOCK], dtype=tl.float32)
    t_z = tl.zeros([BLOCK], dtype=tl.float32)
    split_stride = NUM_SPLITS * N
    for i in range(0, NUM_SPLITS):  # every split holds a real column: its statistics are finite
        ptr = part_ptr + i * N + offs
        m_i = tl.load(ptr, mask=mask, other=0.0)
        r_i = tl.load(ptr + split_stride, mask=mask, other=0.0)
        y_i = tl.load(ptr + 2 * split_stride, mask=mask, other=0.0)
        t_i = tl.load(ptr + 3 * split_stride, mask=mask, other=0.0)
        m_ref_i = tl.load(ptr + 4 * split_stride, mask=mask, other=0.0)
        r_ref_i = tl.load(ptr + 5 * split_stride, mask=mask, other=0.0)
        if HAS_TARGETS:
            z_target += tl.load(ptr + 6 * split_stride, mask=mask, other=0.0)  # one split has y
            t_z_i = tl.load(ptr + 7 * split_stride, mask=mask, other=0.0)
            _, _, t_z = merge_stats(m, r, t_z, m_i, r_i, t_z_i)
        m, r, y, t = _merge_kl_stats(m, r, y, t, m_i, r_i, y_i, t_i)
        m_ref, r_ref, _, _ = _merge_kl_stats(m_ref, r_ref, zero, zero, m_ref_i, r_ref_i,
                                             zero, zero)

    log_s = log1p(r).to(tl.float64)
    log_s_ref = log1p(r_ref).to(tl.float64)
    m64 = m.to(tl.float64)
    m_ref64 = m_ref.to(tl.float64)
    # KL = t/s + (m' − y) + (log s' − log s), in float64 from float32 pieces: m' − y is exact,
    # t/s is small for a peaked p. V = 1 and identical heads: 0 + 0 + 0, exactly.
    kl = (t / (1.0 + r)).to(tl.float64) + ((m_ref64 - y.to(tl.float64)) + (log_s_ref - log_s))
    # KL ≥ 0; rounding can leave a hair below 0 when p ≈ q.
    # Clip rounding below 0, written so that a NaN (bad input) stays NaN rather than becoming 0.
    tl.store(kl_ptr + offs, tl.where(kl < 0.0, 0.0, kl), mask=mask)
    tl.store(lse_ptr + offs, m64 + log_s, mask=mask)
    tl.store(ref_lse_ptr + offs, m_ref64 + log_s_ref, mask=mask)
    if HAS_TARGETS:  # as linear_logprobs' merge; Σ p·z in float64, where backward subtracts it
        targets = tl.load(targets_ptr + offs, mask=mask, other=ignore_index)
        logp, entropy, _, mean_rel = logp_and_entropy(m, r, t_z, z_target,
                                                      targets != ignore_index)
        tl.store(logp_ptr + offs, logp, mask=mask)
        tl.store(entropy_ptr + offs, entropy, mask=mask)
        tl.store(sum_pz_ptr + offs, m64 + mean_rel.to(tl.float64), mask=mask)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.heuristics(_launch.head_heuristics(
    HAS_REF_BIAS=lambda args: args["ref_b_ptr"] is not None,
    COMPUTE_DH=lambda args: args["dh_ptr"] is not None,
    COMPUTE_DW=lambda args: args["dw_ptr"] is not None,
    COMPUTE_DB=lambda args: args["db_ptr"] is not None,
    COMPUTE_REF_DH=lambda args: args["ref_dh_ptr"] is not None,
    COMPUTE_REF_DW=lambda args: args["ref_dw_ptr"] is not None,
    COMPUTE_REF_DB=lambda args: args["ref_db_ptr"] is not None,
    STORE_DLOGITS=lambda args: args["dlogits_ptr"] is not None
    or args["ref_dlogits_ptr"] is not None,
    COMPUTE_GRAD=lambda args: any(args[name] is not None
                                  for name in (*_GRAD_BUFFERS, "dlogits_ptr")),
    COMPUTE_REF_GRAD=lambda args: any(args[name] is not None
                                      for name in (*_REF_GRAD_BUFFERS, "ref_dlogits_ptr")),
    HAS_TARGETS=lambda args: args["targets_ptr"] is not None,
    HAS_GRAD_ENTROPY=lambda args: args["grad_entropy_ptr"] is not None,
    EVEN_H_REF=lambda args: args["H_REF"] % args["BLOCK_H"] == 0,
))
@triton.jit
def _backward_kernel(
    # pointers: inputs
    h_ptr, w_ptr, b_ptr,               # policy: hidden [N, H], weight [V, H], bias [V] or None
    ref_h_ptr, ref_w_ptr, ref_b_ptr,   # reference: [N, H_REF], [V, H_REF], [V] or None
    kl_ptr, lse_ptr, ref_lse_ptr,      # saved by forward, float64 [N]
    grad_ptr,                          # upstream gradient of KL, float32 [N]
    # with the policy's targets (int64 [N]; else all None): Σ p·z (float64 [N], from forward)
    # and the upstream gradients of logp and entropy (float32 [N]; entropy's may be None)
    targets_ptr, sum_pz_ptr, grad_logp_ptr, grad_entropy_ptr,
    # pointers: outputs, float32 accumulators zeroed by the launcher (None when not requested)
    dh_ptr, dw_ptr, db_ptr,            # policy: [N, H], [V, H], [V]
    ref_dh_ptr, ref_dw_ptr, ref_db_ptr,  # reference: [N, H_REF], [V, H_REF], [V]
    # or (chunked backward, the six above None): ∂L/∂a of each head [N, V] in the input dtype
    # (None for a head without gradient)
    dlogits_ptr, ref_dlogits_ptr,
    # shapes
    N, V, H, H_REF, N_BUCKET,          # N_BUCKET only keys autotuning
    # strides (the last dimension of every [*, H] tensor is contiguous; gradients are compact)
    stride_hn, stride_wv, stride_ref_hn, stride_ref_wv, stride_dln,
    # scalars
    inv_temperature, softcap, ignore_index,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_V: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    COMPUTE_REF_DH: tl.constexpr, COMPUTE_REF_DW: tl.constexpr, COMPUTE_REF_DB: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, COMPUTE_REF_GRAD: tl.constexpr, STORE_DLOGITS: tl.constexpr,
    EVEN_H: tl.constexpr, EVEN_H_REF: tl.constexpr, EVEN_V: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_n, pid_v = grouped_tile(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP_V)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    n_mask = offs_n < N
    v_mask = offs_v < V
    if EVEN_V:
        tile_mask = n_mask[:, None]
    else:
        tile_mask = n_mask[:, None] & v_mask[None, :]

    z, dz_da = scaled_logits(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask,
                             H, stride_hn, stride_wv, inv_temperature, softcap,
                             BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, EVEN_H,
                             DOT_IN_FP32)
    z_ref, dz_ref_da = scaled_logits(ref_h_ptr, ref_w_ptr, ref_b_ptr, offs_n, offs_v, n_mask,
                                     v_mask, H_REF, stride_ref_hn, stride_ref_wv,
                                     inv_temperature, softcap, BLOCK_N, BLOCK_V, BLOCK_H,
                                     HAS_REF_BIAS, HAS_SOFTCAP, EVEN_H_REF, DOT_IN_FP32)
    # p (and q) from the float64 lse as a float32 pair hi + lo: z − hi is exact where it matters
    # (a dominant token, z within a factor of 2 of hi). Rows past N get hi = 1e30, a finite
    # +inf: p = q = 0 there without inf − inf anywhere.
    lse_hi, lse_lo = split_f64(lse_ptr + offs_n, n_mask, 1e30)
    p = tl.exp((z - lse_hi[:, None]) - lse_lo[:, None])
    g = tl.load(grad_ptr + offs_n, mask=n_mask, other=0.0)

    # ∂L/∂a of both heads first, then the sweeps: while the policy's sweeps run, only the other
    # ∂L/∂a tile stays live rather than p, q and the softcap factor (register pressure).
    # Padding columns (v ≥ V) have a = 0 and rows past N garbage: both are masked out of ∂L/∂a
    # before they reach the matmuls and atomics.
    if COMPUTE_GRAD:
        # With x = z − z', KL = Σ_v p_v·x_v − lse + lse' and ∂p_v/∂z_u = p_v·(1[u = v] − p_u):
        #   ∂KL/∂z_u = p_u·x_u − p_u·Σ_v p_v·x_v − p_u + p_u = p_u·(x_u − c),
        #   c = Σ_v p_v·x_v = KL + lse − lse',  so p_u·(x_u − c) = p_u·(log p_u − log q_u − KL).
        # x − c cancels for the dominant token of a peaked p, where |x| may be 100 or more, so
        # both sides carry a float32 pair: c formed in float64 and split, x = z − z' with its
        # rounding error (_two_diff). x_hi − c_hi is then exact and the pairs' low parts make up
        # the rest, where log p − log q − KL would round three numbers of the size of x. V = 1
        # and identical heads (c = x exactly) give exactly 0.
        c = (tl.load(kl_ptr + offs_n, mask=n_mask, other=0.0)
             + (tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
                - tl.load(ref_lse_ptr + offs_n, mask=n_mask, other=0.0)))
        c_hi = c.to(tl.float32)
        c_lo = (c - c_hi.to(tl.float64)).to(tl.float32)
        x_hi, x_lo = _two_diff(z, z_ref)
        dz = g[:, None] * p * ((x_hi - c_hi[:, None]) + (x_lo - c_lo[:, None]))
        if HAS_TARGETS:
            # logp = z_y − lse and entropy = lse − Σ_v p_v z_v add, for their upstream
            # gradients g_y and g_e, the terms of linear_logprobs' backward (ALGORITHMS.md §1):
            #   ∂logp/∂z_u = 1[u = y] − p_u,
            #   ∂ent/∂z_u = p_u − (p_u + Σ_v z_v·p_v·(1[u = v] − p_u)) = −p_u·(z_u − Σ_v p_v z_v),
            # so that one tile gives ∂L/∂z = g·p·(x − c) + g_y·(1[u = y] − p) − g_e·p·(z − Σ p z).
            # Rows whose target is ignored have g_y = g_e = 0 (logp and entropy are 0 there).
            targets = tl.load(targets_ptr + offs_n, mask=n_mask, other=ignore_index)
            scored = n_mask & (targets != ignore_index)
            g_y = tl.load(grad_logp_ptr + offs_n, mask=scored, other=0.0)
            dz += g_y[:, None] * (tl.where(offs_v[None, :] == targets[:, None], 1.0, 0.0) - p)
            if HAS_GRAD_ENTROPY:
                g_e = tl.load(grad_entropy_ptr + offs_n, mask=scored, other=0.0)
                # z − Σ p·z cancels for a dominant token: Σ p·z as a float32 pair, as lse.
                spz_hi, spz_lo = split_f64(sum_pz_ptr + offs_n, scored, 0.0)
                dz -= g_e[:, None] * p * ((z - spz_hi[:, None]) - spz_lo[:, None])
        da = tl.where(tile_mask, dz * dz_da, 0.0)   # ∂z/∂a = (1/T)·(1 − tanh²(a/c)) or 1/T
    if COMPUTE_REF_GRAD:
        # ∂KL/∂z'_u = −p_u + ∂lse'/∂z'_u = q_u − p_u.
        ref_lse_hi, ref_lse_lo = split_f64(ref_lse_ptr + offs_n, n_mask, 1e30)
        q = tl.exp((z_ref - ref_lse_hi[:, None]) - ref_lse_lo[:, None])
        da_ref = tl.where(tile_mask, (g[:, None] * (q - p)) * dz_ref_da, 0.0)
    if STORE_DLOGITS:
        if COMPUTE_GRAD:
            store_tile(dlogits_ptr, da, offs_n, offs_v, n_mask, v_mask, stride_dln, EVEN_V)
        if COMPUTE_REF_GRAD:
            store_tile(ref_dlogits_ptr, da_ref, offs_n, offs_v, n_mask, v_mask, stride_dln,
                       EVEN_V)
    if COMPUTE_GRAD and not STORE_DLOGITS:
        accumulate_head_grads(da, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr,
                              offs_n, offs_v, n_mask, n_mask, v_mask, H, stride_hn, stride_wv,
                              BLOCK_N, BLOCK_V, BLOCK_H, COMPUTE_DH, COMPUTE_DW, COMPUTE_DB,
                              EVEN_H, DOT_IN_FP32)
    if COMPUTE_REF_GRAD and not STORE_DLOGITS:
        accumulate_head_grads(da_ref, ref_h_ptr, ref_w_ptr, ref_dh_ptr, ref_dw_ptr, ref_db_ptr,
                              offs_n, offs_v, n_mask, n_mask, v_mask,
                              H_REF, stride_ref_hn, stride_ref_wv,
                              BLOCK_N, BLOCK_V, BLOCK_H,
                              COMPUTE_REF_DH, COMPUTE_REF_DW, COMPUTE_REF_DB,
                              EVEN_H_REF, DOT_IN_FP32)


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------


def _default_config(kind: str, dtype: torch.dtype, n_tokens: int) -> triton.Config:
    """The pinned config (H100), chosen for register pressure and Hopper's shared memory; not yet
    timed.

    Two logit tiles are live at once (z and z', and in backward p, q and ∂L/∂a besides), so the
    vocabulary tile is half that of linear_logprobs: 16-bit inputs take 128×64 logit tiles in
    backward ((128 + 64)·64·2 B = 24 KiB a stage) and 128×32 in forward; float32 takes 64×64
    tiles on 8 warps in backward and 64×32 tiles on 4 warps in forward, H in chunks of 16 in
    both (backward must recompute forward's logits bit for bit, so the chunks of H are the same).
    Larger forward tiles spill registers inside its vocabulary loop (on ragged shapes, odd H,
    softcap, few tokens), and so does ptxas's allocation of 128 registers a thread on 8 warps
    (``fastalign.bench.hopper``).
    """
    if kind == "backward":
        return _launch.pinned_config(kind, dtype, n_tokens, block_v_16bit=64,
                                     fp32_tile=(64, 16, 8))
    return _launch.pinned_config(kind, dtype, n_tokens, block_v_16bit=32, fp32_tile=(32, 16, 4))


def _autotune_configs(kind: str) -> list[triton.Config]:
    """The search space of FASTALIGN_AUTOTUNE=1, keyed on (N_BUCKET, V, H, H_REF) and dtypes."""
    return _launch.config_space(kind, ((64, 64), (128, 64), (64, 128), (128, 128), (32, 128),
                                       (16, 128)))


_AUTOTUNE_KEY = ["N_BUCKET", "V", "H", "H_REF"]  # plus the dtypes of the tensor arguments
_forward_kernel_tuned = _launch.autotuned(_forward_kernel, _autotune_configs("forward"),
                                          _AUTOTUNE_KEY)
_backward_kernel_tuned = _launch.autotuned(_backward_kernel, _autotune_configs("backward"),
                                           _AUTOTUNE_KEY,
                                           zeroed=_GRAD_BUFFERS + _REF_GRAD_BUFFERS)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_layout(hidden, weight, bias, ref_hidden, ref_weight, ref_bias) -> None:
    _launch.check_head_layout(hidden, weight, bias)
    _launch.check_head_layout(ref_hidden, ref_weight, ref_bias, prefix="ref_")
    # One dtype for both heads (the kernels take one DOT_IN_FP32), one N and one V.
    _launch.check_layout("ref_hidden", ref_hidden, hidden.dtype, (hidden.shape[0], None))
    _launch.check_layout("ref_weight", ref_weight, hidden.dtype, (weight.shape[0], None))
    _launch.check_one_device(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)


def linear_kl_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    ref_hidden: torch.Tensor, ref_weight: torch.Tensor, ref_bias: torch.Tensor | None,
    temperature: float, softcap: float,
    targets: torch.Tensor | None = None, ignore_index: int = -100,
) -> tuple[torch.Tensor, ...]:
    """(kl, lse, ref_lse), each float64 [N]: KL(p‖q) per token and both log-sum-exps.

    hidden [N, H] and weight [V, H] (with bias [V] or None) are the policy head, ref_hidden
    [N, H_ref] and ref_weight [V, H_ref] (with ref_bias) the reference head; one dtype among
    float32 / bfloat16 / float16 for all, contiguous, one device. ``softcap`` 0.0 means none.
    lse and ref_lse are what ``linear_kl_backward`` needs besides kl (module docstring).

    With the policy's ``targets`` (int64 [N]; ``ignore_index`` where not scored), also logp and
    entropy (float32 [N], 0 where ignored) and Σ p·z (float64 [N], for backward), from the same
    pass: (kl, lse, ref_lse, logp, entropy, sum_pz).
    """
    _check_layout(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    if targets is not None:
        _launch.check_layout("targets", targets, torch.int64, (hidden.shape[0],))
        _launch.check_one_device(hidden, targets)
    hidden, weight, bias = _launch.kernel_head(hidden, weight, bias)
    ref_hidden, ref_weight, ref_bias = _launch.kernel_head(ref_hidden, ref_weight, ref_bias)
    targets = _launch.aligned(targets)
    n_tokens, hidden_size = hidden.shape
    vocab_size, ref_hidden_size = ref_weight.shape
    device = hidden.device
    outputs = [torch.empty(n_tokens, dtype=torch.float64, device=device) for _ in range(3)]
    if targets is not None:  # logp, entropy, sum_pz
        outputs += [torch.empty(n_tokens, dtype=dtype, device=device)
                    for dtype in (torch.float32, torch.float32, torch.float64)]
    if n_tokens == 0:
        return tuple(outputs)

    nominal_n_tiles = triton.cdiv(n_tokens, _default_config("forward", hidden.dtype,
                                                            n_tokens).kwargs["BLOCK_N"])
    v_per_split, num_splits = _launch.vocab_splits(vocab_size, nominal_n_tiles, device)
    partials = torch.empty((6 if targets is None else 8, num_splits, n_tokens),
                           dtype=torch.float32, device=device)

    args = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, partials,
            n_tokens, vocab_size, hidden_size, ref_hidden_size, v_per_split,
            _launch.n_bucket(n_tokens),
            hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0),
            1.0 / float(temperature), float(softcap), int(ignore_index))
    with _launch.device_guard(device):
        _launch.run_kernel("forward", _forward_kernel, _forward_kernel_tuned,
                           lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]) * num_splits,),
                           args, hidden.dtype, n_tokens, _default_config)
        merge_block = 1024
        scored = outputs[3:] if targets is not None else (None, None, None)
        _forward_merge_kernel[(triton.cdiv(n_tokens, merge_block),)](
            partials, *outputs[:3], targets, *scored, n_tokens, num_splits, int(ignore_index),
            BLOCK=merge_block, HAS_TARGETS=targets is not None, num_warps=4,
        )
    return tuple(outputs)


def linear_kl_backward(
    grad_kl: torch.Tensor,
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    ref_hidden: torch.Tensor, ref_weight: torch.Tensor, ref_bias: torch.Tensor | None,
    kl: torch.Tensor, lse: torch.Tensor, ref_lse: torch.Tensor,
    temperature: float, softcap: float,
    compute_dhidden: bool, compute_dweight: bool, compute_dbias: bool,
    compute_dref_hidden: bool, compute_dref_weight: bool, compute_dref_bias: bool,
    grad_logp: torch.Tensor | None = None, grad_entropy: torch.Tensor | None = None,
    targets: torch.Tensor | None = None, sum_pz: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor | None, ...]:
    """(dhidden, dweight, dbias, dref_hidden, dref_weight, dref_bias) for grad_kl (float32 [N]).

    kl, lse and ref_lse are float64 [N] as ``linear_kl_forward`` returns them. Each requested
    gradient comes back in its input's dtype, accumulated in float32; the others (and the bias
    gradients of absent biases) are None, and a head with none requested costs no gradient work.

    With ``targets`` (as given to forward), ``sum_pz`` (forward's) and ``grad_logp`` (float32
    [N]), and optionally ``grad_entropy``: the gradients of the KL, logp and entropy together.
    """
    _check_layout(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    device = hidden.device
    scored = targets is not None
    for name, x, dtype, wanted in (
            ("grad_kl", grad_kl, torch.float32, True), ("kl", kl, torch.float64, True),
            ("lse", lse, torch.float64, True), ("ref_lse", ref_lse, torch.float64, True),
            ("targets", targets, torch.int64, scored), ("sum_pz", sum_pz, torch.float64, scored),
            ("grad_logp", grad_logp, torch.float32, scored),
            ("grad_entropy", grad_entropy, torch.float32, scored and grad_entropy is not None)):
        if wanted:
            _launch.check_layout(name, x, dtype, (n_tokens,))
    _launch.check_one_device(hidden, grad_kl, kl, lse, ref_lse, targets, sum_pz, grad_logp,
                             grad_entropy)
    compute_dbias = compute_dbias and bias is not None
    compute_dref_bias = compute_dref_bias and ref_bias is not None
    like = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    k_hidden, k_weight, k_bias = _launch.kernel_head(hidden, weight, bias)
    k_ref_hidden, k_ref_weight, k_ref_bias = _launch.kernel_head(ref_hidden, ref_weight, ref_bias)
    row_inputs = (kl, lse, ref_lse, grad_kl, targets, sum_pz, grad_logp,
                  grad_entropy if scored else None)
    hidden_size, ref_hidden_size = k_hidden.shape[1], k_ref_hidden.shape[1]

    def launch(rows: slice, grads, dlogits, ref_dlogits) -> None:
        n = rows.stop - rows.start
        workspace = dlogits if dlogits is not None else ref_dlogits
        args = (k_hidden[rows], k_weight, k_bias, k_ref_hidden[rows], k_ref_weight, k_ref_bias,
                *(None if x is None else _launch.aligned(x[rows]) for x in row_inputs),
                *grads, dlogits, ref_dlogits,
                n, vocab_size, hidden_size, ref_hidden_size, _launch.n_bucket(n),
                k_hidden.stride(0), k_weight.stride(0), k_ref_hidden.stride(0),
                k_ref_weight.stride(0),
                vocab_size if workspace is None else workspace.stride(0),  # both alike
                1.0 / float(temperature), float(softcap), int(ignore_index))
        with _launch.device_guard(device):
            _launch.run_kernel("backward", _backward_kernel, _backward_kernel_tuned,
                               lambda meta: (triton.cdiv(n, meta["BLOCK_N"])
                                             * triton.cdiv(vocab_size, meta["BLOCK_V"]),),
                               args, hidden.dtype, n, _default_config)

    if _launch.backward_strategy() == "chunked":
        # The kernel reads the padded, aligned heads; the matrix products take the caller's.
        heads = [_launch.HeadGrads(hidden, weight, bias, compute_dhidden, compute_dweight,
                                   compute_dbias),
                 _launch.HeadGrads(ref_hidden, ref_weight, ref_bias, compute_dref_hidden,
                                   compute_dref_weight, compute_dref_bias)]
        if n_tokens > 0:
            _launch.head_grads_in_chunks(
                heads, lambda start, end, dlogits, ref_dlogits: launch(
                    slice(start, end), (None,) * 6, dlogits, ref_dlogits))
        return tuple(_zeros_if_empty(grad, wanted, like) for head in heads
                     for grad, wanted, like in ((head.dh, head.want_dh, head.hidden),
                                                (head.dw, head.want_dw, head.weight),
                                                (head.db, head.want_db, head.bias)))

    grads = tuple(_launch.float32_accumulator(wanted, shape, device) for wanted, shape in (
        (compute_dhidden, (n_tokens, hidden_size)),
        (compute_dweight, (vocab_size, hidden_size)),
        (compute_dbias, (vocab_size,)),
        (compute_dref_hidden, (n_tokens, ref_hidden_size)),
        (compute_dref_weight, (vocab_size, ref_hidden_size)),
        (compute_dref_bias, (vocab_size,))))
    if n_tokens > 0 and any(x is not None for x in grads):
        launch(slice(0, n_tokens), grads, None, None)
    return tuple(_launch.unpadded(grad, x) for grad, x in zip(grads, like))


def _zeros_if_empty(grad, wanted: bool, like):
    """A wanted gradient the chunked backward did not fill (no tokens): zeros."""
    if grad is not None or not wanted or like is None:
        return grad
    return torch.zeros_like(like)
