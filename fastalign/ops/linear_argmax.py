"""``linear_argmax``: the most likely next token of each row, straight from (hidden, LM head).

Layer 2 of fastalign, without kernels of its own: the arg-max over the vocabulary of
``hidden @ weight.T + bias``, streamed over tiles of rows and vocabulary entries so that memory
stays bounded by one [block_rows × block_vocab] tile and never grows with N × V. It serves
metrics (SFT's ``mean_token_accuracy``), so it has no gradient. ``linear_argmax_reference``
materialises the logits, for tests.

Which head options can move the arg-max: of the conventions ``linear_logprobs`` takes
(z = softcap·tanh((h·Wᵀ + b)/softcap) / temperature, a model's logit scale folded into the
temperature), only the **bias** can, since it shifts each vocabulary entry by a different
amount. Temperature and logit scale are positive factors common to every entry, and softcap's
``c·tanh(a/c)`` is strictly increasing in ``a``: all three preserve the order of the logits, so
the arg-max of the raw scores h·Wᵀ + b is the arg-max of the distribution. The op accepts them
(checked as ``linear_logprobs`` checks them) so that callers can pass one head's options to both,
and then leaves them out: applied in floating point, a softcap would round large, distinct logits
to equal values (tanh saturates) and create ties that the exact distribution does not have.

Ties: the lowest vocabulary index among equal maxima wins, as in ``torch.argmax`` (each tile
keeps its first maximum, and a later tile replaces the running best only when strictly greater).
A row whose scores hold NaN gets an unspecified index.
"""

from __future__ import annotations

import torch

from fastalign.ops._checks import (
    check_field_int,
    check_head,
    check_positive,
    check_same_device,
)

__all__ = ["linear_argmax", "linear_argmax_reference"]

# One tile of float32 scores: 1024 × 4096 × 4 bytes = 16 MiB, whatever N and V are.
BLOCK_ROWS = 1024
BLOCK_VOCAB = 4096


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Scores of bfloat16/float16 inputs are kept in float32: rounded to 8 bits of mantissa, many
    # distinct logits would tie. Products of two bf16/fp16 numbers are exact in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_streamed_head(hidden, weight, bias, temperature, softcap, block_rows,
                        block_vocab) -> torch.dtype:
    """The checks of an op that streams a head tile by tile (this one, and
    ``linear_log_sum_sq_probs``); returns the dtype the tiles are computed in."""
    check_head("", hidden, weight, bias)
    check_positive("temperature", temperature)
    check_positive("softcap", softcap, optional=True)
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    check_field_int("block_rows", block_rows, minimum=1)
    check_field_int("block_vocab", block_vocab, minimum=1)
    return _compute_dtype(hidden.dtype)


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
    dtype = check_streamed_head(hidden, weight, bias, temperature, softcap, block_rows,
                                block_vocab)
    rows = hidden.reshape(-1, hidden.shape[-1])
    best_index = torch.zeros(rows.shape[0], dtype=torch.int64, device=hidden.device)
    for row in range(0, rows.shape[0], block_rows):
        block = rows[row:row + block_rows].to(dtype)
        best = torch.full((block.shape[0],), -torch.inf, dtype=dtype, device=hidden.device)
        index = best_index[row:row + block_rows]  # a view: filled in place
        for start in range(0, weight.shape[0], block_vocab):
            scores = block @ weight[start:start + block_vocab].to(dtype).T
            if bias is not None:
                scores += bias[start:start + block_vocab].to(dtype)
            tile_index = scores.argmax(dim=-1)
            tile_best = scores.gather(-1, tile_index.unsqueeze(-1)).squeeze(-1)
            better = tile_best > best  # strictly: an equal maximum of a later tile loses
            best = torch.where(better, tile_best, best)
            index.copy_(torch.where(better, tile_index + start, index))
    return best_index.view(hidden.shape[:-1])


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
    return materialised_logits(hidden, weight, bias, temperature, softcap).argmax(dim=-1)


def materialised_logits(hidden, weight, bias, temperature, softcap) -> torch.Tensor:
    """[..., V] logits z in the streamed ops' compute dtype, for their references (tests)."""
    from fastalign.ops.linear_logprobs import reference_logits

    return reference_logits(hidden, weight, bias, float(temperature),
                            None if softcap is None else float(softcap),
                            _compute_dtype(hidden.dtype))
