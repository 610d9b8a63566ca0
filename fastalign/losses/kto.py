"""KTO, the unpaired preference loss (ALGORITHMS.md §6), on per-sequence log-probabilities."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastalign.losses._common import Metrics, compute_dtype, metric
from fastalign.losses.options import KTOOptions
from fastalign.ops._checks import check_per_sequence

__all__ = ["kto_loss", "kto_mismatched_indices"]


def kto_mismatched_indices(
    batch_size: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Which completion each prompt is paired with in KTO's KL batch: ``torch.roll(arange(B), 1)``.

    Example i gets the completion of example i − 1 (and example 0 the last one): TRL's
    ``_get_kl_dataset`` builds the KL batch with ``completions[-1:] + completions[:-1]``, "a +1
    offset to the order of completions". Every completion of the batch is reused exactly once and
    no example keeps its own, so the mismatched outputs y' are the same set as the matched ones.

    Args:
        batch_size: B >= 2 (with B = 1 the only "mismatched" completion is the matched one).
        device: where to create the index tensor.

    Returns:
        [B] int64 ``idx`` such that the KL pair of example i is (prompt_i, completion_{idx[i]}).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 2:
        raise ValueError(
            f"batch_size must be >= 2 for mismatched pairs (KTO's KL estimate), got {batch_size}"
        )
    return torch.roll(torch.arange(batch_size, device=device), 1)


def _reference_point(
    policy_kl_logps: torch.Tensor | None,
    ref_kl_logps: torch.Tensor | None,
    dtype: torch.dtype,
    process_group,
) -> torch.Tensor:
    """z_ref = max(0, mean(policy_kl − ref_kl)), detached, averaged over the process group."""
    if policy_kl_logps is None:
        return torch.zeros((), dtype=dtype)
    kl = (policy_kl_logps.to(dtype) - ref_kl_logps.to(dtype)).mean().detach()
    if process_group is not None:
        # Each rank contributes its batch mean with equal weight, as TRL's gather-then-mean.
        kl = kl.clone()
        dist.all_reduce(kl, op=dist.ReduceOp.SUM, group=process_group)
        kl = kl / dist.get_world_size(process_group)
    return kl.clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    policy_kl_logps: torch.Tensor | None,
    ref_kl_logps: torch.Tensor | None,
    desirable: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    process_group=None,
    loss_type: str = "kto",
    options: KTOOptions | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """KTO: Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic Optimization".

    Each example is (x, y, desirable). With r = log π_θ(y|x) − log π_ref(y|x) and the reference
    point z_ref = max(0, mean over the KL batch of [log π_θ(y'|x) − log π_ref(y'|x)]), where y' is
    a mismatched completion (see ``kto_mismatched_indices``), z_ref detached:

        desirable:    w_d·(1 − σ(β·(r − z_ref)))
        undesirable:  w_u·(1 − σ(β·(z_ref − r)))

    and the loss is the mean of these weighted per-example losses over the batch, as TRL's
    ``KTOTrainer`` (loss_type "kto"). 1 − σ(x) is computed as σ(−x). The paper recommends keeping
    w_d·n_desirable : w_u·n_undesirable between 1:1 and 4:3 over the dataset; that is the
    trainer's business, not checked here.

    ``loss_type="apo_zero_unpaired"`` is the unpaired APO-zero of D'Oosterlinck et al., 2024,
    "Anchored Preference Optimization and Contrastive Revisions" (TRL's KTO loss type of that
    name): no reference point, desirable w_d·(1 − σ(β·r)), undesirable w_u·σ(β·r); it takes no
    KL log-probs and any batch size B >= 1, and logs "kl" = 0.

    Args:
        policy_logps: [B] float, log π_θ(y|x) summed over the completion's tokens.
        ref_logps: [B] float, log π_ref(y|x).
        policy_kl_logps: [B_kl] float, log π_θ(y'|x) on the mismatched pairs, or None (with
            ``ref_kl_logps`` None too) for z_ref = 0, TRL's ``calculate_KL=False``.
        ref_kl_logps: [B_kl] float, log π_ref(y'|x), or None.
        desirable: [B] bool, True where y is a desirable completion.
        beta: β > 0.
        desirable_weight: w_d >= 0.
        undesirable_weight: w_u >= 0.
        process_group: optional ``torch.distributed`` group; when given, the batch-mean KL is
            all-reduced (averaged over the group's ranks) before the clamp, so every rank uses
            the same z_ref. One all-reduce per call, so every rank must call.
        loss_type: "kto" or "apo_zero_unpaired" (see above).
        options: a prepared :class:`~fastalign.losses.KTOOptions` instead of ``beta``,
            ``desirable_weight``, ``undesirable_weight`` and ``loss_type``.

    Returns:
        ``(loss, metrics)``: loss 0-d float32 (float64 for float64 inputs). Metrics, detached 0-d
        float32: "kl" (z_ref), "rewards/chosen" and "rewards/rejected" (mean β·r over the
        desirable / undesirable examples), "rewards/margins" (their difference),
        "logps/chosen", "logps/rejected" (mean policy log-probs per group), "count/chosen",
        "count/rejected", and the sums "rewards/chosen_sum", "rewards/rejected_sum",
        "logps/chosen_sum", "logps/rejected_sum" (TRL logs sums and counts so that means can be
        aggregated exactly over steps and ranks). A group absent from the batch has mean 0 (not
        NaN) and count 0.

    Raises:
        ValueError: B = 1 with loss_type "kto" (ALGORITHMS.md §6: KTO needs a batch of at least
            2, for its mismatched-pair KL), KL log-probs with "apo_zero_unpaired", bad shapes,
            β <= 0 or negative weights.
    """
    batch_size = check_per_sequence(policy_logps=policy_logps, ref_logps=ref_logps)
    options = KTOOptions.from_arguments(options, beta=beta, desirable_weight=desirable_weight,
                                        undesirable_weight=undesirable_weight,
                                        loss_type=loss_type)
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError(
            "policy_kl_logps and ref_kl_logps must both be tensors or both be None (z_ref = 0)"
        )
    if not options.uses_kl and policy_kl_logps is not None:
        raise ValueError(f"loss_type {options.loss_type!r} has no KL reference point: pass "
                         f"policy_kl_logps=None and ref_kl_logps=None")
    if options.uses_kl and batch_size < 2:
        raise ValueError(
            "KTO needs a batch of at least 2 examples (B >= 2): the KL reference point pairs "
            f"each prompt with another example's completion; got B={batch_size}"
        )
    if policy_kl_logps is not None:
        check_per_sequence(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    if not isinstance(desirable, torch.Tensor):
        raise TypeError(f"desirable must be a torch.Tensor, got {type(desirable).__name__}")
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {desirable.dtype}")
    if tuple(desirable.shape) != (batch_size,):
        raise ValueError(
            f"desirable must have shape [B] = [{batch_size}], got {tuple(desirable.shape)}"
        )
    beta = options.beta
    desirable_weight, undesirable_weight = options.desirable_weight, options.undesirable_weight

    dtype = compute_dtype(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps)
    kl = _reference_point(policy_kl_logps, ref_kl_logps, dtype, process_group).to(
        policy_logps.device
    )
    policy = policy_logps.to(dtype)
    logratios = policy - ref_logps.to(dtype)

    # With apo_zero_unpaired, kl is 0: the same formulas, anchored at the reference itself.
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (logratios - kl))
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (kl - logratios))
    loss = torch.where(desirable, desirable_losses, undesirable_losses).mean()

    rewards = beta * logratios
    undesirable = ~desirable
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    n_chosen = desirable.sum().to(dtype)
    n_rejected = batch_size - n_chosen
    sums = {
        "rewards/chosen_sum": torch.where(desirable, rewards, zero).sum(),
        "rewards/rejected_sum": torch.where(undesirable, rewards, zero).sum(),
        "logps/chosen_sum": torch.where(desirable, policy, zero).sum(),
        "logps/rejected_sum": torch.where(undesirable, policy, zero).sum(),
    }
    # Means of an empty group are 0 (the sum is 0 and the count is clamped to 1), never NaN.
    chosen_rewards = sums["rewards/chosen_sum"] / n_chosen.clamp(min=1)
    rejected_rewards = sums["rewards/rejected_sum"] / n_rejected.clamp(min=1)
    metrics = {
        "kl": metric(kl),
        "rewards/chosen": metric(chosen_rewards),
        "rewards/rejected": metric(rejected_rewards),
        "rewards/margins": metric(chosen_rewards - rejected_rewards),
        "logps/chosen": metric(sums["logps/chosen_sum"] / n_chosen.clamp(min=1)),
        "logps/rejected": metric(sums["logps/rejected_sum"] / n_rejected.clamp(min=1)),
        "count/chosen": metric(n_chosen),
        "count/rejected": metric(n_rejected),
    }
    metrics.update({name: metric(value) for name, value in sums.items()})
    return loss, metrics
