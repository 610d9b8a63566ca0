"""A sequence loss with its LM-head gradients formed in the forward pass (6·N·H·V FLOPs).

Layer 2 of fastalign, under the fused loss modules (``fastalign.fused``): DPO, KTO, PPO/GRPO,
SimPO, CPO and ORPO compute a scalar from per-token log-probs (and entropies) of whole
sequences. ``linear_logprobs`` cannot know the loss's gradient while it streams the head, so its
backward recomputes the logits: 2·N·H·V FLOPs forward, 6·N·H·V backward. Here the loss is
evaluated while the logits of a chunk are at hand:

    for each chunk of whole groups of sequences (a DPO pair, a KTO example, a GRPO completion):
        tile = h_chunk · Wᵀ                     (the scored tokens only; prompts and padding
                                                 are left out)
        per row: log p(y), entropy, log Σp²      (row pass)
        ∂L/∂logp, ∂L/∂H of the chunk's tokens    (autograd of the loss over [B, T] numbers)
        tile ← ∂L/∂a in place                    (row pass)
        dh_chunk = tile · W,  dW += tileᵀ · h_chunk (float32),  db += Σ tile

so that backward only scales the gradients by the upstream gradient. Exact, with one condition
on the loss: **it separates over the groups** — the gradient with respect to a group's
log-probs depends on that group's log-probs only (a mean over pairs of per-pair terms; token
means normalised by counts known from the labels). The loss is evaluated on the whole batch with
the groups not yet computed held at a fixed placeholder, which a separable loss's gradient on
the current group does not see. Losses that couple the batch (sorting, batch quantiles) must
not come here: ``fastalign.fused`` sends them through ``linear_logprobs``.

The workspace is one chunk's tile ([tokens of the chunk, V], float32 on CPU, the input dtype
under Triton), at least one group: the budget of ``kernels/_chunked.py`` (5% of eager's
N × V float32 logits by default, ``FASTALIGN_BACKWARD_WORKSPACE_MIB``) decides how many groups
share a chunk. dh, dW and db are held from forward to backward, as ``linear_nll`` does.

The row passes run in the C++ extension on CPU, in Triton on CUDA (and in the interpreter), or
in plain PyTorch (``impl="torch"``; where neither can, and a check on both).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastalign.kernels import _chunked
from fastalign.ops._backends import resolve_impl
from fastalign.ops._formed_grads import GradientsFormedInForward
from fastalign.ops._row_passes import ROW_PASSES, RowStats
from fastalign.ops.sequence import (
    SequenceLogprobs,
    checked_next_token_targets,
    padded_sequence_logprobs,
)

__all__ = ["sequence_loss_with_head_grads", "sequence_logprobs_in_chunks", "pair_groups",
           "single_groups"]

LossOf = Callable[[SequenceLogprobs], tuple[torch.Tensor, dict]]
# The value a token's log-prob (and log Σp²) takes in the loss while its group is not computed
# yet, and its entropy: finite and ordinary, so that every term of the loss stays finite.
_PLACEHOLDER_LOGP = -1.0
_PLACEHOLDER_ENTROPY = 1.0


def pair_groups(n_sequences: int, device: torch.device) -> torch.Tensor:
    """[B, 2] groups of a chosen-on-rejected stack of 2B sequences: (i, B + i)."""
    half = torch.arange(n_sequences // 2, device=device)
    return torch.stack([half, half + n_sequences // 2], dim=1)


def single_groups(n_sequences: int, device: torch.device) -> torch.Tensor:
    """[S, 1] groups: each sequence on its own (KTO's examples, PPO's completions)."""
    return torch.arange(n_sequences, device=device)[:, None]


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------


@dataclass
class _Chunks:
    """A batch's scored positions in chunks of whole groups, and everything the row passes read:
    the same for a policy head and for a reference head scored on the same labels, so that
    equal heads give bit-equal log-probs (a DPO policy equal to its reference has log-ratios of
    exactly 0, as TRL's, and reward accuracy 0, not a coin toss of roundings)."""

    hidden: torch.Tensor   # [n scored, H], the head's dtype (float32/64, input dtype in Triton)
    weight: torch.Tensor   # [V, H], same dtype, contiguous
    bias: torch.Tensor | None
    targets: torch.Tensor  # [n scored] int64
    rows: torch.Tensor     # [n scored] int64: the flat [S·T] position of each scored row
    mask: torch.Tensor     # [S, T] bool: scored positions
    bounds: list           # (start, end) of each chunk in the scored rows
    impl: str
    rows_pass: object
    compute: torch.dtype
    temperature: float
    softcap: float         # 0: none

    @property
    def allocates_tiles(self) -> bool:
        """Whether each chunk's tile is a new tensor from oneDNN's product (float32 on CPU,
        ``_chunked.fill_allocates_tiles``) instead of ``torch.mm(out=)`` into one workspace.
        Not under Triton, whose row kernels want the workspace's aligned rows."""
        return self.impl != "triton" and _chunked.fill_allocates_tiles(self.hidden.device,
                                                                        self.hidden.dtype)

    def tile_stats(self, start: int, end: int,
                   tile: torch.Tensor | None) -> tuple[torch.Tensor, RowStats]:
        """The chunk's logits, into ``tile`` or (None) a new tensor, and their per-row
        statistics."""
        tile = _chunked.chunk_logits(self.hidden[start:end], self.weight, tile)
        return tile, self.rows_pass.stats(tile, self.bias, self.targets[start:end],
                                          self.temperature, self.softcap)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.mask.numel(), dtype=self.compute, device=self.mask.device)

    def sequences(self, values: dict, return_entropy: bool,
                  return_log_sum_sq_probs: bool) -> SequenceLogprobs:
        """A :class:`SequenceLogprobs` of flat [S·T] per-position values."""
        def shaped(name):
            return values[name].view(self.mask.shape)

        return padded_sequence_logprobs(
            shaped("logp"), self.mask, shaped("entropy") if return_entropy else None, None, None,
            shaped("log_sum_sq") if return_log_sum_sq_probs else None)


