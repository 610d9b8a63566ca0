"""TRL's GRPO loss types and options, and NaN rewards, against a plain-Python reference.

The reference below is written from the formulas (TRL 1.16's semantics, ALGORITHMS.md §8) with
nested lists of floats and loops over tokens. Quantities the library detaches (CISPO's clipped
weight, VESPO's φ, the off-policy mask) are computed in the reference from ``frozen``, a fixed
copy of the log-probs, so that central finite differences of the reference give the library's
gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastalign.losses.grpo import (
    grpo_advantages,
    grpo_loss,
    normalize_then_sum_advantages,
    rloo_advantages,
)

NAN = float("nan")
SHAPES = [(4, 6), (3, 7)]  # a round shape and an odd one


def batch(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t = shape
    logps = -torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 0.1
    old = logps + torch.randn(shape, generator=g, dtype=torch.float64) * 0.4
    ref = logps + torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[-1] = 0 if b > 3 else lengths[-1]  # an empty completion
    mask = torch.arange(t)[None, :] < lengths[:, None]
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    adv[0] = -abs(float(adv[0])) - 0.5  # both signs present
    adv[1] = abs(float(adv[1])) + 0.5
    entropies = torch.rand(shape, generator=g, dtype=torch.float64) * 3
    # padding holds garbage the loss must not see
    logps_padded = torch.where(mask, logps, torch.full_like(logps, float("nan")))
    return logps, logps_padded, old, ref, mask, adv, entropies


def rows(x):
    return x.detach().tolist()


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def ref_loss(lp, frozen, old, ref, m, adv, ent, *, loss_type="grpo", clip=0.2, clip_high=None,
             beta=0.0, level="token", bias=False, delta=None, quantile=1.0, tau_pos=1.0,
             tau_neg=1.05, k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0):
    high = clip if clip_high is None else clip_high
    B, T = len(m), len(m[0])
    kept_entropies = sorted(ent[b][t] for b in range(B) for t in range(T) if m[b][t])
    threshold = -math.inf
    if quantile < 1.0 and kept_entropies:
        position = (1.0 - quantile) * (len(kept_entropies) - 1)  # linear interpolation
        lo, hi = math.floor(position), math.ceil(position)
        threshold = kept_entropies[lo] + (kept_entropies[hi] - kept_entropies[lo]) * (position - lo)
    loss = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = sum(m[b])
        a = adv[b]
        if level == "sequence":
            mean_log = sum(lp[b][t] - old[b][t] for t in range(T) if m[b][t]) / max(n, 1)
        log_w = sum(min(max(frozen[b][t] - old[b][t], -20), 20) for t in range(T) if m[b][t])
        log_w = min(max(log_w, math.log(1e-8)), 20.0)
        k, lam = (k_pos, lam_pos) if a >= 0 else (k_neg, lam_neg)
        phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
        seq_kl = sum(old[b][t] - frozen[b][t] for t in range(T) if m[b][t]) / max(n, 1)
        keep_sequence = delta is None or a >= 0 or seq_kl <= delta
        for t in range(T):
            if not m[b][t]:
                continue
            ratio = math.exp(mean_log if level == "sequence" else lp[b][t] - old[b][t])
            if loss_type == "cispo":
                frozen_ratio = math.exp(frozen[b][t] - old[b][t]) if level == "token" else \
                    math.exp(sum(frozen[b][s] - old[b][s] for s in range(T) if m[b][s]) / n)
                policy = -min(frozen_ratio, high) * a * lp[b][t]
            elif loss_type == "sapo":
                tau = tau_pos if a > 0 else tau_neg
                policy = -4.0 / tau / (1.0 + math.exp(-tau * (ratio - 1.0))) * a
            elif loss_type == "vespo":
                policy = -phi * a * lp[b][t]
            else:
                policy = -min(ratio * a, min(max(ratio, 1 - clip), 1 + high) * a)
            if not keep_sequence or ent[b][t] < threshold:
                policy = 0.0
            logr = ref[b][t] - lp[b][t]
            kl = math.exp(logr) - 1 - logr
            loss[b][t] = policy + beta * kl * (ratio if bias else 1.0)
    aggregation = {"cispo": "dapo", "vespo": "dapo", "sapo": "grpo"}.get(loss_type, loss_type)
    if aggregation in ("dapo", "bnpo"):
        count = sum(sum(r) for r in m)
        return sum(sum(r) for r in loss) / max(count, 1)
    if aggregation == "dr_grpo":
        return sum(sum(r) for r in loss) / (B * T)
    if aggregation == "luspo":
        return sum(sum(r) for r in loss) / B
    return sum(sum(r) / max(sum(mr), 1) for r, mr in zip(loss, m)) / B


def fd_grad(f, x, h=1e-6):
    grad = []
    for b in range(len(x)):
        row = []
        for t in range(len(x[0])):
            up, down = [list(r) for r in x], [list(r) for r in x]
            up[b][t] += h
            down[b][t] -= h
            row.append((f(up) - f(down)) / (2 * h))
        grad.append(row)
    return torch.tensor(grad, dtype=torch.float64)


CASES = [
    dict(loss_type="bnpo"),
    dict(loss_type="cispo", clip_high=1.1),
    dict(loss_type="cispo", clip_high=1.1, importance_sampling_level="sequence"),
    dict(loss_type="sapo"),
    dict(loss_type="sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=0.5),
    dict(loss_type="vespo"),
    dict(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=0.0),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1),
    dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=True),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1,
         use_bias_correction_kl=True),
    dict(loss_type="grpo", off_policy_mask_threshold=0.05),
    dict(loss_type="dr_grpo", top_entropy_quantile=0.3, beta=0.1),
    dict(loss_type="grpo", top_entropy_quantile=0.0),
]
REFERENCE_NAMES = {
    "importance_sampling_level": "level", "use_bias_correction_kl": "bias",
    "off_policy_mask_threshold": "delta", "top_entropy_quantile": "quantile",
    "sapo_temperature_pos": "tau_pos", "sapo_temperature_neg": "tau_neg",
    "vespo_k_pos": "k_pos", "vespo_lambda_pos": "lam_pos", "vespo_k_neg": "k_neg",
    "vespo_lambda_neg": "lam_neg",
}


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("shape", SHAPES)
def test_variant_matches_reference(shape, options):
    logps, padded, old, ref, mask, adv, entropies = batch(shape)
    leaf = padded.clone().requires_grad_(True)
    options = {"beta": 0.0, **options}
    loss, _ = grpo_loss(leaf, old, ref, adv, mask, entropies=entropies, **options)
    reference = {REFERENCE_NAMES.get(k, k): v for k, v in options.items()}
    lp, o, r, m, a, e = rows(logps), rows(old), rows(ref), mask.tolist(), rows(adv), rows(entropies)
    expected = ref_loss(lp, lp, o, r, m, a, e, **reference)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    upstream = 1.7  # a non-unit upstream gradient
    (loss * upstream).backward()
    grad = fd_grad(lambda x: ref_loss(x, lp, o, r, m, a, e, **reference), lp) * upstream
    torch.testing.assert_close(leaf.grad, torch.where(mask, grad, 0.0), atol=1e-6, rtol=0)


def test_bias_correction_changes_the_on_policy_gradient_only():
    """On-policy (no old log-probs) the corrected KL has the same value; its gradient gains
    k·∇log π per token (the score-function term of the unbiased reverse-KL gradient)."""
    logps, _, _, ref, mask, adv, _ = batch((4, 6), seed=3)
    plain, corrected = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    loss_plain, _ = grpo_loss(plain, None, ref, adv, mask, beta=0.5)
    loss_corrected, _ = grpo_loss(corrected, None, ref, adv, mask, beta=0.5,
                                  use_bias_correction_kl=True)
    assert loss_corrected.item() == pytest.approx(loss_plain.item(), abs=1e-12)
    loss_plain.backward()
    loss_corrected.backward()
    logr = ref - logps
    k3 = torch.where(mask, torch.expm1(logr) - logr, 0.0)
    lengths = mask.sum(1, keepdim=True).clamp(min=1)
    expected_extra = 0.5 * k3 / lengths / mask.shape[0]  # the "grpo" aggregation's weights
    torch.testing.assert_close(corrected.grad - plain.grad, expected_extra)
    assert float(expected_extra.abs().max()) > 1e-3


def test_high_entropy_tokens_only():
    logps, _, old, _, mask, adv, entropies = batch((3, 7), seed=1)
    leaf = logps.clone().requires_grad_(True)
    grpo_loss(leaf, old, None, adv, mask, beta=0.0, top_entropy_quantile=0.25,
              entropies=entropies)[0].backward()
    kept = leaf.grad != 0
    values = entropies[mask]
    assert kept.sum() == (values >= torch.quantile(values, 0.75)).sum()
    assert bool((entropies[kept].min() >= entropies[mask & ~kept].max()))


@pytest.mark.parametrize("options, message", [
    (dict(loss_type="gspo"), "loss_type"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(off_policy_mask_threshold=0.0), "off_policy_mask_threshold"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(top_entropy_quantile=0.5), "entropies"),
    (dict(sapo_temperature_pos=0.0), "sapo_temperature_pos"),
    (dict(vespo_lambda_neg=-1.0), "vespo_lambda_neg"),
    (dict(vespo_k_pos=-1.0), "vespo_k_pos"),
    (dict(use_bias_correction_kl=1), "use_bias_correction_kl"),
])
def test_variant_options_are_validated(options, message):
    logps, _, old, ref, mask, adv, _ = batch((4, 6))
    with pytest.raises((ValueError, TypeError), match=message):
        grpo_loss(logps, old, ref, adv, mask, **options)


# ----------------------------------------------------------------------------------------------
# Advantages: NaN rewards, GDPO, RLOO options
# ----------------------------------------------------------------------------------------------


def ref_group_advantages(group, scale):
    scored = [r for r in group if not math.isnan(r)]
    mean = sum(scored) / len(scored) if scored else 0.0
    n = len(scored)
    std = math.sqrt(sum((r - mean) ** 2 for r in scored) / (n - 1)) if n > 1 else 0.0
    return [0.0 if math.isnan(r) else (r - mean) / ((std if scale else 1.0 - 1e-4) + 1e-4)
            for r in group]


def test_nan_rewards_get_advantage_zero_and_leave_the_baseline():
    rewards = [1.0, NAN, 3.0, 0.0, NAN, NAN, NAN, NAN, 2.0, NAN, 5.0, 5.0]
    tensor = torch.tensor(rewards, dtype=torch.float64)
    for scale in (True, False):
        expected = [a for k in range(3)
                    for a in ref_group_advantages(rewards[4 * k:4 * k + 4], scale)]
        got = grpo_advantages(tensor, 4, scale_rewards=scale)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    # "batch": one std over every scored reward of the batch
    scored = [r for r in rewards if not math.isnan(r)]
    mean = sum(scored) / len(scored)
    std = math.sqrt(sum((r - mean) ** 2 for r in scored) / (len(scored) - 1))
    got = grpo_advantages(tensor, 4, scale_rewards="batch")
    group_means = [sum(r for r in rewards[4 * k:4 * k + 4] if not math.isnan(r)) /
                   max(sum(not math.isnan(r) for r in rewards[4 * k:4 * k + 4]), 1)
                   for k in range(3)]
    expected = [0.0 if math.isnan(r) else (r - group_means[i // 4]) / (std + 1e-4)
                for i, r in enumerate(rewards)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(grpo_advantages(torch.full((4,), NAN), 2), torch.zeros(4))


def test_rloo_nan_rewards_and_options():
    rewards = [1.0, NAN, 3.0, 4.0, NAN, NAN, 7.0, NAN]
    expected = []
    for k in range(2):
        group = rewards[4 * k:4 * k + 4]
        scored = [r for r in group if not math.isnan(r)]
        for r in group:
            if math.isnan(r) or len(scored) < 2:
                expected.append(0.0)
            else:
                expected.append(r - (sum(scored) - r) / (len(scored) - 1))
    tensor = torch.tensor(rewards, dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(tensor, 4),
                               torch.tensor(expected, dtype=torch.float64))
    # normalize_advantages: over the completions with a baseline (NaN rewards and a group's only
    # scored completion have none: they stay at 0)
    has_baseline = [not math.isnan(r) and sum(not math.isnan(x) for x in
                                              rewards[i // 4 * 4:i // 4 * 4 + 4]) > 1
                    for i, r in enumerate(rewards)]
    scored_advantages = [a for a, keep in zip(expected, has_baseline) if keep]
    mean = sum(scored_advantages) / len(scored_advantages)
    std = math.sqrt(sum((a - mean) ** 2 for a in scored_advantages) /
                    (len(scored_advantages) - 1))
    normalised = [(a - mean) / (std + 1e-4) if keep else 0.0
                  for a, keep in zip(expected, has_baseline)]
    torch.testing.assert_close(rloo_advantages(tensor, 4, normalize_advantages=True),
                               torch.tensor(normalised, dtype=torch.float64))
    # reward_clip_range clamps the rewards before the baseline
    clipped = rloo_advantages(torch.tensor([0.0, 10.0, -10.0, 1.0]), 2,
                              reward_clip_range=(-1.0, 2.0))
    torch.testing.assert_close(clipped, torch.tensor([-2.0, 2.0, -2.0, 2.0]))
    with pytest.raises(ValueError, match="reward_clip_range"):
        rloo_advantages(tensor, 4, reward_clip_range=(1.0, -1.0))


def test_normalize_then_sum_matches_reference():
    per_function = [[1.0, 0.0], [2.0, NAN], [4.0, 1.0], [NAN, NAN],
                    [0.0, 3.0], [0.0, 1.0], [1.0, NAN], [5.0, 2.0]]
    weights = [1.0, 0.5]
    group = 4
    summed = []
    for i, row in enumerate(per_function):
        start = i // group * group
        total, any_scored = 0.0, False
        for f, value in enumerate(row):
            if math.isnan(value):
                continue
            any_scored = True
            column = [per_function[j][f] for j in range(start, start + group)
                      if not math.isnan(per_function[j][f])]
            mean = sum(column) / len(column)
            n = len(column)
            std = math.sqrt(sum((c - mean) ** 2 for c in column) / (n - 1)) if n > 1 else 0.0
            total += weights[f] * (value - mean) / (std + 1e-4)
        summed.append(total if any_scored else NAN)
    scored = [s for s in summed if not math.isnan(s)]
    mean = sum(scored) / len(scored)
    std = math.sqrt(sum((s - mean) ** 2 for s in scored) / (len(scored) - 1))
    expected = [0.0 if math.isnan(s) else (s - mean) / (std + 1e-4) for s in summed]
    got = normalize_then_sum_advantages(torch.tensor(per_function, dtype=torch.float64), group,
                                        weights=torch.tensor(weights))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
