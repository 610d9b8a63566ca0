"""``linear_log_sum_sq_probs``: log Σ_v p_v² of each row's next-token distribution, from (hidden,
LM head).

Layer 2 of fastalign, without kernels of its own: with z the head's logits (softcap and
temperature applied as ``linear_logprobs`` applies them) and p = softmax(z),

    log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z),

the log of the probability that two independent draws agree (the collision probability). WPO
(Zhou et al., 2024) divides each token's probability by it. The two log-sum-exps are streamed
over tiles of rows and vocabulary entries, as ``linear_argmax`` streams its arg-max, so memory
stays bounded by one [block_rows × block_vocab] tile and never grows with N × V. It feeds a
weight that carries no gradient, so the op has none; ``linear_log_sum_sq_probs_reference``
materialises the logits, for tests.
"""

from __future__ import annotations

import torch

from fastalign.ops.linear_argmax import (
    BLOCK_ROWS,
    BLOCK_VOCAB,
    check_streamed_head,
    materialised_logits,
)
from fastalign.ops.linear_logprobs import reference_logits

__all__ = ["linear_log_sum_sq_probs", "linear_log_sum_sq_probs_reference"]


@torch.no_grad()
def linear_log_sum_sq_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    block_rows: int = BLOCK_ROWS,
    block_vocab: int = BLOCK_VOCAB,
) -> torch.Tensor:
    """log Σ_v p_v² for each row of ``hidden``, p = softmax(z), without materialising the logits.

    Args: ``hidden`` [..., H] and the head (``weight`` [V, H], optional ``bias`` [V], one dtype
    of float32 / bfloat16 / float16 / float64) as ``linear_logprobs`` takes them, with
    z = c·tanh((h·Wᵀ + b)/c)/T for ``softcap`` c (optional) and ``temperature`` T; ``block_rows``
    × ``block_vocab`` is the tile of logits held at a time.

    Returns:
        [...] float32 (float64 for float64 inputs), each in [−log V, 0]. No gradient.
    """
    # The same tiles and dtypes as linear_argmax; bfloat16/float16 logits are summed in float32,
    # since the result is a difference of two log-sum-exps of similar size.
    dtype = check_streamed_head(hidden, weight, bias, temperature, softcap, block_rows,
                                block_vocab)
    temperature = float(temperature)
    softcap = None if softcap is None else float(softcap)
    rows = hidden.reshape(-1, hidden.shape[-1])
    result = torch.empty(rows.shape[0], dtype=dtype, device=hidden.device)
    for row in range(0, rows.shape[0], block_rows):
        block = rows[row:row + block_rows]
        lse = torch.full((block.shape[0],), -torch.inf, dtype=dtype, device=hidden.device)
        lse_twice = lse.clone()  # logsumexp(2z)
        for start in range(0, weight.shape[0], block_vocab):
            tile_bias = None if bias is None else bias[start:start + block_vocab]
            logits = reference_logits(block, weight[start:start + block_vocab], tile_bias,
                                      temperature, softcap, dtype)
            lse = torch.logaddexp(lse, logits.logsumexp(-1))
            lse_twice = torch.logaddexp(lse_twice, (2 * logits).logsumexp(-1))
        result[row:row + block_rows] = lse_twice - 2 * lse
    return result.view(hidden.shape[:-1])


@torch.no_grad()
def linear_log_sum_sq_probs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """The same from the materialised logits: log Σ_v softmax(z)_v², [...]."""
    logits = materialised_logits(hidden, weight, bias, temperature, softcap)
    return torch.log(torch.softmax(logits, dim=-1).pow(2).sum(-1))
