"""``linear_nll``: the NLL loss of the targets from (hidden, LM head), its gradients formed in the
forward pass.

Layer 2 of fastalign: the argument checks, the dispatch to the kernels (the autograd end is
``_formed_grads``), a chunked plain-PyTorch implementation and the materialising reference. The
kernels are ``fastalign.kernels.linear_nll`` (Triton) and the C++ row passes of the sequence-loss
engine (``csrc/sequence_rows_cpu.cpp``) between oneDNN's products (``_chunked.product_nt``;
MKL's with ``FASTALIGN_CPU_MATMUL=torch``).

Why: ``linear_logprobs`` cannot know its upstream gradient in forward, so its backward recomputes
the logits: 2·N·H·V FLOPs forward + 6·N·H·V backward. A scalar loss whose upstream gradient is a
known multiple of one (SFT's mean NLL; any scalar ``g``, since the gradients are linear in it)
needs 6·N·H·V: per chunk of tokens, the logits (2·C·H·V), their softmax and ∂L/∂logits in place,
then dh and dW from two matrix products (4·C·H·V). Backward only multiplies the saved gradients
by g. ``docs/ALGORITHMS.md`` §1.

Every implementation has one contract, on flattened, contiguous inputs::

    forward(hidden[N, H], weight[V, H], bias[V] | None, targets[N] int64,
            scale[1] (float32; float64 for float64 inputs),
            temperature, softcap (0 = none), ignore_index,
            compute_dhidden, compute_dweight, compute_dbias)
        -> (nll[N], entropy[N], argmax[N] int64, dhidden | None, dweight | None, dbias | None)
           # nll, entropy: float32 (float64 for float64 inputs); all three 0 on ignored tokens

with the gradients those of ``scale · Σ_n nll_n``, each in its input's dtype (dW and db
accumulated in float32), and at least one of them asked for. The entropy of softmax(z) and the
arg-max of z (its first column) come from the pass over each row that the loss makes anyway:
SFT's metrics at no extra matrix product.

The cost of knowing the gradients early: dh, dW (and db) are held from forward until backward
(N·H + V·H entries in the input dtype; dW is the size of the head's ``.grad``, which training
holds anyway).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastalign.kernels import _chunked
from fastalign.ops._backends import IMPLEMENTATIONS, resolve_impl
from fastalign.ops._checks import check_bool, check_choice, check_positive, check_token_range
from fastalign.ops._formed_grads import GradientsFormedInForward
from fastalign.ops._row_passes import ROW_PASSES
from fastalign.ops.linear_argmax import linear_argmax
from fastalign.ops.linear_logprobs import (
    check_linear_logprobs_args,
    compute_linear_logprobs,
    linear_logprobs_reference,
)

__all__ = ["linear_nll", "linear_nll_reference"]

REDUCTIONS = ("mean", "sum", "none")
# Eager cross-entropy holds the float32 logits and their gradient at once: the default chunk
# workspace is 5% of those two copies (``_chunked.chunk_rows``).
GRADS_IN_FORWARD_EAGER_COPIES = 2
# "torch": the chunked algorithm in plain PyTorch, what "auto" runs where no kernel can.
NLL_IMPLEMENTATIONS = (*IMPLEMENTATIONS, "torch")


# ----------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------


def _kernel(impl: str) -> Callable:
    """The forward entry point of an implementation (the contract in the module docstring)."""
    if impl == "triton":
        # Imported on first use, as in linear_logprobs: TRITON_INTERPRET is read at decoration.
        from fastalign.kernels.linear_nll import linear_nll_forward

        return linear_nll_forward
    if impl == "cpp":
        return _cpp_forward
    return torch_linear_nll_forward


def _cpp_forward(hidden, weight, bias, targets, scale, temperature, softcap, ignore_index,
                 compute_dhidden, compute_dweight, compute_dbias):
    """The C++ row passes of the sequence-loss engine (``csrc/sequence_rows_cpu.cpp``:
    vectorised, rows spread over threads) between oneDNN's (or MKL's) products, chunk by chunk,
    over the scored rows only; the logits and the softmax in float32 (float64 for float64
    inputs)."""
    rows_pass = ROW_PASSES["cpp"]
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n_tokens = hidden.shape[0]
    nll, entropy = (torch.zeros(n_tokens, dtype=compute) for _ in range(2))
    argmax = torch.zeros(n_tokens, dtype=torch.int64)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    every_row = rows.numel() == n_tokens  # then no copy of hidden in, nor of dh out
    scored = targets if every_row else targets.index_select(0, rows)
    head = _chunked.HeadGrads(
        (hidden if every_row else hidden.index_select(0, rows)).to(compute),
        weight.to(compute).contiguous(),
        None if bias is None else bias.to(compute).contiguous(),
        compute_dhidden, compute_dweight, compute_dbias)
    grad_logp = -scale.to(compute)  # ∂(scale · Σ nll)/∂logp, the same for every row
    allocate = _chunked.fill_allocates_tiles(hidden.device, compute)

    def fill(start: int, end: int, tile: torch.Tensor | None = None) -> list[torch.Tensor]:
        tile = _chunked.chunk_logits(head.hidden[start:end], head.weight, tile)
        chunk_targets = scored[start:end]
        stats = rows_pass.stats(tile, head.bias, chunk_targets, temperature, softcap)
        chunk_rows = rows[start:end]
        nll[chunk_rows] = -stats.logp
        entropy[chunk_rows] = stats.entropy
        # The softcap and temperature are increasing: the raw logits' arg-max is z's (where a
        # softcap saturates, the largest raw logit among columns of equal z).
        argmax[chunk_rows] = (tile if head.bias is None else tile + head.bias).argmax(1)
        rows_pass.grad(tile, head.bias, chunk_targets, stats,
                       grad_logp.expand(end - start).contiguous(), None, temperature, softcap)
        return [tile]

    _chunked.head_grads_in_chunks([head], fill, aligned_rows=False,
                                  eager_logit_copies=GRADS_IN_FORWARD_EAGER_COPIES,
                                  fill_allocates=allocate)
    dh = head.dh
    if dh is not None:
        dh = dh.to(hidden.dtype) if every_row else torch.zeros_like(hidden).index_copy_(
            0, rows, dh.to(hidden.dtype))
    return (nll, entropy, argmax, dh, None if head.dw is None else head.dw.to(weight.dtype),
            None if head.db is None else head.db.to(bias.dtype))


def torch_linear_nll_forward(hidden, weight, bias, targets, scale, temperature, softcap,
                             ignore_index, compute_dhidden, compute_dweight, compute_dbias):
    """The contract's forward in plain PyTorch, chunk by chunk (the workspace budget of
    ``_chunked.chunk_rows``): where neither kernel can run, and a check on both."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    nll, entropy = (torch.zeros(hidden.shape[0], dtype=compute, device=hidden.device)
                    for _ in range(2))
    argmax = torch.zeros(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    valid = targets != ignore_index
    inv_t = 1.0 / temperature

    def fill(start: int, end: int, dlogits: torch.Tensor) -> None:
        rows_valid = valid[start:end, None]
        safe = torch.where(rows_valid, targets[start:end, None], 0)
        a = _chunked.product_nt(hidden[start:end], weight).to(compute)
        if bias is not None:
            a += bias
        if softcap:
            th = a.div_(softcap).tanh_()
            dz_da = torch.square(th).neg_().add_(1.0).mul_(inv_t)  # (1 − tanh²)/T
            z = th.mul_(softcap * inv_t)
        else:
            dz_da, z = inv_t, a.mul_(inv_t)
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        row_nll = (lse - z.gather(1, safe)).clamp_(min=0.0)  # z_y ≤ lse exactly
        nll[start:end] = row_nll.masked_fill_(~rows_valid, 0.0).squeeze(1)
        argmax[start:end] = z.argmax(dim=1).masked_fill_(~rows_valid[:, 0], 0)
        log_p = z.sub_(lse)
        grad = log_p.exp()
        entropy[start:end] = log_p.mul_(grad).sum(1).neg_().masked_fill_(~rows_valid[:, 0], 0.0)
        grad.scatter_add_(1, safe, -rows_valid.to(compute))  # p − 1[v = y]
        grad.mul_(dz_da).mul_(scale)
        dlogits.copy_(grad.masked_fill_(~rows_valid, 0.0))  # NaN padding rows too

    head = _chunked.HeadGrads(hidden, weight, bias, compute_dhidden, compute_dweight,
                              compute_dbias)
    # fill's own temporaries: the float32 logits, ∂z/∂a with a softcap, and logsumexp's.
    _chunked.head_grads_in_chunks([head], fill, rows_with_grad=valid,
                                  fill_bytes_per_logit=3 * torch.finfo(compute).bits // 8,
                                  eager_logit_copies=GRADS_IN_FORWARD_EAGER_COPIES)
    return nll, entropy, argmax, head.dh, head.dw, head.db


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------


def _check_num_items(num_items_in_batch, reduction: str):
    if num_items_in_batch is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch normalises reduction='mean', got reduction="
                         f"{reduction!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got "
                             f"shape {tuple(num_items_in_batch.shape)}")
        return num_items_in_batch  # its value stays on the device: no synchronisation
    return check_positive("num_items_in_batch", num_items_in_batch)


