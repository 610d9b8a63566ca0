"""Triton row kernels of the sequence-loss engine (``fastalign/ops/sequence_loss.py``): the
statistics of each row of a tile of LM-head logits, and later the same tile overwritten with the
loss's gradient ∂L/∂a, once the per-token upstream gradients are known.

The engine works chunk of whole sequences by chunk, gradients in forward (as ``linear_nll``):
  1. logits a = h[chunk]·Wᵀ into a [n, V] tile (torch.mm; the input dtype);
  2. ``_stats_rows_kernel`` (``sequence_rows_stats``), one program a row, one read of the row:
     of z = c·tanh((a + b)/c)/T (or (a + b)/T), the target's log-prob logp = z_y − lse, the
     entropy H = −Σ p·log p, lse = log Σ e^z and log Σ p²; the tile is left as it is;
  3. the loss makes per-token upstream gradients g = ∂L/∂logp and e = ∂L/∂H of them;
  4. ``_grad_rows_kernel`` (``sequence_rows_grad``), one program a row, one read and one write:
     the row overwritten with ∂L/∂a, from its saved lse and H;
  5. dh, dW, db by matrix products of the tile (``_chunked.head_grads_in_chunks``).
Statistics and gradients are float32 whatever the tile's dtype; every row is scored (targets in
[0, V), not checked here: the engine validates them once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels import _launch
from fastalign.kernels._tile import (
    empty_stats,
    log1p,
    logp_and_entropy,
    merge_stats,
    program_row,
    scaled_row,
)

__all__ = ["sequence_rows_grad", "sequence_rows_stats"]

# Columns a program reads at once, and its warps: as linear_nll's row kernel (rows are long, V up
# to 256k, so one program a row is parallelism enough for chunks of ≥ 64 tokens).
BLOCK_V = 1024
NUM_WARPS = 4


# ----------------------------------------------------------------------------------------------
# Row statistics
# ----------------------------------------------------------------------------------------------


@triton.heuristics(_launch.row_heuristics())
@triton.jit
def _stats_rows_kernel(
    # pointers
    logits_ptr,                   # [n, V] input dtype: raw logits a (read only)
    b_ptr, targets_ptr,           # bias [V] or None, targets [n] int64
    logp_ptr, entropy_ptr,        # float32 [n] out: log p_y, −Σ p·log p
    lse_ptr, log_sum_sq_ptr,      # float32 [n] out: log Σ e^z, log Σ p²
    # shapes and strides (the last dimension of the logits is contiguous)
    V, stride_ln,
    # scalars
    inv_temperature, softcap,
    # meta-parameters
    BLOCK_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_V: tl.constexpr,
):
    row, row_ptr, target = program_row(logits_ptr, stride_ln, targets_ptr)
    offs = tl.arange(0, BLOCK_V)
    # Each lane keeps the softmax statistics (m, r, t) of the columns it has seen (merge_stats:
    # m = max z, r = Σ e^{z−m} − 1, t = Σ e^{z−m}·(z − m)) and q = Σ e^{2(z−m)} − 1, so that one
    # read of the row gives lse, the entropy and log Σ p² without a block reduction per tile.
    m, r, t = empty_stats(BLOCK_V)
    q = tl.full([BLOCK_V], -1.0, dtype=tl.float32)
    z_target = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        z, _ = scaled_row(row_ptr, b_ptr, v0, offs, V, inv_temperature, softcap,
                          HAS_BIAS, HAS_SOFTCAP, EVEN_V)
        z_target += tl.where(v0 + offs == target, z, 0.0)
        m, r, t, q = _add_column(m, r, t, q, z)
    m, r, t, q = _merge_lanes(m, r, t, q)
    # logp = (z_y − m) − log1p(r), H = log s − t/s: exact for peaked rows, where r → 0.
    logp, entropy, log_s, _ = logp_and_entropy(m, r, t, tl.sum(z_target, axis=0), True)
    tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, m + log_s)
    # log Σ p² = log Σ e^{2(z−m)} − 2·log Σ e^{z−m}: the maxima cancel, both logs are ≥ 0.
    tl.store(log_sum_sq_ptr + row, log1p(q) - 2.0 * log_s)


@triton.jit
def _add_column(m, r, t, q, z):
    """Each lane's running statistics (m, r, t, q) with one more logit z (its own column)."""
    m_new, r_new, t_new = merge_stats(m, r, t, z, 0.0, 0.0)
    # q = Σ e^{2(z−m)} − 1 rescales by α² where r rescales by α (the compiler shares the exp of α
    # with merge_stats): the set with the larger max keeps its q, the other's 1 + q comes in ×α².
    alpha = tl.exp(tl.minimum(m, z) - m_new)
    q_new = tl.where(m >= z, q + alpha * alpha, alpha * alpha * (1.0 + q))
    # z = −inf (padding past V, a column the bias masks out) is the empty set: nothing to add,
    # and merged with a lane that is still empty it would give −inf − (−inf) = NaN.
    empty = z == float("-inf")
    return (tl.where(empty, m, m_new), tl.where(empty, r, r_new), tl.where(empty, t, t_new),
            tl.where(empty, q, q_new))


