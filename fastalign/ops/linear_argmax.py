"""``linear_argmax`` and ``linear_logit_stats``: per-row statistics of the head's logits that
metrics need, straight from (hidden, LM head), without gradient.

Layer 2 of fastalign, without kernels of its own: one pass over tiles of rows and vocabulary
entries of ``hidden @ weight.T + bias``, so that memory stays bounded by one
[block_rows × block_vocab] tile and never grows with N × V. What a pass can gather:

* the arg-max over the vocabulary (SFT's ``mean_token_accuracy``: is the label the top-1 token);
* the mean of the logits z over the vocabulary (TRL's ``logits/chosen`` metrics);
* log Σ_v p_v², the log of the probability that two samples agree (WPO's weights), as
  logsumexp(2z) − 2·logsumexp(z), both accumulated online as in a softmax.

``linear_argmax_reference`` and ``linear_logit_stats_reference`` materialise the logits, for
tests.

Which head options can move the arg-max: of the conventions ``linear_logprobs`` takes
(z = softcap·tanh((h·Wᵀ + b)/softcap) / temperature, a model's logit scale folded into the
temperature), only the **bias** can, since it shifts each vocabulary entry by a different
amount. Temperature and logit scale are positive factors common to every entry, and softcap's
``c·tanh(a/c)`` is strictly increasing in ``a``: all three preserve the order of the logits, so
the arg-max is taken on the raw scores h·Wᵀ + b. Applied in floating point, a softcap would round
large, distinct logits to equal values (tanh saturates) and create ties that the exact
distribution does not have. The mean and log Σ p² do depend on temperature and softcap, and
apply them.

Ties: the lowest vocabulary index among equal maxima wins, as in ``torch.argmax`` (each tile
keeps its first maximum, and a later tile replaces the running best only when strictly greater).
A row whose scores hold NaN gets an unspecified index.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastalign.ops._checks import (
    check_field_int,
    check_head,
    check_positive,
    check_same_device,
)

__all__ = ["LogitStats", "linear_argmax", "linear_argmax_reference", "linear_logit_stats",
           "linear_logit_stats_reference"]

# One tile of float32 scores: 1024 × 4096 × 4 bytes = 16 MiB, whatever N and V are.
BLOCK_ROWS = 1024
BLOCK_VOCAB = 4096


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Scores of bfloat16/float16 inputs are kept in float32: rounded to 8 bits of mantissa, many
    # distinct logits would tie. Products of two bf16/fp16 numbers are exact in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


class LogitStats(NamedTuple):
    """What ``linear_logit_stats`` gathered; a field not asked for is None. Shapes: the leading
    shape of ``hidden``."""

    argmax: torch.Tensor | None  # int64 vocabulary ids, ties to the lowest
    mean_logits: torch.Tensor | None  # mean_v z_v (float32; float64 for float64 inputs)
    log_sum_sq_probs: torch.Tensor | None  # log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z)


@torch.no_grad()
def linear_argmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    block_rows: int = BLOCK_ROWS,
    block_vocab: int = BLOCK_VOCAB,
) -> torch.Tensor:
    """argmax_v (h·Wᵀ + b)_v for each row of ``hidden``, without materialising the logits.

    Args:
        hidden: [..., H] hidden states, float32 / bfloat16 / float16 / float64, any strides.
        weight: [V, H] LM-head weight, same dtype as ``hidden``.
        bias: optional [V] head bias, same dtype as ``weight``.
        temperature, softcap: the head's options as ``linear_logprobs`` takes them; checked, and
            without effect on the result (see the module docstring).
        block_rows, block_vocab: the tile of scores held at a time (float32, or float64 for
            float64 inputs).

    Returns:
        int64 [...] vocabulary ids (the leading shape of ``hidden``); ties go to the lowest id.
    """
    return linear_logit_stats(hidden, weight, bias=bias, temperature=temperature,
                              softcap=softcap, argmax=True, block_rows=block_rows,
                              block_vocab=block_vocab).argmax


@torch.no_grad()
def linear_logit_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    argmax: bool = False,
    mean_logits: bool = False,
    log_sum_sq_probs: bool = False,
    block_rows: int = BLOCK_ROWS,
    block_vocab: int = BLOCK_VOCAB,
) -> LogitStats:
    """The asked-for statistics of z = softcap·tanh((h·Wᵀ + b)/softcap)/temperature per row of
    ``hidden``, in one streaming pass (see the module docstring); arguments as ``linear_argmax``.
    """
    check_head("", hidden, weight, bias)
    check_positive("temperature", temperature)
    check_positive("softcap", softcap, optional=True)
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    check_field_int("block_rows", block_rows, minimum=1)
    check_field_int("block_vocab", block_vocab, minimum=1)
    dtype = _compute_dtype(hidden.dtype)
    rows = hidden.reshape(-1, hidden.shape[-1])
    n_rows, device = rows.shape[0], hidden.device
    best_index = torch.zeros(n_rows, dtype=torch.int64, device=device)
    logit_sum = torch.zeros(n_rows, dtype=dtype, device=device)
    running_max = torch.full((n_rows,), -torch.inf, dtype=dtype, device=device)
    sum_exp = torch.zeros(n_rows, dtype=dtype, device=device)  # Σ exp(z − max)
    sum_exp2 = torch.zeros(n_rows, dtype=dtype, device=device)  # Σ exp(2(z − max))
    # Without a softcap the mean logit is linear in h: (h·Σ_v W_v + Σ_v b_v) / (V·temperature),
    # one matrix-vector product instead of a sum over every tile.
    linear_mean = mean_logits and softcap is None
    if linear_mean:
        logit_sum = rows.to(dtype) @ weight.sum(0, dtype=dtype)
        if bias is not None:
            logit_sum += bias.sum(dtype=dtype)
        logit_sum /= float(temperature)
    if not (argmax or log_sum_sq_probs or (mean_logits and not linear_mean)):
        n_rows = 0  # nothing left to stream
    # One score tile, reused: allocating a fresh 16 MiB tile per step lets the heap grow
    # (freed tiles stay resident where the allocator does not reuse them in place).
    tile = torch.empty(min(n_rows, block_rows) * min(weight.shape[0], block_vocab), dtype=dtype,
                       device=device)
    for row in range(0, n_rows, block_rows):
        block = rows[row:row + block_rows].to(dtype)
        best = torch.full((block.shape[0],), -torch.inf, dtype=dtype, device=device)
        index = best_index[row:row + block_rows]  # views: filled in place
        m, s1, s2 = (t[row:row + block_rows] for t in (running_max, sum_exp, sum_exp2))
        for start in range(0, weight.shape[0], block_vocab):
            head = weight[start:start + block_vocab].to(dtype)
            scores = tile[:block.shape[0] * head.shape[0]].view(block.shape[0], head.shape[0])
            torch.mm(block, head.T, out=scores)
            if bias is not None:
                scores += bias[start:start + block_vocab].to(dtype)
            if argmax:
                tile_index = scores.argmax(dim=-1)
                tile_best = scores.gather(-1, tile_index.unsqueeze(-1)).squeeze(-1)
                better = tile_best > best  # strictly: an equal maximum of a later tile loses
                best = torch.where(better, tile_best, best)
                index.copy_(torch.where(better, tile_index + start, index))
            if not (mean_logits or log_sum_sq_probs):
                continue
            z = _transform(scores, temperature, softcap)
            if mean_logits and not linear_mean:
                logit_sum[row:row + block_rows] += z.sum(-1)
            if log_sum_sq_probs:
                new_max = torch.maximum(m, z.amax(-1))
                rescale = torch.exp(m - new_max)
                shifted = torch.exp(z - new_max.unsqueeze(-1))
                s1.mul_(rescale).add_(shifted.sum(-1))
                s2.mul_(rescale * rescale).add_((shifted * shifted).sum(-1))
                m.copy_(new_max)
    leading = hidden.shape[:-1]
    return LogitStats(
        best_index.view(leading) if argmax else None,
        (logit_sum / weight.shape[0]).view(leading) if mean_logits else None,
        (torch.log(sum_exp2) - 2 * torch.log(sum_exp)).view(leading) if log_sum_sq_probs
        else None,
    )


def _transform(scores: torch.Tensor, temperature: float, softcap: float | None) -> torch.Tensor:
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return scores / temperature


@torch.no_grad()
def linear_argmax_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """``torch.argmax`` of the materialised logits z (softcap and temperature applied), [...]."""
    from fastalign.ops.linear_logprobs import reference_logits

    logits = reference_logits(hidden, weight, bias, float(temperature),
                              None if softcap is None else float(softcap),
                              _compute_dtype(hidden.dtype))
    return logits.argmax(dim=-1)


@torch.no_grad()
def linear_logit_stats_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> LogitStats:
    """Every statistic of ``linear_logit_stats`` from the materialised logits z."""
    from fastalign.ops.linear_logprobs import reference_logits

    dtype = _compute_dtype(hidden.dtype)
    logits = reference_logits(hidden, weight, bias, float(temperature),
                              None if softcap is None else float(softcap), dtype)
    log_probs = torch.log_softmax(logits, dim=-1)
    return LogitStats(linear_argmax_reference(hidden, weight, bias=bias), logits.mean(-1),
                      torch.logsumexp(2 * log_probs, dim=-1))
