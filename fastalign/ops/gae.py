"""``gae``: generalised advantage estimation as a batched reverse scan (`docs/ALGORITHMS.md` §8).

Layer 2: checks and the dispatch. The scan runs in ``fastalign.kernels.gae`` (Triton, one
program per block of rows), ``fastalign._C.gae_forward`` (C++, rows in parallel,
``csrc/gae_cpu.cpp``) or ``gae_reference`` below (a Python loop, the ground truth). Advantages
and returns are training targets, not functions to differentiate: all three return detached
tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastalign.ops._backends import resolve_impl
from fastalign.ops._checks import (
    check_mask,
    check_same_device,
    check_tensor,
    check_unit_interval,
)


def _kernel(impl: str) -> Callable:
    """The forward entry point of a fused implementation (GAE has no backward)."""
    if impl == "triton":
        from fastalign.kernels.gae import gae_forward  # on first use, as the other ops

        return gae_forward
    from fastalign.ops._extension import EXTENSION

    return EXTENSION.gae_forward


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of each response token by GAE(γ, λ).

    Per row, only the tokens where ``mask`` is true take part, scanned from the last to the first:
    ``δ_t = r_t + γ·V_next − V_t`` with ``V_next`` the value of the next masked token of the row
    (0 after the last one), ``A_t = δ_t + γλ·A_next`` and ``R_t = A_t + V_t``. Tokens outside the
    mask (prompt, padding, holes) get advantage 0 and return 0 and do not break the chain.

    Args:
        rewards: [B, T] per-token rewards (e.g. ``kl_shaped_rewards``), floating point.
        values: [B, T] value estimates, floating point.
        mask: [B, T] bool (or 0/1 integer): the response tokens.
        gamma: discount in [0, 1]. lam: GAE λ in [0, 1].
        impl: "auto" (Triton on CUDA, the C++ kernel on CPU), "triton", "cpp" or "reference".

    Returns:
        ``(advantages, returns)``, [B, T], float32 (float64 for float64 rewards), detached.
    """
    check_tensor("rewards", rewards, floating=True)
    check_tensor("values", values, floating=True)
    check_mask("mask", mask)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be 2-D [B, T], got shape {tuple(rewards.shape)}")
    if values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(
            f"rewards, values and mask must have the same shape [B, T], got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    check_same_device(rewards=rewards, values=values, mask=mask)
    check_unit_interval("gamma", gamma)
    check_unit_interval("lam", lam)

    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    rewards = rewards.detach().to(dtype).contiguous()
    values = values.detach().to(dtype).contiguous()
    mask = mask.to(torch.bool).contiguous()
    chosen = resolve_impl(impl, rewards.device, dtype)
    if chosen == "reference" or rewards.numel() == 0:
        return gae_reference(rewards, values, mask, gamma=float(gamma), lam=float(lam))
    return _kernel(chosen)(rewards, values, mask, float(gamma), float(lam))


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
