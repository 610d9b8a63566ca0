"""Reward models: the Bradley–Terry pairwise loss (ALGORITHMS.md §7) and vote-based scores."""

from __future__ import annotations

import math
from numbers import Integral

import torch
import torch.nn.functional as F

from fastalign.losses._common import Metrics, compute_dtype, metric
from fastalign.ops._checks import (
    check_finite,
    check_float_tensor,
    check_non_negative,
    check_per_sequence,
)

__all__ = ["reward_loss", "votes_to_score"]


def _as_per_pair(name: str, rewards) -> torch.Tensor:
    """[B] rewards; a reward head's [B, 1] output is accepted and flattened."""
    check_float_tensor(name, rewards)
    if rewards.dim() == 2 and rewards.shape[1] == 1:
        return rewards[:, 0]
    return rewards


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: float | torch.Tensor | None = None,
    center_coefficient: float | None = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Pairwise reward-model loss under the Bradley–Terry model, as TRL's ``RewardTrainer``.

    Bradley & Terry, 1952, "Rank Analysis of Incomplete Block Designs"; used for RLHF reward models
    by Ouyang et al., 2022, "Training language models to follow instructions with human feedback"
    (InstructGPT). The optional margin is Llama 2's (Touvron et al., 2023, "Llama 2: Open
    Foundation and Fine-Tuned Chat Models"); the centring term is from Eisenstein et al., 2023,
    "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking".

        loss = mean_B[−log σ(r_w − r_l − m)] + c·mean_B[(r_w + r_l)²]

    Args:
        chosen_rewards: [B] (or a reward head's [B, 1]) float, the scalar reward r_w of y_w.
        rejected_rewards: the same shape, r_l of y_l.
        margin: m; None (0), a finite float, or a 0-d or [B] float tensor (per-pair margins,
            e.g. from preference strength). Receives no gradient.
        center_coefficient: c >= 0 (TRL's ``center_rewards_coefficient``; None means 0); about
            0.01 keeps rewards centred on zero.

    Returns:
        ``(loss, metrics)``: loss 0-d float32 (float64 for float64 inputs). Metrics, detached 0-d
        float32, TRL's ``RewardTrainer`` names where it has them: "accuracy" = mean 1[r_w > r_l]
        (ties count as wrong), "margin" = mean (r_w − r_l), "min_reward", "mean_reward" and
        "max_reward" over both answers of every pair; and "rewards/chosen", "rewards/rejected"
        (the batch means of each side).
    """
    chosen_rewards = _as_per_pair("chosen_rewards", chosen_rewards)
    rejected_rewards = _as_per_pair("rejected_rewards", rejected_rewards)
    batch_size = check_per_sequence(
        chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards
    )
    if center_coefficient is None:
        center_coefficient = 0.0
    center_coefficient = check_non_negative("center_coefficient", center_coefficient)
    dtype = compute_dtype(chosen_rewards, rejected_rewards)
    if margin is None:
        margin_value = 0.0
    elif isinstance(margin, torch.Tensor):
        check_float_tensor("margin", margin)
        if tuple(margin.shape) not in ((), (batch_size,)):
            raise ValueError(
                f"margin must be 0-d or [B] = [{batch_size}], got shape {tuple(margin.shape)}"
            )
        margin_value = margin.detach().to(dtype)
    else:
        margin_value = check_finite("margin", margin)

    r_w, r_l = chosen_rewards.to(dtype), rejected_rewards.to(dtype)
    loss = -F.logsigmoid(r_w - r_l - margin_value).mean()
    if center_coefficient > 0:
        loss = loss + center_coefficient * ((r_w + r_l) ** 2).mean()

    both = torch.cat([r_w, r_l])
    metrics = {
        "accuracy": metric((r_w > r_l).to(dtype).mean()),
        "margin": metric((r_w - r_l).mean()),
        "min_reward": metric(both.min()),
        "mean_reward": metric(both.mean()),
        "max_reward": metric(both.max()),
        "rewards/chosen": metric(r_w.mean()),
        "rewards/rejected": metric(r_l.mean()),
    }
    return loss, metrics


def votes_to_score(
    upvotes: int | torch.Tensor, accepted: bool | torch.Tensor
) -> int | torch.Tensor:
    """A Stack Exchange answer's preference score from its votes, as in StackLLaMA.

    Askell et al., 2021, "A General Language Assistant as a Laboratory for Alignment" (preference
    model pre-training), used by Beeching et al., 2023, "StackLLaMA: A hands-on guide to train
    LLaMA with RLHF" (the ``lvwerra/stack-exchange-paired`` data):

        score = round(log2(1 + upvotes)) + (1 if accepted else 0),   and −1 when upvotes < 0

    (a negatively voted answer scores −1 whether or not it was accepted). log2(1 + n) is never
    exactly half-way between integers for an integer n >= 0, so the rounding rule is moot.

    Args:
        upvotes: an int, or an integer tensor of any shape.
        accepted: a bool (or 0/1 int), or a bool/integer tensor broadcastable to ``upvotes``.

    Returns:
        An int for int input; otherwise an int64 tensor of the broadcast shape.
    """
    if isinstance(upvotes, torch.Tensor):
        dtype = upvotes.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TypeError(f"upvotes must be an integer tensor, got {upvotes.dtype}")
        accepted = torch.as_tensor(accepted, device=upvotes.device)
        if accepted.dtype.is_floating_point or accepted.dtype.is_complex:
            raise TypeError(f"accepted must be a bool or integer tensor, got {accepted.dtype}")
        votes = upvotes.to(torch.float64).clamp(min=0)  # clamp: log2 of <= 0 is never used
        score = torch.round(torch.log2(1 + votes)).to(torch.int64) + (accepted != 0).to(torch.int64)
        return torch.where(upvotes < 0, torch.full_like(score, -1), score)
    if not isinstance(upvotes, Integral) or isinstance(upvotes, bool):
        raise TypeError(
            f"upvotes must be an int or an integer tensor, got {type(upvotes).__name__}"
        )
    if isinstance(accepted, torch.Tensor):
        raise TypeError("accepted must be a bool when upvotes is an int, got a tensor")
    if upvotes < 0:
        return -1
    return round(math.log2(1 + int(upvotes))) + (1 if accepted else 0)
