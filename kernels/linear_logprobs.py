"""Triton kernels for ``linear_logprobs``: per-token log-probs and entropies from (hidden, LM head).

Math in ``docs/ALGORITHMS.md`` §1; the contract in ``fastalign/linear_logprobs.py``. Nothing here
holds an [N, V] tensor: the logits exist only as one [BLOCK_N, BLOCK_V] tile in registers.

Forward (2·N·H·V FLOPs), two launches:
  1. ``_forward_kernel``, grid (token tiles × vocabulary splits). Each program streams the
     vocabulary tiles of its split, computes each logit tile with an H-loop of ``tl.dot``, and
     merges it into running statistics per token (``_tile.merge_stats``), plus the target logit when
     the target falls in the split. Splitting the vocabulary keeps the GPU busy when there are
     few token tiles (8k tokens are only 64 tiles of 128 for 132 SMs).
  2. ``_forward_merge_kernel`` merges the splits and writes logp, entropy, lse and Σ p·z, the
     last two in float64 (see below).

Backward (6·N·H·V FLOPs), two strategies (``FASTALIGN_TRITON_BACKWARD``, ``_launch``):
  - chunked (the default, on every device): per chunk of tokens (the workspace sized from a
    memory budget, by default 5% of eager's [N, V] float32 logits), ``_backward_kernel`` with
    STORE_DLOGITS recomputes each logit tile (one H-loop) and its probabilities from the saved
    lse and writes ∂L/∂a in the input dtype; dh = ∂L/∂a · W and dW += (∂L/∂a)ᵀ · h (float32) are
    then two matrix products (cuBLAS on CUDA), with no atomics (``_launch.head_grads_in_chunks``).
  - atomic: one launch, grid (token tiles × vocabulary tiles); each program forms ∂L/∂a for its
    tile and sweeps H twice more: dh[tile rows] += ∂L/∂a · W[tile] and dW[tile rows] +=
    (∂L/∂a)ᵀ · h[tile], both with float32 ``tl.atomic_add``; db with one atomic per column. At
    16k tokens × the Llama-3 head that is ~10¹¹ atomics: L2-bound, kept for comparison.

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

import torch
import triton
import triton.language as tl

from fastalign.kernels import _launch
from fastalign.kernels._tile import (
    accumulate_head_grads,
    empty_stats,
    grouped_tile,
    logp_and_entropy,
    merge_stats,
    scaled_logits,
    split_f64,
    split_range,
    split_tile,
    store_tile,
    tile_stats,
)

__all__ = ["linear_logprobs_forward", "linear_logprobs_backward"]


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.heuristics(_launch.head_heuristics())
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
    pid_n, pid_split, num_splits = split_tile(N, BLOCK_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    targets = tl.load(targets_ptr + offs_n, mask=n_mask, other=ignore_index)
    valid = n_mask & (targets != ignore_index)

    # Running statistics of the tokens' logits seen so far (see merge_stats); "nothing yet" is
    # m = −inf, r = −1 (s = 0), t = 0.
    m, r, t = empty_stats(BLOCK_N)
    z_target = tl.zeros([BLOCK_N], dtype=tl.float32)
    # A tile of ignored tokens only (prompts, padding) needs no logits at all.
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        v_begin, v_end = split_range(pid_split, V_PER_SPLIT, V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < V
            z, _ = scaled_logits(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask,
                                 H, stride_hn, stride_wv, inv_temperature, softcap,
                                 BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, EVEN_H,
                                 DOT_IN_FP32)
            if not EVEN_V:  # padding columns are −inf (e^{z−m} = 0), never 0
                z = tl.where(v_mask[None, :], z, float("-inf"))
            z_target += tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), axis=1)

            # The tile's own statistics (every tile has a real column, so m_tile is finite).
            m_tile, z_rel, e, r_tile = tile_stats(z)
            if EVEN_V:
                t_tile = tl.sum(e * z_rel, axis=1)
            else:
                t_tile = tl.sum(e * tl.where(v_mask[None, :], z_rel, 0.0), axis=1)  # not 0·(−inf)
            m, r, t = merge_stats(m, r, t, m_tile, r_tile, t_tile)

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
    m, r, t = empty_stats(BLOCK)
    z_target = tl.zeros([BLOCK], dtype=tl.float32)
    split_stride = NUM_SPLITS * N
    for i in range(0, NUM_SPLITS):
        ptr = part_ptr + i * N + offs
        m_i = tl.load(ptr, mask=mask, other=0.0)
        r_i = tl.load(ptr + split_stride, mask=mask, other=0.0)
        t_i = tl.load(ptr + 2 * split_stride, mask=mask, other=0.0)
        z_target += tl.load(ptr + 3 * split_stride, mask=mask, other=0.0)  # one split holds y
        m, r, t = merge_stats(m, r, t, m_i, r_i, t_i)

    targets = tl.load(targets_ptr + offs, mask=mask, other=ignore_index)
    logp, entropy, log_s, mean_rel = logp_and_entropy(m, r, t, z_target,
                                                      targets != ignore_index)
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


@triton.heuristics(_launch.head_heuristics(
    HAS_GRAD_ENTROPY=lambda args: args["grad_entropy_ptr"] is not None,
    COMPUTE_DH=lambda args: args["dh_ptr"] is not None,
    COMPUTE_DW=lambda args: args["dw_ptr"] is not None,
    COMPUTE_DB=lambda args: args["db_ptr"] is not None,
    STORE_DLOGITS=lambda args: args["dlogits_ptr"] is not None,
))
@triton.jit
def _backward_kernel(
    # pointers: inputs
    h_ptr, w_ptr, b_ptr, targets_ptr,  # hidden [N, H], weight [V, H], bias [V] or None, targets [N]
    lse_ptr, sum_pz_ptr,               # saved by forward, float64 [N]
    grad_logp_ptr, grad_entropy_ptr,   # upstream gradients, float32 [N] (entropy's may be None)
    # pointers: outputs, float32 accumulators zeroed by the launcher (None when not requested)
    dh_ptr, dw_ptr, db_ptr,            # [N, H], [V, H], [V]
    # or (chunked backward, the three above None): ∂L/∂a [N, V] in the input dtype, every entry
    # written (0 for ignored tokens)
    dlogits_ptr,
    # shapes
    N, V, H, N_BUCKET,                 # N_BUCKET only keys autotuning
    # strides (the last dimension of every [*, H] tensor is contiguous; dh and dW are compact)
    stride_hn, stride_wv, stride_dln,
    # scalars
    inv_temperature, softcap, ignore_index,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_V: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    STORE_DLOGITS: tl.constexpr,
    EVEN_H: tl.constexpr, EVEN_V: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    pid_n, pid_v = grouped_tile(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP_V)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    n_mask = offs_n < N
    v_mask = offs_v < V
    targets = tl.load(targets_ptr + offs_n, mask=n_mask, other=ignore_index)
    valid = n_mask & (targets != ignore_index)
    da = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)  # what a skipped tile stores
    # Ignored tokens get no gradient: a tile of them only is skipped outright.
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        z, dz_da = scaled_logits(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask,
                                 H, stride_hn, stride_wv, inv_temperature, softcap,
                                 BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, EVEN_H,
                                 DOT_IN_FP32)
        # lse as a float32 pair hi + lo, and p = e^{(z − hi) − lo}: z − hi is exact when z is
        # near hi (a dominant token), where one rounding of lse to float32 would cost up to
        # ulp(|z|)/2 absolute in p. hi = +inf on ignored rows gives them p = 0 (their saved lse
        # may be a placeholder).
        lse_hi, lse_lo = split_f64(lse_ptr + offs_n, valid, float("inf"))
        g = tl.load(grad_logp_ptr + offs_n, mask=valid, other=0.0)
        p = tl.exp((z - lse_hi[:, None]) - lse_lo[:, None])
        # ∂logp/∂z_v = 1[v = y] − p_v;   ∂ent/∂z_v = −p_v·(z_v − Σ_u p_u z_u).
        dz = g[:, None] * (tl.where(offs_v[None, :] == targets[:, None], 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            e = tl.load(grad_entropy_ptr + offs_n, mask=valid, other=0.0)
            # z − Σ p·z cancels for a dominant token too: the same hi + lo split.
            spz_hi, spz_lo = split_f64(sum_pz_ptr + offs_n, valid, 0.0)
            dz -= e[:, None] * p * ((z - spz_hi[:, None]) - spz_lo[:, None])
        # ∂z/∂a = (1/T)·(1 − tanh²(a/c)), or 1/T without softcap. Padding columns (v ≥ V) have
        # a = 0, so p = e^{−lse} ≠ 0 there: they are masked out here.
        da = dz * dz_da
        if EVEN_V:
            da = tl.where(valid[:, None], da, 0.0)
        else:
            da = tl.where(valid[:, None] & v_mask[None, :], da, 0.0)

        if not STORE_DLOGITS:
            accumulate_head_grads(da, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr,
                                  offs_n, offs_v, n_mask, valid, v_mask, H, stride_hn,
                                  stride_wv, BLOCK_N, BLOCK_V, BLOCK_H, COMPUTE_DH, COMPUTE_DW,
                                  COMPUTE_DB, EVEN_H, DOT_IN_FP32)
    if STORE_DLOGITS:
        store_tile(dlogits_ptr, da, offs_n, offs_v, n_mask, v_mask, stride_dln, EVEN_V)


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------


def _default_config(kind: str, dtype: torch.dtype, n_tokens: int) -> triton.Config:
    """The pinned config (H100). Chosen for Hopper's shared memory and MMA shapes; not yet timed.

    16-bit inputs: 128×128 logit tiles in backward ((128 + 128)·64·2 B = 32 KiB a pipeline
    stage), 128×64 in forward, whose running statistics and softmax of a 128×128 tile take all
    255 registers a thread and spill inside the vocabulary loop (``fastalign.bench.hopper``).
    """
    block_v_16bit = 128 if kind == "backward" else 64
    return _launch.pinned_config(kind, dtype, n_tokens, block_v_16bit=block_v_16bit)


def _autotune_configs(kind: str) -> list[triton.Config]:
    """The search space of FASTALIGN_AUTOTUNE=1, keyed on (N_BUCKET, V, H) and the dtypes."""
    return _launch.config_space(kind, ((64, 128), (128, 128), (128, 256), (256, 128),
                                       (64, 256), (32, 128), (16, 256)))


_AUTOTUNE_KEY = ["N_BUCKET", "V", "H"]  # plus the dtypes of the tensor arguments, always
_forward_kernel_tuned = _launch.autotuned(_forward_kernel, _autotune_configs("forward"),
                                          _AUTOTUNE_KEY)
_backward_kernel_tuned = _launch.autotuned(_backward_kernel, _autotune_configs("backward"),
                                           _AUTOTUNE_KEY, zeroed=("dh_ptr", "dw_ptr", "db_ptr"))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_layout(hidden, weight, bias, targets) -> None:
    _launch.check_head_layout(hidden, weight, bias)
    _launch.check_layout("targets", targets, torch.int64, (hidden.shape[0],))
    _launch.check_one_device(hidden, weight, bias, targets)


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
    _check_layout(hidden, weight, bias, targets)
    hidden, weight, bias = _launch.kernel_head(hidden, weight, bias)
    targets = _launch.aligned(targets)
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
    v_per_split, num_splits = _launch.vocab_splits(vocab_size, nominal_n_tiles, device)
    partials = torch.empty((4, num_splits, n_tokens), dtype=torch.float32, device=device)

    args = (hidden, weight, bias, targets, partials,
            n_tokens, vocab_size, hidden_size, v_per_split, _launch.n_bucket(n_tokens),
            hidden.stride(0), weight.stride(0),
            1.0 / float(temperature), float(softcap), int(ignore_index))
    with _launch.device_guard(device):
        _launch.run_kernel("forward", _forward_kernel, _forward_kernel_tuned,
                           lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]) * num_splits,),
                           args, hidden.dtype, n_tokens, _default_config)
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
    _check_layout(hidden, weight, bias, targets)
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    device = hidden.device
    for name, x, dtype in (("grad_logp", grad_logp, torch.float32),
                           ("grad_entropy", grad_entropy, torch.float32),
                           ("lse", lse, torch.float64), ("sum_pz", sum_pz, torch.float64)):
        if x is not None or name != "grad_entropy":
            _launch.check_layout(name, x, dtype, (n_tokens,))
    _launch.check_one_device(hidden, grad_logp, grad_entropy, lse, sum_pz)
    compute_dbias = compute_dbias and bias is not None
    if n_tokens == 0 or not (compute_dhidden or compute_dweight or compute_dbias):
        return (torch.zeros_like(hidden) if compute_dhidden else None,
                torch.zeros_like(weight) if compute_dweight else None,
                torch.zeros_like(bias) if compute_dbias else None)
    like = (hidden, weight, bias)
    k_hidden, k_weight, k_bias = _launch.kernel_head(hidden, weight, bias)
    targets, lse, sum_pz, grad_logp, grad_entropy = map(
        _launch.aligned, (targets, lse, sum_pz, grad_logp, grad_entropy))
    k_hidden_size = k_hidden.shape[1]

    def launch(rows: slice, dh, dw, db, dlogits) -> None:
        n = rows.stop - rows.start
        args = (k_hidden[rows], k_weight, k_bias,
                *(_launch.aligned(x[rows]) for x in (targets, lse, sum_pz, grad_logp)),
                None if grad_entropy is None else _launch.aligned(grad_entropy[rows]),
                dh, dw, db, dlogits,
                n, vocab_size, k_hidden_size, _launch.n_bucket(n),
                k_hidden.stride(0), k_weight.stride(0),
                vocab_size if dlogits is None else dlogits.stride(0),
                1.0 / float(temperature), float(softcap), int(ignore_index))
        with _launch.device_guard(device):
            _launch.run_kernel("backward", _backward_kernel, _backward_kernel_tuned,
                               lambda meta: (triton.cdiv(n, meta["BLOCK_N"])
                                             * triton.cdiv(vocab_size, meta["BLOCK_V"]),),
                               args, hidden.dtype, n, _default_config)

    if _launch.backward_strategy() == "chunked":
        # The kernel reads the padded, aligned head; the matrix products take the caller's.
        head = _launch.HeadGrads(hidden, weight, bias, compute_dhidden, compute_dweight,
                                 compute_dbias)
        _launch.head_grads_in_chunks(
            [head], lambda start, end, dlogits: launch(slice(start, end), None, None, None,
                                                       dlogits),
            rows_with_grad=targets != ignore_index)
        return head.dh, head.dw, head.db

    dh = _launch.float32_accumulator(compute_dhidden, (n_tokens, k_hidden_size), device)
    dw = _launch.float32_accumulator(compute_dweight, (vocab_size, k_hidden_size), device)
    db = _launch.float32_accumulator(compute_dbias, (vocab_size,), device)
    launch(slice(0, n_tokens), dh, dw, db, None)
    return tuple(_launch.unpadded(grad, x) for grad, x in zip((dh, dw, db), like))