@triton.jit
def _merge_lanes(m, r, t, q):
    """The row's statistics (m, r, t, q) from its lanes' (empty lanes: m = −inf, r = q = −1)."""
    m_row = tl.max(m, axis=0)
    alpha = tl.exp(m - m_row)                    # 0 on empty lanes
    gap = tl.where(alpha > 0.0, m - m_row, 0.0)  # empty lanes: not 0·(−inf)
    s = 1.0 + r
    # The lanes that hold the row's max bring 1 + r (and 1 + q) unscaled; one of those 1s is the
    # row's own, which r and q leave out. Adding the others' r rather than forming Σ s − 1 keeps
    # the digits of a peaked row's tiny r.
    is_max = m == m_row
    extra_maxima = tl.sum(is_max.to(tl.float32), axis=0) - 1.0
    r_row = tl.sum(tl.where(is_max, r, alpha * s), axis=0) + extra_maxima
    q_row = tl.sum(tl.where(is_max, q, alpha * alpha * (1.0 + q)), axis=0) + extra_maxima
    t_row = tl.sum(alpha * (t + s * gap), axis=0)
    return m_row, r_row, t_row, q_row


# ----------------------------------------------------------------------------------------------
# Gradient
# ----------------------------------------------------------------------------------------------


@triton.heuristics(_launch.row_heuristics(
    HAS_ENTROPY_GRAD=lambda args: args["grad_entropy_ptr"] is not None))
