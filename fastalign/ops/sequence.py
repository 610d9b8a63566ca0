"""Sequence log-probabilities of a causal LM, from its final hidden states and head (§3).

A causal LM's hidden state at position t predicts token t + 1. These helpers do that shift and the
prompt/padding masking once, in one place, for the two batch layouts users have:

* padded: ``hidden [B, T, H]``, ``input_ids [B, T]``, ``response_mask [B, T]`` (1 on response
  tokens, 0 on prompt and padding), giving per-token results ``[B, T − 1]`` for tokens 1..T−1;
* packed (padding-free): ``hidden [total, H]``, ``input_ids [total]`` and ``cu_seqlens [S + 1]``,
  the cumulative sequence lengths; the shift never crosses a sequence boundary, and per-token
  results are ``[total]`` where entry i is the log-prob of token i + 1 (0 at each sequence's end).

Everything heavy goes through ``fastalign.linear_logprobs``: the logits are never materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.ops._backends import resolve_impl
from fastalign.ops._checks import (
    check_bool,
    check_mask,
    check_tensor,
    check_token_ids,
    check_token_range,
)
from fastalign.ops.linear_argmax import linear_logit_stats
from fastalign.ops.linear_logprobs import check_linear_logprobs_args, compute_linear_logprobs


@dataclass
class SequenceLogprobs:
    """Per-token and per-sequence log-probabilities of the response tokens.

    Attributes:
        token_logps: float32 per-token log-probs, 0 outside ``token_mask``; [B, T − 1] (padded)
            or [total] (packed, entry i scoring token i + 1).
        token_mask: bool, same shape: the positions whose next token is a response token.
        sum_logps: [B] (or [S]) float32, Σ over the response tokens of each sequence.
        mean_logps: [B] (or [S]) float32, the sum divided by the number of response tokens (0 for a
            sequence without any).
        lengths: [B] (or [S]) int64, the number of response tokens of each sequence.
        token_entropy: like ``token_logps``, or None unless asked for.
        token_predictions: int64, same shape: the arg-max token of the next-token distribution
            where ``token_mask`` is set, ``ignore_index`` elsewhere; None unless asked for.
        token_mean_logits: like ``token_logps``: the mean over the vocabulary of the next-token
            logits (temperature applied), 0 outside ``token_mask``; None unless asked for.
        token_log_sum_sq_probs: like ``token_logps``: log Σ_v p_v² of the next-token
            distribution (WPO's weights), 0 outside ``token_mask``; None unless asked for.
    """

    token_logps: torch.Tensor
    token_mask: torch.Tensor
    sum_logps: torch.Tensor
    mean_logps: torch.Tensor
    lengths: torch.Tensor
    token_entropy: torch.Tensor | None = None
    token_predictions: torch.Tensor | None = None
    token_mean_logits: torch.Tensor | None = None
    token_log_sum_sq_probs: torch.Tensor | None = None


def _check_mask_like(name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    check_mask(name, value)
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have input_ids' shape {tuple(like.shape)}, got "
                         f"{tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} must be on input_ids' device {like.device}, got {value.device}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    check_tensor("cu_seqlens", cu_seqlens, floating=False)
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D [S + 1] with S >= 1, got shape {tuple(cu_seqlens.shape)}"
        )
    steps = cu_seqlens[1:] - cu_seqlens[:-1]
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((steps < 0).any()):
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at the number of packed tokens "
            f"({total}), got {cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}"
        )


def packed_position_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int64 positions of packed sequences: 0, 1, ... restarting at each sequence start.

    Given as ``position_ids`` with no attention mask, they tell transformers' mask builders
    where each sequence starts, so that attention stays within it (see
    ``fastalign.hf.check_packed_attention``).
    """
    _check_cu_seqlens(cu_seqlens, total)
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    return (torch.arange(total, device=cu_seqlens.device)
            - torch.repeat_interleave(starts, lengths, output_size=total))


def next_token_targets(
    labels: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The target of each hidden position: the next label of the same sequence.

    ``labels`` are aligned with ``input_ids`` (``ignore_index`` on prompt and padding, as in Hugging
    Face). Padded [B, T] gives [B, T] targets whose last column is ``ignore_index``; packed [total]
    with ``cu_seqlens`` gives [total] targets with ``ignore_index`` at the end of every sequence.
    """
    check_token_ids("labels", labels)
    targets = torch.full_like(labels, ignore_index)
    targets[..., :-1] = labels[..., 1:]
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].to(labels.device) - 1
        ends = ends[ends >= 0]
        targets[ends] = ignore_index
    return targets


def checked_next_token_targets(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every check of :func:`sequence_logprobs_from_labels`'s arguments, then ``(hidden, labels,
    targets)``: a packed batch's [1, total, ...] views flattened, and the next-token targets."""
    check_token_ids("labels", labels)
    if cu_seqlens is not None:
        if hidden.dim() == 3 and hidden.shape[0] == 1:
            hidden = hidden[0]
        if labels.dim() == 2 and labels.shape[0] == 1:
            labels = labels[0]
        if hidden.dim() != 2 or labels.dim() != 1:
            raise ValueError(
                "with cu_seqlens, hidden must be [total, H] (or [1, total, H]) and labels [total] "
                f"(or [1, total]); got {tuple(hidden.shape)} and {tuple(labels.shape)}"
            )
        _check_cu_seqlens(cu_seqlens, labels.shape[0])
    elif hidden.dim() != 3 or labels.dim() != 2:
        raise ValueError(
            f"hidden must be [B, T, H] and labels (or input_ids) [B, T], got {tuple(hidden.shape)} "
            f"and {tuple(labels.shape)}; pass cu_seqlens for packed sequences"
        )
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"hidden's leading shape {tuple(hidden.shape[:-1])} must equal the labels' (or "
            f"input_ids') shape {tuple(labels.shape)}"
        )

    targets = next_token_targets(labels, cu_seqlens=cu_seqlens, ignore_index=ignore_index)
    check_linear_logprobs_args(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    # The one label check (and device sync) of the call, named as the user passed the ids: the
    # shifted targets hold the same ids.
    check_token_range("labels (or input_ids)", labels, weight.shape[0], ignore_index)
    return hidden, labels, targets


def sequence_logprobs_from_labels(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_predictions: bool = False,
    return_mean_logits: bool = False,
    return_log_sum_sq_probs: bool = False,
    impl: str = "auto",
) -> SequenceLogprobs:
    """Like :func:`sequence_logprobs`, with Hugging Face style ``labels`` (ignore_index = masked).

    Args:
        hidden: [B, T, H] final hidden states (or [total, H] / [1, total, H] with cu_seqlens).
        weight: [V, H] LM head. labels: [B, T] (or [total] / [1, total]) token ids aligned with
            the input, ``ignore_index`` where a token is not scored.
        return_predictions: also fill ``token_predictions``, the arg-max token at each scored
            position (``linear_logit_stats``: streamed, no gradient), e.g. for a token accuracy.
        return_mean_logits: also fill ``token_mean_logits`` (``linear_logit_stats``, no
            gradient), e.g. for TRL's ``logits/chosen``.
        return_log_sum_sq_probs: also fill ``token_log_sum_sq_probs`` (``linear_logit_stats``,
            no gradient), e.g. for WPO's weights.
    """
    hidden, labels, targets = checked_next_token_targets(
        hidden, weight, labels, cu_seqlens=cu_seqlens, bias=bias, temperature=temperature,
        softcap=softcap, ignore_index=ignore_index)
    check_bool("return_entropy", return_entropy)
    check_bool("return_predictions", return_predictions)
    check_bool("return_mean_logits", return_mean_logits)
    check_bool("return_log_sum_sq_probs", return_log_sum_sq_probs)
    chosen = resolve_impl(impl, hidden.device, hidden.dtype)
    result = compute_linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
        ignore_index=ignore_index, return_entropy=return_entropy, impl=chosen,
    )
    token_logps, token_entropy = result if return_entropy else (result, None)
    token_mask = targets != ignore_index
    token_predictions = token_mean_logits = token_log_sum_sq_probs = None
    if return_predictions or return_mean_logits or return_log_sum_sq_probs:
        # One pass without gradient over the scored positions only (prompts and padding are
        # left out).
        stats = linear_logit_stats(hidden[token_mask], weight, bias=bias,
                                   temperature=temperature, softcap=softcap,
                                   argmax=return_predictions, mean_logits=return_mean_logits,
                                   log_sum_sq_probs=return_log_sum_sq_probs)
        if return_predictions:
            token_predictions = torch.full_like(targets, ignore_index)
            token_predictions[token_mask] = stats.argmax
        if return_mean_logits:
            token_mean_logits = torch.zeros_like(token_logps)
            token_mean_logits[token_mask] = stats.mean_logits.to(token_logps.dtype)
        if return_log_sum_sq_probs:
            token_log_sum_sq_probs = torch.zeros_like(token_logps)
            token_log_sum_sq_probs[token_mask] = stats.log_sum_sq_probs.to(token_logps.dtype)

    if cu_seqlens is not None:
        lengths_of_sequences = (cu_seqlens[1:] - cu_seqlens[:-1]).to(labels.device)
        segment = torch.repeat_interleave(
            torch.arange(lengths_of_sequences.numel(), device=labels.device), lengths_of_sequences
        )
        n_sequences = lengths_of_sequences.numel()
        sum_logps = token_logps.new_zeros(n_sequences).index_add(0, segment, token_logps)
        lengths = torch.zeros(n_sequences, dtype=torch.int64, device=labels.device).index_add(
            0, segment, token_mask.long()
        )
    else:
        return padded_sequence_logprobs(token_logps, token_mask, token_entropy,
                                        token_predictions, token_mean_logits,
                                        token_log_sum_sq_probs)
    mean_logps = sum_logps / lengths.clamp(min=1).to(sum_logps.dtype)
    return SequenceLogprobs(token_logps, token_mask, sum_logps, mean_logps, lengths,
                            token_entropy, token_predictions, token_mean_logits,
                            token_log_sum_sq_probs)


def padded_sequence_logprobs(token_logps: torch.Tensor, token_mask: torch.Tensor,
                             *per_token: torch.Tensor | None) -> SequenceLogprobs:
    """A padded batch's :class:`SequenceLogprobs` from per-position results [B, T] (position t
    scored on token t + 1; 0 where not scored): the last position, which predicts nothing, is
    dropped, and the sequences' sums, lengths and means formed. ``per_token``: the optional
    fields after ``lengths`` in order (entropy, predictions, mean logits, log Σp²), or None."""
    token_logps, token_mask = token_logps[:, :-1], token_mask[:, :-1]
    extra = [None if x is None else x[:, :-1] for x in per_token]
    sum_logps = token_logps.sum(-1)
    lengths = token_mask.sum(-1)
    mean_logps = sum_logps / lengths.clamp(min=1).to(sum_logps.dtype)
    return SequenceLogprobs(token_logps, token_mask, sum_logps, mean_logps, lengths, *extra)


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    impl: str = "auto",
) -> SequenceLogprobs:
    """Summed and length-averaged log π(response | prompt) of each sequence, logits never formed.

    Args:
        hidden: [B, T, H] final hidden states of a causal LM (before its head), or [total, H]
            (also [1, total, H]) for packed sequences described by ``cu_seqlens``.
        weight: [V, H] LM-head weight (hidden's dtype).
        input_ids: [B, T] (or [total] / [1, total]) the token ids the hidden states were computed
            from.
        response_mask: like ``input_ids``, bool or 0/1: which tokens are scored (1 on the
            response, 0 on prompt and padding). None scores every token but the first.
        cu_seqlens: [S + 1] cumulative lengths of packed sequences (0, len_0, len_0 + len_1, ...).
        bias, temperature, softcap, return_entropy, impl: as in ``fastalign.linear_logprobs``.

    Returns:
        A :class:`SequenceLogprobs` with per-token ``[B, T − 1]`` (or ``[total]``) and
        per-sequence ``[B]`` (or ``[S]``) float32 results, differentiable w.r.t. hidden and head.
    """
    check_token_ids("input_ids", input_ids)
    ignore_index = -100
    labels = input_ids
    if response_mask is not None:
        _check_mask_like("response_mask", response_mask, input_ids)
        labels = torch.where(response_mask.bool(), input_ids,
                             torch.full_like(input_ids, ignore_index))
    return sequence_logprobs_from_labels(
        hidden, weight, labels, cu_seqlens=cu_seqlens, bias=bias, temperature=temperature,
        softcap=softcap, ignore_index=ignore_index, return_entropy=return_entropy, impl=impl,
    )
