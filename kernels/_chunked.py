"""The chunked head gradients: ∂L/∂logits of a chunk of tokens in a bounded workspace, turned
into dh, dW and db by matrix products (cuBLAS on CUDA; on CPU oneDNN for float32, see
``product_nt``, MKL otherwise).

Shared by the Triton launchers (the chunked backward of ``linear_logprobs`` and ``linear_kl``,
the forward of ``linear_nll``) and by ``linear_nll``'s plain-PyTorch implementation, which must
run where triton is not installed: so nothing here imports triton.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import torch

# The JIT marks a pointer argument 16-byte aligned, and an integer argument divisible by 16, when
# they are: what the kernels' H-loops need to vectorise and pipeline their loads (see
# ``_launch.kernel_head``).
ALIGNMENT = 16
# The default workspace: this fraction of what eager autograd holds for the logits alone
# (N × V float32), and never fewer rows than one chunk of this many tokens, below which the
# matrix products stop filling the tensor cores (at small N the bytes do not matter).
WORKSPACE_FRACTION = 0.05
MIN_CHUNK_ROWS = 64


# ----------------------------------------------------------------------------------------------
# The products on CPU
# ----------------------------------------------------------------------------------------------

# torch sends float32 torch.mm to MKL. On AMD CPUs MKL takes its AVX2 path, and its product with
# the head's [V, H] weight transposed (the logits) ran at 0.10 TFLOP/s on a 2-core AMD EPYC VM
# (2026-12-03) where oneDNN, which torch ships for its own fused CPU linear layers and which
# picks its kernels by the CPU's features, ran the same product at 0.18 (dh: 0.13 against 0.17;
# same float32 arithmetic, another order of summation). Its entry point writes a new tensor (no
# ``out=``): the chunked loops below let ``fill`` allocate the tile instead of filling ours.
CPU_MATMUL_ENV = "FASTALIGN_CPU_MATMUL"
CPU_MATMULS = ("auto", "onednn", "torch")


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_linear_pointwise")


def cpu_matmul() -> str:
    """Which library multiplies the chunked products of float32 tensors on CPU: "onednn"
    (``torch.ops.mkldnn._linear_pointwise``) where torch has it, else "torch" (``torch.mm``,
    MKL); ``FASTALIGN_CPU_MATMUL`` = auto | onednn | torch chooses."""
    choice = os.environ.get(CPU_MATMUL_ENV, "auto")
    if choice not in CPU_MATMULS:
        raise ValueError(f"{CPU_MATMUL_ENV} must be one of {', '.join(CPU_MATMULS)}, got "
                         f"{choice!r}")
    available = _onednn_linear_available()
    if choice == "onednn" and not available:
        raise ValueError(f"{CPU_MATMUL_ENV}=onednn, but this torch has no oneDNN linear "
                         "(torch.backends.mkldnn.is_available() is False)")
    return "onednn" if choice != "torch" and available else "torch"


def fill_allocates_tiles(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether oneDNN multiplies tensors of this device and dtype (float32 on CPU, per
    ``cpu_matmul``), so that a chunk's tile of logits comes from ``product_nt`` (a new tensor
    each chunk: ``head_grads_in_chunks(fill_allocates=True)``) rather than ``torch.mm(out=)``
    into one workspace."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and \
        cpu_matmul() == "onednn"


def product_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ bᵀ as a new tensor, for 2-D a [n, k] and b [m, k] (any strides): the logits
    hidden @ Wᵀ of a chunk, or with b = Wᵀ the chunk's dh. oneDNN on CPU for float32
    (``cpu_matmul``), torch.mm elsewhere."""
    if fill_allocates_tiles(a.device, a.dtype) and a.shape[0] > 0:
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return torch.mm(a, b.T)


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor,
                 tile: torch.Tensor | None) -> torch.Tensor:
    """A chunk's raw logits hidden @ Wᵀ: into ``tile`` (``torch.mm(out=)``), or with None a new
    tensor from ``product_nt`` (a ``fill`` under ``fill_allocates``); returns the tile."""
    if tile is None:
        return product_nt(hidden, weight)
    return torch.mm(hidden, weight.T, out=tile)