def linear_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    impl: str = "auto",
    return_metrics: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``targets`` under the LM head, gradients formed in the forward pass.

    With ``z = softcap·tanh((h·Wᵀ + b)/softcap) / temperature`` (softcap optional) and
    ``nll = logsumexp(z) − z[y]`` per token, returns:

    * ``"mean"``: Σ nll over the tokens not equal to ``ignore_index``, divided by their count
      (a batch with none gives 0 and zero gradients, as transformers' ``num_items_in_batch``
      path, rather than NaN), or by ``num_items_in_batch`` when given (transformers' gradient
      accumulation: every micro-batch normalised by the whole step's token count);
    * ``"sum"``: Σ nll;
    * ``"none"``: the per-token nll (0 at ignored tokens). Its upstream gradient is not known in
      forward, so this is ``-linear_logprobs``, gradients by recomputation in backward
      (8·N·H·V FLOPs rather than 6).

    For "mean" and "sum", forward computes the loss and the gradients of the inputs that require
    them (none under ``torch.no_grad``: then only the 2·N·H·V forward runs) in 6·N·H·V FLOPs,
    chunk of tokens by chunk (``FASTALIGN_BACKWARD_WORKSPACE_MIB`` sets the chunks' workspace;
    by default 5% of the N×V float32 logits); backward multiplies them by the upstream gradient.
    No [N, V] tensor is formed.

    Args:
        hidden: [..., H] hidden states, float32 / bfloat16 / float16 (float64 on CPU).
        weight: [V, H] LM-head weight, same dtype as ``hidden``.
        targets: [...] integer ids with the leading shape of ``hidden``.
        reduction: "mean", "sum" or "none".
        bias: optional [V] head bias, same dtype as ``weight``.
        temperature: divides the (softcapped) logits; > 0.
        softcap: optional final-logit softcap (Gemma 2 uses 30.0); > 0.
        ignore_index: targets equal to this contribute nothing.
        num_items_in_batch: with ``reduction="mean"``, the divisor instead of the count of
            scored tokens: a number > 0 or a one-element tensor (read on the device).
        impl: "auto" (Triton on CUDA, the C++ kernel on CPU, else "torch"), "triton", "cpp",
            "torch" (the chunked algorithm in plain PyTorch) or "reference" (materialising).
        return_metrics: also return, per token and without gradient, the entropy of softmax(z)
            and the arg-max of the logits (SFT's metrics; 0 at ignored tokens). With gradients
            they come from the loss's own pass over each row; without (no_grad, "none"), from
            linear_logprobs' and linear_argmax's forward passes.

    Returns:
        A scalar (the shape of ``targets`` for "none"), float32 (float64 for float64 inputs);
        with ``return_metrics``, ``(loss, entropy, argmax)``, the last two shaped like
        ``targets``. Gradients reach ``hidden``, ``weight`` and ``bias`` in their dtypes,
        accumulated in float32.
    """
    check_linear_logprobs_args(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    num_items_in_batch = _check_num_items(num_items_in_batch, reduction)
    check_choice("impl", impl, NLL_IMPLEMENTATIONS)
    check_bool("return_metrics", return_metrics)
    chosen = impl if impl == "torch" else resolve_impl(impl, hidden.device, hidden.dtype)
    if impl == "auto" and chosen == "reference":
        chosen = "torch"
    check_token_range("targets", targets, weight.shape[0], ignore_index)
    temperature = float(temperature)
    softcap = None if softcap is None else float(softcap)
    options = dict(bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index)

    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias))
    if chosen == "reference" or targets.numel() == 0 or reduction == "none" or not wants_grad:
        # Without gradients to form, linear_logprobs' forward is all there is to do.
        logp_impl = "reference" if chosen in ("torch", "reference") else chosen
        nll, entropy = compute_linear_logprobs(hidden, weight, targets, return_entropy=True,
                                               impl=logp_impl, **options)
        nll = -nll
        loss = nll if reduction == "none" else _reduce(nll.sum(), targets, reduction,
                                                       num_items_in_batch, ignore_index)
        if not return_metrics:
            return loss
        with torch.no_grad():
            argmax = linear_argmax(hidden.detach(), weight.detach(), bias=bias,
                                   temperature=temperature, softcap=softcap)
            argmax = argmax.masked_fill(targets == ignore_index, 0)
        return loss, entropy.detach(), argmax

    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    scale = _normalisation(targets, reduction, num_items_in_batch, ignore_index, compute)
    with torch.no_grad():
        nll, entropy, argmax, dh, dw, db = _kernel(chosen)(
            hidden.detach().reshape(-1, hidden.shape[-1]).contiguous(),
            weight.detach().contiguous(), None if bias is None else bias.detach().contiguous(),
            targets.reshape(-1).to(torch.int64).contiguous(), scale.reshape(1).contiguous(),
            temperature, 0.0 if softcap is None else softcap, ignore_index,
            hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        loss = nll.sum() * scale.reshape(())
    loss = GradientsFormedInForward.apply(hidden, weight, bias, loss,
                                          None if dh is None else dh.view_as(hidden), dw, db)
    if not return_metrics:
        return loss
    return loss, entropy.view(targets.shape), argmax.view(targets.shape)


def _normalisation(targets, reduction, num_items_in_batch, ignore_index, dtype) -> torch.Tensor:
    """The factor of Σ nll that makes the loss: 1, 1/(scored tokens, at least 1) or
    1/num_items_in_batch, as a tensor on the targets' device (no synchronisation)."""
    one = torch.ones((), dtype=dtype, device=targets.device)
    if reduction == "sum":
        return one
    if num_items_in_batch is None:
        return one / (targets != ignore_index).sum().clamp(min=1).to(dtype)
    if isinstance(num_items_in_batch, torch.Tensor):
        return one / num_items_in_batch.to(device=targets.device, dtype=dtype).reshape(())
    return one / num_items_in_batch


def _reduce(total, targets, reduction, num_items_in_batch, ignore_index) -> torch.Tensor:
    return total * _normalisation(targets, reduction, num_items_in_batch, ignore_index,
                                  total.dtype)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def linear_nll_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``linear_nll`` through materialised logits (``compute_dtype``: float32 by default, float64
    for float64 inputs), with plain autograd."""
    nll = -linear_logprobs_reference(hidden, weight, targets, bias=bias, temperature=temperature,
                                     softcap=softcap, ignore_index=ignore_index,
                                     compute_dtype=compute_dtype)
    if reduction == "none":
        return nll
    return _reduce(nll.sum(), targets, reduction, num_items_in_batch, ignore_index)