def _chunks(hidden, weight, labels, groups, bias, temperature, softcap, ignore_index,
            impl) -> _Chunks:
    hidden, labels, targets = checked_next_token_targets(
        hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap,
        ignore_index=ignore_index)
    n_sequences, length = labels.shape
    if not isinstance(groups, torch.Tensor) or groups.dim() != 2 \
            or groups.numel() != n_sequences or groups.dtype != torch.int64:
        raise ValueError(f"groups must be [G, k] int64 indices of the {n_sequences} sequences, "
                         f"got {getattr(groups, 'dtype', type(groups).__name__)} "
                         f"{tuple(getattr(groups, 'shape', ()))}")
    chosen = impl if impl == "torch" else resolve_impl(impl, hidden.device, hidden.dtype)
    if chosen == "reference":
        raise ValueError("the chunked sequence loss has no materialising implementation: use "
                         "sequence_logprobs_from_labels with impl='reference'")
    rows_pass = ROW_PASSES[chosen]
    device = hidden.device
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # The scored positions, group after group: each chunk of rows then holds whole groups.
    mask = targets != ignore_index
    order = groups.reshape(-1).to(device)
    rows = (order[:, None] * length + torch.arange(length, device=device))[mask[order]]
    group_tokens = mask[order].sum(1).view(groups.shape).sum(1).tolist()  # one sync
    head_dtype = hidden.dtype if chosen == "triton" else compute
    row_bytes = weight.shape[0] * (torch.finfo(head_dtype).bits // 8 + rows_pass.bytes_per_logit)
    # 5% of eager's logits and their gradient, as linear_nll (``_chunked.chunk_rows``).
    budget_rows = _chunked.chunk_rows(n_sequences * length, weight.shape[0], row_bytes,
                                      eager_logit_copies=2)
    return _Chunks(
        hidden.reshape(-1, hidden.shape[-1]).detach().index_select(0, rows).to(head_dtype),
        weight.detach().to(head_dtype).contiguous(),
        None if bias is None else bias.detach().to(head_dtype).contiguous(),
        targets.reshape(-1).index_select(0, rows), rows, mask,
        _group_chunks(group_tokens, budget_rows), chosen, rows_pass, compute, float(temperature),
        0.0 if softcap is None else float(softcap))


def sequence_logprobs_in_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    groups: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
) -> SequenceLogprobs:
    """``sequence_logprobs_from_labels`` without gradient, by the arithmetic of
    :func:`sequence_loss_with_head_grads` (the same chunks, products and row passes): a frozen
    reference scored exactly as the policy is. 2·N·H·V FLOPs; one chunk's tile at a time."""
    chunks = _chunks(hidden, weight, labels, groups, bias, temperature, softcap, ignore_index,
                     impl)
    logp = chunks.zeros()
    largest = max((end - start for start, end in chunks.bounds), default=0)
    with torch.no_grad():
        workspace = None if chunks.allocates_tiles else torch.empty(
            (largest, weight.shape[0]), dtype=chunks.hidden.dtype, device=chunks.hidden.device)
        for start, end in chunks.bounds:
            tile, stats = chunks.tile_stats(
                start, end, None if workspace is None else workspace[:end - start])
            logp[chunks.rows[start:end]] = stats.logp.to(chunks.compute)
            del tile  # a new tile per chunk: freed before the next one is made
    return chunks.sequences({"logp": logp}, False, False)


def sequence_loss_with_head_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_of: LossOf,
    *,
    groups: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_log_sum_sq_probs: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict, SequenceLogprobs]:
    """``loss_of(sequence_logprobs_from_labels(hidden, weight, labels, ...))`` with the head's
    gradients formed in forward (see the module docstring).

    Args:
        hidden: [S, T, H] final hidden states; weight [V, H]; labels [S, T] aligned with the
            inputs (``ignore_index`` where a token is not scored), as
            ``sequence_logprobs_from_labels`` takes them.
        loss_of: the loss of a batch's :class:`SequenceLogprobs` ([S, T − 1] per token),
            returning ``(loss, metrics)``; separable over ``groups`` (module docstring), and
            depending on no other tensor that requires grad.
        groups: [G, k] int64 sequence indices: each row one group, every sequence in exactly
            one group.
        return_entropy: fill ``token_entropy`` (with its gradient) for ``loss_of``;
            return_log_sum_sq_probs: fill ``token_log_sum_sq_probs`` (no gradient).
        impl: "auto" (Triton on CUDA, C++ on CPU), "triton", "cpp" or "torch" (the row passes
            in plain PyTorch).

    Returns:
        ``(loss, metrics, sequences)``: ``loss_of``'s value on the whole batch, differentiable
        with respect to hidden, weight and bias (backward scales the gradients formed here), its
        metrics, and the batch's (detached) :class:`SequenceLogprobs`.
    """
    chunks = _chunks(hidden, weight, labels, groups, bias, temperature, softcap, ignore_index,
                     impl)
    compute = chunks.compute
    head = _chunked.HeadGrads(chunks.hidden, chunks.weight, chunks.bias, hidden.requires_grad,
                              weight.requires_grad, bias is not None and bias.requires_grad)
    per_token = {name: chunks.zeros() for name in ("logp", "entropy", "log_sum_sq")}
    placeholder = {name: chunks.zeros().masked_fill_(chunks.mask.reshape(-1), value)
                   for name, value in (("logp", _PLACEHOLDER_LOGP),
                                       ("entropy", _PLACEHOLDER_ENTROPY),
                                       ("log_sum_sq", _PLACEHOLDER_LOGP))}

    def sequences(values: dict) -> SequenceLogprobs:
        return chunks.sequences(values, return_entropy, return_log_sum_sq_probs)

    def upstream(chunk_rows: torch.Tensor, stats: RowStats):
        """∂loss/∂(log-probs, entropies) of the chunk's tokens: the loss over the batch with the
        chunk's values live and the other groups at the placeholder."""
        live = {"logp": stats.logp.detach().requires_grad_()}
        if return_entropy:
            live["entropy"] = stats.entropy.detach().requires_grad_()
        sources = {"log_sum_sq": stats.log_sum_sq, "entropy": stats.entropy, **live}
        with torch.enable_grad():  # fill runs under no_grad
            values = {name: placeholder[name].index_put((chunk_rows,), source.to(compute))
                      for name, source in sources.items()}
            loss, _ = loss_of(sequences(values))
            grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
        grad_logp = torch.zeros_like(stats.logp) if grads[0] is None else grads[0]
        grad_entropy = grads[1] if return_entropy else None
        return grad_logp.to(stats.logp.dtype), (
            None if grad_entropy is None else grad_entropy.to(stats.logp.dtype))

    def fill(start: int, end: int, tile: torch.Tensor | None = None) -> list[torch.Tensor]:
        tile, stats = chunks.tile_stats(start, end, tile)
        chunk_rows = chunks.rows[start:end]
        for name in per_token:
            per_token[name][chunk_rows] = getattr(stats, name).to(compute)
        grad_logp, grad_entropy = upstream(chunk_rows, stats)
        chunks.rows_pass.grad(tile, chunks.bias, chunks.targets[start:end], stats, grad_logp,
                              grad_entropy, chunks.temperature, chunks.softcap)
        return [tile]

    with torch.no_grad():
        _chunked.head_grads_in_chunks(
            [head], fill, fill_bytes_per_logit=chunks.rows_pass.bytes_per_logit,
            bounds=chunks.bounds, aligned_rows=chunks.impl == "triton",
            fill_allocates=chunks.allocates_tiles)
        result = sequences(per_token)
        loss, metrics = loss_of(result)
    dh = None
    if head.dh is not None:
        flat = hidden.reshape(-1, hidden.shape[-1])
        dh = torch.zeros_like(flat).index_copy_(0, chunks.rows, head.dh.to(hidden.dtype))
        dh = dh.view_as(hidden)
    dw = None if head.dw is None else head.dw.to(weight.dtype)
    db = None if head.db is None else head.db.to(bias.dtype)
    loss = GradientsFormedInForward.apply(hidden, weight, bias, loss.detach(), dh, dw, db)
    return loss, metrics, result


def _group_chunks(group_tokens: list[int], budget_rows: int) -> list[tuple[int, int]]:
    """(start, end) row ranges of consecutive whole groups, each within ``budget_rows`` scored
    tokens unless one group alone exceeds it (a chunk holds at least one group)."""
    bounds, start, end = [], 0, 0
    for tokens in group_tokens:
        if end > start and end - start + tokens > budget_rows:
            bounds.append((start, end))
            start = end
        end += tokens
    if end > start:
        bounds.append((start, end))
    return bounds