@triton.jit
def _grad_rows_kernel(
    # pointers
    logits_ptr,                      # [n, V] input dtype: raw logits a in, ∂L/∂a out
    b_ptr, targets_ptr,              # bias [V] or None, targets [n] int64
    lse_ptr, entropy_ptr,            # float32 [n]: the row's lse and H (_stats_rows_kernel)
    grad_logp_ptr, grad_entropy_ptr,  # float32 [n]: g = ∂L/∂logp, e = ∂L/∂H (None: e = 0)
    # shapes and strides (the last dimension of the logits is contiguous)
    V, stride_ln,
    # scalars
    inv_temperature, softcap,
    # meta-parameters
    BLOCK_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_V: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
):
    # With log p_v = z_v − lse:  ∂logp_y/∂z_v = 1[v = y] − p_v, and
    #   ∂H/∂z_v = −Σ_u (1 + log p_u)·p_u·(1[u = v] − p_v) = −p_v·(log p_v + H),
    # so ∂L/∂z_v = g·(1[v = y] − p_v) − e·p_v·(log p_v + H), and ∂L/∂a_v = ∂L/∂z_v · ∂z_v/∂a_v.
    row, row_ptr, target = program_row(logits_ptr, stride_ln, targets_ptr)
    lse = tl.load(lse_ptr + row)
    grad_logp = tl.load(grad_logp_ptr + row)
    if HAS_ENTROPY_GRAD:
        grad_entropy = tl.load(grad_entropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        z, dz_da = scaled_row(row_ptr, b_ptr, v0, offs, V, inv_temperature, softcap,
                              HAS_BIAS, HAS_SOFTCAP, EVEN_V)
        log_p = z - lse
        p = tl.exp(log_p)
        dz = grad_logp * (tl.where(cols == target, 1.0, 0.0) - p)
        if HAS_ENTROPY_GRAD:
            # p·(log p + H) → 0 with p; at p = 0 exactly (z = −inf: a column the bias masks
            # out) the product would be 0·(−inf) = NaN.
            dz -= grad_entropy * tl.where(p > 0.0, p * (log_p + entropy), 0.0)
        tl.store(row_ptr + cols, (dz * dz_da).to(logits_ptr.dtype.element_ty), mask=cols < V)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def sequence_rows_stats(
    tile: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    temperature: float, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse, log_sum_sq) of each row of a tile of raw logits, float32 [n] each.

    tile [n, V] float32, bfloat16 or float16, its last dimension contiguous (the row stride may
    exceed V: a column slice of a padded buffer); read, not modified. bias [V] of the tile's dtype
    or None; targets int64 [n], each in [0, V) (not checked). With z = c·tanh((a + b)/c)/T
    (softcap c, 0.0 meaning none; temperature T) and p = softmax(z): logp = log p_y (≤ 0),
    entropy = −Σ p·log p, lse = log Σ e^z, log_sum_sq = log Σ p².
    """
    n_rows, vocab_size = _check_rows(tile, bias, targets)
    stats = tuple(torch.empty(n_rows, dtype=torch.float32, device=tile.device) for _ in range(4))
    if n_rows == 0:
        return stats
    with _launch.device_guard(tile.device):
        _stats_rows_kernel[(n_rows,)](
            tile, _launch.aligned(bias), _launch.aligned(targets), *stats,
            vocab_size, tile.stride(0), 1.0 / float(temperature), float(softcap),
            BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
        )
    return stats


def sequence_rows_grad(
    tile: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    lse: torch.Tensor, entropy: torch.Tensor, grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None, temperature: float, softcap: float,
) -> None:
    """Overwrite a tile of raw logits a with ∂L/∂a, in place and in its dtype.

    tile, bias, targets, temperature and softcap as for ``sequence_rows_stats``; lse and entropy
    float32 [n], the rows' statistics from it; grad_logp = ∂L/∂logp and grad_entropy = ∂L/∂H
    float32 [n] (grad_entropy None: the loss does not depend on the entropy). Per row,
    ∂L/∂z_v = g·(1[v = y] − p_v) − e·p_v·(log p_v + H), times ∂z_v/∂a_v. Columns past V (in
    the row stride) are not touched.
    """
    n_rows, _ = _check_rows(tile, bias, targets)
    per_row = {"lse": lse, "entropy": entropy, "grad_logp": grad_logp,
               "grad_entropy": grad_entropy}
    for name, x in per_row.items():
        if x is not None:
            _launch.check_layout(name, x, torch.float32, (n_rows,))
    _launch.check_one_device(tile, *per_row.values())
    if n_rows == 0:
        return
    with _launch.device_guard(tile.device):
        _grad_rows_kernel[(n_rows,)](
            tile, _launch.aligned(bias), _launch.aligned(targets),
            *(_launch.aligned(x) for x in per_row.values()),
            tile.shape[1], tile.stride(0), 1.0 / float(temperature), float(softcap),
            BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
        )


def _check_rows(tile, bias, targets) -> tuple[int, int]:
    """(n, V) of a tile [n, V] the row kernels can read (and write in place), with its bias and
    targets."""
    if not isinstance(tile, torch.Tensor):
        raise TypeError(f"tile must be a tensor, got {type(tile).__name__}")
    if tile.dtype not in _launch.FLOAT_DTYPES:
        want = " or ".join(str(d).removeprefix("torch.") for d in _launch.FLOAT_DTYPES)
        raise TypeError(f"tile must be {want}, got {tile.dtype}")
    if tile.dim() != 2 or tile.shape[1] == 0:
        raise ValueError(f"tile must be [n, V] with V ≥ 1, got {tuple(tile.shape)}")
    n_rows, vocab_size = tile.shape
    # Rows may be spaced wider than V, never overlap (the gradient is written in place).
    if (vocab_size > 1 and tile.stride(1) != 1) or (n_rows > 1 and tile.stride(0) < vocab_size):
        raise ValueError(f"tile must have a contiguous last dimension and rows that do not "
                         f"overlap, got strides {tile.stride()}")
    if bias is not None:
        _launch.check_layout("bias", bias, tile.dtype, (vocab_size,))
    _launch.check_layout("targets", targets, torch.int64, (n_rows,))
    _launch.check_one_device(tile, bias, targets)
    return n_rows, vocab_size
