"""Triton kernel for generalised advantage estimation (GAE) as a batched reverse scan.

Math in ``docs/ALGORITHMS.md`` §8; the semantics are those of ``fastalign.ops.gae.gae_reference``.
Per row b of [B, T] rewards r, values V and a bool mask M, only the positions with M true take
part. Walking them from the last to the first, with V_next the value at the next masked position
of the row (0 after the last one):

    δ_t = r_t + γ·V_next − V_t,        A_t = δ_t + γλ·A_next,        R_t = A_t + V_t

and A = R = 0 outside the mask. Skipping an unmasked position leaves (V_next, A_next) untouched,
so padding or prompt tokens between response tokens do not break the recursion.

One launch, ``_gae_kernel``: each program owns BLOCK_B rows, held as a vector, and loops t from
T − 1 down to 0, carrying (V_next, A_next) per row in float32 registers: B·T loads of each input
and B·T stores of each output, no [B, T] intermediate. The recursion is sequential in t; the
parallelism is over rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels import _launch

__all__ = ["gae_forward"]


@triton.jit
def _gae_kernel(
    # pointers
    rewards_ptr, values_ptr,           # float32 [B, T]
    mask_ptr,                          # uint8 [B, T] (a bool tensor viewed as bytes)
    adv_ptr, ret_ptr,                  # outputs, float32 [B, T]
    # shapes (every tensor is contiguous, so the row stride is T)
    B, T,
    # scalars
    gamma, gamma_lam,                  # γ and γ·λ (the product rounded once, as the reference)
    # meta-parameters
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    row_start = rows.to(tl.int64) * T  # B·T may pass 2^31 for long rollouts
    next_value = tl.zeros([BLOCK_B], dtype=tl.float32)
    running = tl.zeros([BLOCK_B], dtype=tl.float32)
    for i in range(0, T):              # t = T − 1 − i: a reverse scan (no negative range steps)
        offs = row_start + (T - 1 - i)
        take = tl.load(mask_ptr + offs, mask=row_mask, other=0) != 0
        load_mask = row_mask & take    # no need to read what is outside the mask
        reward = tl.load(rewards_ptr + offs, mask=load_mask, other=0.0)
        value = tl.load(values_ptr + offs, mask=load_mask, other=0.0)
        delta = (reward + gamma * next_value) - value
        advantage = delta + gamma_lam * running
        running = tl.where(take, advantage, running)
        next_value = tl.where(take, value, next_value)
        tl.store(adv_ptr + offs, tl.where(take, advantage, 0.0), mask=row_mask)
        tl.store(ret_ptr + offs, tl.where(take, advantage + value, 0.0), mask=row_mask)


def _default_config(batch: int) -> dict:
    """The pinned config (H100; not yet timed). One row per thread and small programs: each step
    of the loop is a dependent chain on loads, so many programs in flight hide the latency better
    than wide ones; 32 rows per warp keep every lane busy for B ≥ 32."""
    return dict(BLOCK_B=min(32, max(16, triton.next_power_of_2(batch))), num_warps=1)


def gae_forward(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each float32 [B, T], from rewards and values (float32 [B, T],
    contiguous) and mask (bool [B, T], contiguous), all on one device.

    Equal to ``gae_reference(rewards, values, mask, gamma=gamma, lam=lam)`` up to float32
    rounding; both outputs are 0 outside the mask.
    """
    _launch.check_layout("rewards", rewards, torch.float32, (None, None))
    shape = tuple(rewards.shape)
    _launch.check_layout("values", values, torch.float32, shape)
    _launch.check_layout("mask", mask, torch.bool, shape)
    _launch.check_one_device(rewards, values, mask)

    batch, length = shape
    advantages = torch.empty_like(rewards)
    returns = torch.empty_like(rewards)
    if batch == 0 or length == 0:
        return advantages, returns
    config = _default_config(batch)
    grid = (triton.cdiv(batch, config["BLOCK_B"]),)
    with _launch.device_guard(rewards.device):
        _gae_kernel[grid](
            rewards, values, mask.view(torch.uint8), advantages, returns,
            batch, length, float(gamma), float(gamma) * float(lam),
            BLOCK_B=config["BLOCK_B"], num_warps=config["num_warps"],
        )
    return advantages, returns