def float32_accumulator(wanted: bool, shape: tuple[int, ...], device: torch.device,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """A zeroed float32 gradient accumulator (the kernels add into it atomically), or None."""
    return torch.zeros(shape, dtype=dtype, device=device) if wanted else None


def chunk_rows(n_tokens: int, vocab_size: int, row_bytes: int,
               eager_logit_copies: int = 1) -> int:
    """Tokens per chunk of the chunked backward, whose workspace takes ``row_bytes`` a token.

    ``FASTALIGN_BACKWARD_WORKSPACE_MIB`` sets the workspace; by default it is WORKSPACE_FRACTION
    of what eager holds: ``eager_logit_copies`` N × V float32 tensors (at least MIN_CHUNK_ROWS
    tokens). One copy, the logits alone, for the backward of a per-token op; two for a loss
    whose gradients are formed in forward (linear_nll, the fused loss modules), whose eager
    counterpart holds the logits and their gradient at once (our benchmarks measure 2.3 copies
    for eager cross-entropy): fewer, larger chunks keep the matrix products efficient.
    """
    budget = os.environ.get("FASTALIGN_BACKWARD_WORKSPACE_MIB")
    if budget is not None:
        try:
            budget_bytes = float(budget) * 2**20
        except ValueError:
            budget_bytes = -1.0
        if not budget_bytes > 0:
            raise ValueError("FASTALIGN_BACKWARD_WORKSPACE_MIB must be a positive number of MiB, "
                             f"got {budget!r}")
        rows = int(budget_bytes // max(row_bytes, 1))
    else:
        eager_bytes = eager_logit_copies * n_tokens * vocab_size * 4
        rows = max(MIN_CHUNK_ROWS, int(WORKSPACE_FRACTION * eager_bytes // max(row_bytes, 1)))
        rows -= rows % ALIGNMENT  # chunks then start on aligned rows: no copies (``aligned``)
    return max(1, min(n_tokens, rows))


@dataclasses.dataclass
class HeadGrads:
    """One head's part of a chunked backward: its inputs, which gradients it wants, and (after
    ``head_grads_in_chunks``) the gradients, in the inputs' dtypes."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    want_dh: bool
    want_dw: bool
    want_db: bool
    dh: torch.Tensor | None = None
    dw: torch.Tensor | None = None
    db: torch.Tensor | None = None

    @property
    def wanted(self) -> bool:
        return self.want_dh or self.want_dw or (self.want_db and self.bias is not None)


def head_grads_in_chunks(heads: Sequence[HeadGrads], fill: Callable[..., object],
                         rows_with_grad: torch.Tensor | None = None,
                         fill_bytes_per_logit: int = 0,
                         bounds: Sequence[tuple[int, int]] | None = None,
                         aligned_rows: bool = True, eager_logit_copies: int = 1,
                         fill_allocates: bool = False) -> None:
    """Fill each head's dh, dW, db, chunk of tokens by chunk of tokens.

    ``fill(start, end, *workspaces)`` launches the kernel that writes ∂L/∂a of tokens
    [start, end) into each head's workspace ([end − start, V] in the input dtype, None for a head
    that wants no gradient), 0 wherever there is no gradient. Then dh[start:end] = ∂L/∂a · W and
    dW += (∂L/∂a)ᵀ · h[start:end] (float32), db += Σ_rows ∂L/∂a. ``rows_with_grad`` (bool [N]):
    rows outside it have ∂L/∂a = 0, and their hidden state is left out of dW (a NaN in a padding
    row must not enter as 0·NaN). ``fill_bytes_per_logit``: the temporaries ``fill`` itself holds
    per logit of a chunk, counted in the workspace budget. ``bounds``: the chunks as (start, end)
    pairs covering [0, N) in order, for a caller whose chunks must hold whole sequences (the
    workspace is then as large as the largest); by default equal chunks within the budget.
    ``aligned_rows=False``: contiguous workspace rows, for a ``fill`` that needs them so.
    ``eager_logit_copies``: as in ``chunk_rows``. ``fill_allocates``: no workspace is allocated
    here; ``fill(start, end)`` returns each head's ∂L/∂a tile (a tensor it allocated, or None),
    dropped before the next chunk's (``fill_allocates_tiles``: oneDNN's products on CPU).
    """
    active = [head for head in heads if head.wanted]
    if not active:
        return
    n_tokens, vocab_size = heads[0].hidden.shape[0], heads[0].weight.shape[0]
    device, dtype = heads[0].hidden.device, heads[0].hidden.dtype
    row_bytes = vocab_size * (dtype.itemsize * len(active) + fill_bytes_per_logit)
    if bounds is None:
        chunk = chunk_rows(n_tokens, vocab_size, row_bytes, eager_logit_copies)
        bounds = [(start, min(start + chunk, n_tokens)) for start in range(0, n_tokens, chunk)]
    chunk = max((end - start for start, end in bounds), default=0)
    # Rows padded to a multiple of ALIGNMENT entries, so that every row of the workspace starts
    # on a 16-byte boundary (vectorised stores in the kernel; cuBLAS takes the leading dimension).
    padded_vocab = -(-vocab_size // ALIGNMENT) * ALIGNMENT if aligned_rows else vocab_size
    workspaces = {} if fill_allocates else {
        id(head): torch.empty((chunk, padded_vocab), dtype=dtype, device=device)[:, :vocab_size]
        for head in active}
    dw32, db32 = {}, {}
    for head in active:
        if head.want_dh:
            head.dh = torch.empty_like(head.hidden)
        # float32, or float64 for float64 inputs (the float64 checks of every op run through here)
        accumulate = torch.float64 if dtype == torch.float64 else torch.float32
        dw32[id(head)] = float32_accumulator(head.want_dw, tuple(head.weight.shape), device,
                                             accumulate)
        db32[id(head)] = float32_accumulator(head.want_db and head.bias is not None,
                                             (vocab_size,), device, accumulate)
    for start, end in bounds:
        if fill_allocates:
            chunk_ws = list(fill(start, end))
        else:
            chunk_ws = [workspaces[id(h)][:end - start] if h.wanted else None for h in heads]
            fill(start, end, *chunk_ws)
        for head, grad in zip(heads, chunk_ws):
            if grad is None:
                continue
            if head.want_dh:  # one product over the whole vocabulary: one rounding per entry
                if fill_allocates_tiles(grad.device, grad.dtype):
                    head.dh[start:end] = product_nt(grad, head.weight.T)
                else:
                    torch.mm(grad, head.weight, out=head.dh[start:end])
            if dw32[id(head)] is not None:
                rows = head.hidden[start:end]
                if rows_with_grad is not None:
                    rows = rows.masked_fill(~rows_with_grad[start:end, None], 0.0)
                addmm_float32(dw32[id(head)], grad.T, rows)
            if db32[id(head)] is not None:
                db32[id(head)] += grad.sum(dim=0, dtype=db32[id(head)].dtype)
        chunk_ws = grad = None  # a tile fill allocated: freed before the next one is made
    for head in active:
        if dw32[id(head)] is not None:
            head.dw = dw32[id(head)].to(head.weight.dtype)
        if db32[id(head)] is not None:
            head.db = db32[id(head)].to(head.bias.dtype)


def addmm_float32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b into a float32 ``acc``, the product never rounded to a 16-bit dtype (each
    chunk's share of dW rounded to bfloat16 before the sum would lose the small ones)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":  # cuBLAS: 16-bit operands, float32 accumulator and output
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())
