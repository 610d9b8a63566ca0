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
    valid = targets != ignore_index
    # Ignored rows enter the product as zeros: a NaN or inf in the hidden state of a padding token
    # must give no gradient to anything (0·NaN is NaN in the weight's gradient otherwise).
    hidden = torch.where(valid.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype,
                                                                  device=hidden.device))
    logits = _reference_logits(hidden, weight, bias, temperature, softcap, compute_dtype)
    log_probs = torch.log_softmax(logits, dim=-1)

    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def _reference_logits(hidden, weight, bias, temperature, softcap, compute_dtype):
    """z = softcap·tanh((h·Wᵀ + b)/softcap)/temperature, materialised in ``compute_dtype``."""
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def linear_kl_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    reverse: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-token exact KL between the policy head and the reference head, materialised.

    ``p = softmax(z)`` from (hidden, weight, bias) and ``q = softmax(r)`` from (ref_hidden,
    ref_weight, ref_bias), with the same temperature and softcap (`docs/ALGORITHMS.md` §2).
    Returns KL(p‖q) per token, or KL(q‖p) with ``reverse=True``, 0 where ``mask`` is false, in
    ``compute_dtype`` (float32 by default, float64 for float64 inputs).

    Args:
        hidden: [..., H] policy hidden states; weight: [V, H].
        ref_hidden: [..., H_ref] reference hidden states (same leading shape); ref_weight:
            [V, H_ref].
        mask: optional bool [...]; tokens where it is false give 0 and no gradient.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if mask is not None:  # masked rows enter as zeros: a NaN there reaches no gradient
        keep = mask.bool().unsqueeze(-1)
        hidden = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype,
                                                       device=hidden.device))
        ref_hidden = torch.where(keep, ref_hidden, torch.zeros((), dtype=ref_hidden.dtype,
                                                               device=ref_hidden.device))
    z = _reference_logits(hidden, weight, bias, temperature, softcap, compute_dtype)
    r = _reference_logits(ref_hidden, ref_weight, ref_bias, temperature, softcap, compute_dtype)
    log_p = torch.log_softmax(z, dim=-1)
    log_q = torch.log_softmax(r, dim=-1)
    if reverse:
        log_p, log_q = log_q, log_p
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


def gae_reference(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, one reverse scan per row (`docs/ALGORITHMS.md` §8).

    Only positions where ``mask`` is true take part: the scan walks them from the last to the
    first, the "next" value of a token is the value at the next masked position of its row (0
    after the last one), and positions outside the mask get advantage 0 and return 0.

    Args:
        rewards, values: [B, T] floating point; mask: [B, T] bool.

    Returns:
        ``(advantages, returns)`` [B, T] in float32 (float64 for float64 rewards), detached.
    """
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    mask = mask.bool()
    rewards = rewards.detach().to(dtype)
    values = values.detach().to(dtype)
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        next_value = 0.0
        running = 0.0
        for t in reversed(range(rewards.shape[1])):
            if not bool(mask[b, t]):
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
            next_value = values[b, t]
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns
