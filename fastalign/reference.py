"""Plain-PyTorch references that materialise the logits.

These are the ground truth for tests and the baseline in benchmarks (`docs/ALGORITHMS.md` §1).
They are written for clarity, not memory: the full [N, V] logits are held, in float32 by default or
in float64 when asked (or when the inputs are float64), and autograd differentiates them.
"""

from __future__ import annotations

import torch


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (and entropies) from hidden states and an LM head, materialised.

    Args:
        hidden: [..., H] floating point hidden states.
        weight: [V, H] LM-head weight.
        targets: [...] integer target ids (the leading shape of ``hidden``); ``ignore_index`` marks
            positions that contribute nothing.
        bias: optional [V] head bias.
        temperature: logits are divided by this (after the softcap).
        softcap: if given, logits become ``softcap * tanh(logits / softcap)`` (before temperature).
        ignore_index: target value marking ignored positions (log-prob 0, entropy 0, no gradient).
        return_entropy: also return the entropy of the full distribution per token.
        compute_dtype: dtype of the materialised logits; float32 by default, float64 for float64
            inputs.

    Returns:
        ``logp`` with the shape of ``targets`` in ``compute_dtype``, or ``(logp, entropy)``.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)

    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy
