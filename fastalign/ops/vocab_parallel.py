"""The collectives of the fused ops on an LM head whose vocabulary is sharded across the ranks
of a process group; the ops themselves (``linear_logprobs``, ``linear_kl``) call them.

Tensor-parallel heads (Megatron-style) give rank r the rows [v0_r, v0_r + V_r) of the weight;
every rank holds the same hidden states and the same (global) target ids. Each rank streams its
own shard with the ordinary kernels, which return per token the log-sum-exp ``lse_r`` of the
shard's logits, Σ p·z over the shard, and the target logit when the target is on the shard. The
ranks then combine those numbers (``ALGORITHMS.md`` §1, last paragraph):

    M   = max_r lse_r                               (all-reduce MAX)
    S   = Σ_r e^{lse_r − M}                         (one all-reduce SUM of three numbers a token:
    Σpz = Σ_r e^{lse_r − M}·Σpz_r / S                the rescaled sums and the target logit,
    z_y = Σ_r z_y,r                                  0 on every shard but the target's)
    lse = M + log S ;  logp = z_y − lse ;  entropy = lse − Σpz

Backward runs each shard's kernel with the *global* lse and Σ p·z, which makes its output the
exact gradient of the shard's columns: ``dW`` (and ``db``) stay local; ``dh`` is the sum over
shards, all-reduced so that every rank holds the full gradient of its (replicated) hidden states.

The outputs are the same on every rank, and backward assumes every rank back-propagates the same
upstream gradient into them, as tensor-parallel training does (each rank computes the same loss
from replicated activations).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Local target of an ignored token. Shard-local ids are >= 0, so it can never collide with one
# (the caller's ignore_index could: -100 is a valid local id nowhere, but ignore_index = 3 is).
LOCAL_IGNORE = -1


def check_vocab_shards(process_group, vocab_start_index, weight: torch.Tensor) -> int:
    """Check that the ranks' shards tile [0, V) exactly; returns V (the whole vocabulary).

    One all-gather of two integers per call: a gap or an overlap between shards would otherwise
    give every token a wrong normaliser, silently.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised; "
                         "call torch.distributed.init_process_group first")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. "
                        f"dist.group.WORLD) or None, got {type(process_group).__name__}")
    if isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int) \
            or vocab_start_index < 0:
        raise ValueError(f"vocab_start_index must be an integer >= 0, got {vocab_start_index!r}")
    shard = torch.tensor([vocab_start_index, weight.shape[0]], dtype=torch.int64)
    if dist.get_backend(process_group) == "nccl":
        shard = shard.to(weight.device)
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(shards, shard, group=process_group)
    spans = sorted((int(s[0]), int(s[0]) + int(s[1]), rank) for rank, s in enumerate(shards))
    expected_start = 0
    for start, stop, rank in spans:
        if start != expected_start:
            listed = ", ".join(f"rank {r}: [{a}, {b})" for a, b, r in
                               sorted(spans, key=lambda span: span[2]))
            raise ValueError(
                f"the vocabulary shards must tile [0, V) without gaps or overlaps: rank {rank} "
                f"starts at vocab_start_index={start}, expected {expected_start} ({listed})")
        expected_start = stop
    return expected_start


def check_sharding(process_group, vocab_start_index, weight: torch.Tensor, impl: str) -> int:
    """The whole vocabulary's size V, after checking the sharding arguments of an op call.

    Without a process group the head is whole: ``vocab_start_index`` must be 0 and V is
    ``weight``'s rows. With one, the shards must tile [0, V) (``check_vocab_shards``) and the op
    needs a fused implementation.
    """
    if process_group is None:
        if vocab_start_index != 0:
            raise ValueError(f"vocab_start_index={vocab_start_index!r} needs a process_group "
                             "(the head's vocabulary sharded across ranks); without one it must "
                             "be 0")
        return weight.shape[0]
    vocab_size = check_vocab_shards(process_group, vocab_start_index, weight)
    if impl == "reference":
        raise ValueError("process_group needs a fused implementation (impl='auto', 'cpp' or "
                         "'triton'); the reference materialises one unsharded head")
    return vocab_size


def shard_local_targets(targets: torch.Tensor, vocab_start: int, shard_size: int,
                   ignore_index: int) -> torch.Tensor:
    """Shard-local target ids: y − v0 on this shard, ``shard_size`` (one past the shard: "on
    another shard") off it, LOCAL_IGNORE where ignored."""
    local = targets - vocab_start
    local = torch.where((local >= 0) & (local < shard_size), local, shard_size)
    return torch.where(targets == ignore_index, LOCAL_IGNORE, local)


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_hidden_grad(grad: torch.Tensor | None, group) -> torch.Tensor | None:
    """Sum a hidden-state gradient over the shards, in float32 (bf16 partial sums would each
    lose digits), and give it back in its own dtype."""
    if grad is None:
        return None
    wide = grad.double() if grad.dtype == torch.float64 else grad.float()
    return _all_reduce(wide, dist.ReduceOp.SUM, group).to(grad.dtype)


def combine_logprob_stats(logp_r, lse_r, sum_pz_r, local_targets, shard_size: int, group):
    """The whole vocabulary's (logp, entropy, lse, Σ p·z) per token from each shard's kernel output.

    ``logp_r`` etc. are what the shard's forward kernel returned with ``off_shard_targets``:
    ``logp_r`` in the output dtype, ``lse_r`` and ``sum_pz_r`` float64. ``logp`` and ``entropy``
    come back in ``logp_r``'s dtype, ``lse`` and ``sum_pz`` in float64 for backward.
    """
    valid = local_targets != LOCAL_IGNORE
    on_shard = valid & (local_targets < shard_size)
    # Ignored rows carry placeholders (the Triton kernels leave them unspecified).
    lse_r = torch.where(valid, lse_r, 0.0)
    sum_pz_r = torch.where(valid, sum_pz_r, 0.0)
    # Only the target's shard knows z_y; the others contribute 0 to the sum below.
    z_target = torch.where(on_shard, logp_r.double() + lse_r, 0.0)
    top = _all_reduce(lse_r.clone(), dist.ReduceOp.MAX, group)
    scale = torch.exp(lse_r - top)
    sums = _all_reduce(torch.stack([scale, scale * sum_pz_r, z_target]), dist.ReduceOp.SUM,
                       group)
    lse = top + torch.log(sums[0])
    sum_pz = sums[1] / sums[0]
    logp = torch.where(valid, torch.clamp(sums[2] - lse, max=0.0), 0.0)
    entropy = torch.where(valid, lse - sum_pz, 0.0)
    return logp.to(logp_r.dtype), entropy.to(logp_r.dtype), lse, sum_pz


def combine_kl_stats(kl_r, lse_r, ref_lse_r, group):
    """The whole vocabulary's (KL, lse, ref_lse) per token (float64) from each shard's."""
    # KL_r = Σ_shard p_r (z − r) − lse_r + ref_lse_r, so the shard's average of z − r is:
    mean_z_minus_r = kl_r + lse_r - ref_lse_r
    top = _all_reduce(torch.stack([lse_r, ref_lse_r]), dist.ReduceOp.MAX, group)
    scale = torch.exp(lse_r - top[0])
    sums = _all_reduce(torch.stack([scale, scale * mean_z_minus_r,
                                    torch.exp(ref_lse_r - top[1])]), dist.ReduceOp.SUM, group)
    lse = top[0] + torch.log(sums[0])
    ref_lse = top[1] + torch.log(sums[2])
    kl = sums[1] / sums[0] - lse + ref_lse
    return kl, lse, ref_lse
