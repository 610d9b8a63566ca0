"""Triton kernel for ``linear_nll``: the summed NLL of the targets and its head gradients in one
pass, for an upstream gradient known in forward (a scalar loss such as SFT's mean NLL), and the
entropy and arg-max of each row on the way (SFT's metrics, no gradient).

Math in ``docs/ALGORITHMS.md`` §1; the contract in ``fastalign/ops/linear_nll.py``.

6·N·H·V FLOPs instead of linear_logprobs' 2 (forward) + 6 (backward, which recomputes the
logits), chunk of tokens by chunk of tokens (the chunk sized from the workspace budget of
``_chunked.chunk_rows``, by default 5% of eager's [N, V] float32 logits):
  1. logits a = h[chunk]·Wᵀ into the [C, V] workspace (torch.mm: cuBLAS on CUDA; 2·C·H·V);
  2. ``_nll_rows_kernel``, one program a row: the log-sum-exp of z = c·tanh(a/c)/T (online over
     column tiles), the row's NLL lse − z_y, then the row overwritten with
     ∂L/∂a = scale·(p − 1[v = y])·∂z/∂a (0 on ignored rows);
  3. dh[chunk] = ∂L/∂a·W, dW += (∂L/∂a)ᵀ·h[chunk] in float32, db += Σ_rows ∂L/∂a
     (``_chunked.head_grads_in_chunks``; 4·C·H·V).
The workspace holds the logits in the input dtype, as eager PyTorch's head does; the softmax and
the gradient of each row are float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels import _launch
from fastalign.kernels._tile import program_row, scaled_row

__all__ = ["linear_nll_forward"]

# Columns a program reads at once; rows are long (V up to 256k), so one program a row is enough
# parallelism for chunks of ≥ 64 tokens.
BLOCK_V = 1024
NUM_WARPS = 4


@triton.heuristics(_launch.row_heuristics())
@triton.jit
def _nll_rows_kernel(
    # pointers
    logits_ptr,                   # [C, V] input dtype: raw logits a in, ∂L/∂a out
    b_ptr, targets_ptr,           # bias [V] or None, targets [C] int64
    scale_ptr,                    # float32 [1]: the loss's normalisation (1/count, or 1)
    nll_ptr,                      # float32 [C] out: the row's NLL (0 on ignored rows)
    entropy_ptr, argmax_ptr,      # float32 [C], int64 [C] out: metrics, no gradient (0 if ignored)
    # shapes and strides (the last dimension of the logits is contiguous)
    V, stride_ln,
    # scalars
    inv_temperature, softcap, ignore_index,
    # meta-parameters
    BLOCK_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_V: tl.constexpr,
):
    row, row_ptr, target = program_row(logits_ptr, stride_ln, targets_ptr)
    offs = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        # No loss and no gradient; the logits of a padding row may be NaN, so they are
        # overwritten, never multiplied by 0.
        for v0 in range(0, V, BLOCK_V):
            tl.store(row_ptr + v0 + offs, tl.zeros([BLOCK_V], dtype=tl.float32)
                     .to(logits_ptr.dtype.element_ty), mask=(v0 + offs) < V)
        tl.store(nll_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(argmax_ptr + row, 0)
    else:
        # Pass 1: the log-sum-exp, one running (max, Σ e^{z − max}) per lane, merged at the end,
        # and the column of each lane's max (the first, as lanes see their columns in order).
        m = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_V], dtype=tl.float32)
        best = tl.zeros([BLOCK_V], dtype=tl.int64)
        z_target = 0.0
        for v0 in range(0, V, BLOCK_V):
            z, _ = scaled_row(row_ptr, b_ptr, v0, offs, V, inv_temperature, softcap,
                               HAS_BIAS, HAS_SOFTCAP, EVEN_V)
            z_target += tl.sum(tl.where(v0 + offs == target, z, 0.0), axis=0)
            best = tl.where(z > m, (v0 + offs).to(tl.int64), best)
            m_new = tl.maximum(m, z)
            # A lane that has seen only padding keeps m = −inf; shifting it by 0 rather than by
            # −inf gives e^{−inf} = 0 instead of e^{−inf − (−inf)} = NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.exp(z - shift)
            m = m_new
        m_row = tl.max(m, axis=0)  # finite: every row has a real column
        s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
        lse = m_row + tl.log(s_row)
        # lse − z_y ≥ 0 exactly; the rounding of the two must not make a probability exceed 1.
        tl.store(nll_ptr + row, tl.maximum(lse - z_target, 0.0))
        tl.store(argmax_ptr + row, tl.min(tl.where(m == m_row, best, V), axis=0))

        # Pass 2: ∂L/∂a_v = scale·(p_v − 1[v = y])·∂z/∂a, over the same bits of z.
        # The entropy −Σ p·(z − lse) on the way: terms of one sign, no cancellation.
        scale = tl.load(scale_ptr)
        entropy = tl.zeros([BLOCK_V], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            z, dz_da = scaled_row(row_ptr, b_ptr, v0, offs, V, inv_temperature, softcap,
                                   HAS_BIAS, HAS_SOFTCAP, EVEN_V)
            p = tl.exp(z - lse)
            entropy += p * tl.where(v0 + offs < V, lse - z, 0.0)  # not 0·inf past V
            grad = (p - tl.where(v0 + offs == target, 1.0, 0.0)) * (dz_da * scale)
            tl.store(row_ptr + v0 + offs, grad.to(logits_ptr.dtype.element_ty),
                     mask=(v0 + offs) < V)
        tl.store(entropy_ptr + row, tl.sum(entropy, axis=0))


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def linear_nll_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    scale: torch.Tensor, temperature: float, softcap: float, ignore_index: int,
    compute_dhidden: bool, compute_dweight: bool, compute_dbias: bool,
) -> tuple[torch.Tensor, ...]:
    """(nll, entropy, argmax, dhidden, dweight, dbias) from hidden [N, H] and weight [V, H].

    nll and entropy are float32 [N], argmax int64 [N] (the first column of the largest logit;
    all three 0 on ignored tokens). The gradients are those of ``scale · Σ_n nll_n`` (``scale``
    a float32 [1] tensor, read on the device: no synchronisation), each in its input's dtype
    and accumulated in float32 (dW, db), or None when not asked for. ``softcap`` 0.0 means none.
    At least one gradient must be asked for (a loss alone is linear_logprobs' forward, a third
    of the work).
    """
    _launch.check_head_layout(hidden, weight, bias)
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    _launch.check_layout("targets", targets, torch.int64, (n_tokens,))
    _launch.check_layout("scale", scale, torch.float32, (1,))
    _launch.check_one_device(hidden, weight, bias, targets, scale)
    compute_dbias = compute_dbias and bias is not None
    if not (compute_dhidden or compute_dweight or compute_dbias):
        raise ValueError("linear_nll_forward computes gradients: ask for at least one")
    device = hidden.device
    per_row = (torch.zeros(n_tokens, dtype=torch.float32, device=device),
               torch.zeros(n_tokens, dtype=torch.float32, device=device),
               torch.zeros(n_tokens, dtype=torch.int64, device=device))
    if n_tokens == 0:
        return (*per_row, torch.zeros_like(hidden) if compute_dhidden else None,
                torch.zeros_like(weight) if compute_dweight else None,
                torch.zeros_like(bias) if compute_dbias else None)
    bias_k, targets_k = _launch.aligned(bias), _launch.aligned(targets)

    def fill(start: int, end: int, dlogits: torch.Tensor) -> None:
        torch.mm(hidden[start:end], weight.T, out=dlogits)
        rows = [x[start:end] for x in per_row]
        kernel_rows = [_launch.aligned(x) for x in rows]  # copies if off a 16-byte boundary
        with _launch.device_guard(device):
            _nll_rows_kernel[(end - start,)](
                dlogits, bias_k, _launch.aligned(targets_k[start:end]), scale, *kernel_rows,
                vocab_size, dlogits.stride(0),
                1.0 / float(temperature), float(softcap), int(ignore_index),
                BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
            )
        for out, written in zip(rows, kernel_rows):
            if written is not out:
                out.copy_(written)

    head = _launch.HeadGrads(hidden, weight, bias, compute_dhidden, compute_dweight,
                             compute_dbias)
    # 5% of eager's logits and their gradient (two copies), as the other implementations.
    _launch.head_grads_in_chunks([head], fill, rows_with_grad=targets != ignore_index,
                                 eager_logit_copies=2)
    return (*per_row, head.dh, head.dw, head.db)
