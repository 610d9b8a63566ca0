"""PPO / GRPO / RLOO / TRPO losses against an independent plain-Python reference.

The reference at the top is written straight from the formulas (ALGORITHMS.md §4, §8, §9) in a
different style from the library: nested lists of Python floats, explicit loops over tokens,
``math.exp``. Values are compared directly; gradients of the library (float64 autograd) are compared
with central finite differences of the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign.losses.grpo import grpo_advantages, grpo_loss, rloo_advantages
from fastalign.losses.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    kl_shaped_rewards,
)
from fastalign.losses.masked import aggregate_token_loss, masked_mean, masked_var, masked_whiten
from fastalign.losses.ppo import ppo_policy_loss, ppo_total_loss, ppo_value_loss
from fastalign.losses.trpo import kl_line_search

# ----------------------------------------------------------------------------------------------
# Independent reference: lists of floats, loops over tokens
# ----------------------------------------------------------------------------------------------


def as_list(t: torch.Tensor) -> list:
    return t.detach().to(torch.float64).tolist()


def as_bools(m: torch.Tensor) -> list:
    return [[bool(v) for v in row] for row in m.tolist()]


def ref_masked_mean_all(x, m):
    total, count = 0.0, 0
    for row_x, row_m in zip(x, m):
        for value, keep in zip(row_x, row_m):
            if keep:
                total += value
                count += 1
    return total / count if count else 0.0


def ref_masked_mean_rows(x, m):
    return [ref_masked_mean_all([row_x], [row_m]) for row_x, row_m in zip(x, m)]


def ref_masked_mean_cols(x, m):
    columns = range(len(x[0]))
    return [ref_masked_mean_all([[row[j] for row in x]], [[row[j] for row in m]]) for j in columns]


def ref_masked_var(x, m, unbiased):
    selected = [v for row_x, row_m in zip(x, m) for v, keep in zip(row_x, row_m) if keep]
    n = len(selected)
    if n == 0:
        return 0.0
    mean = sum(selected) / n
    squares = sum((v - mean) ** 2 for v in selected)
    return squares / (n - 1) if unbiased and n > 1 else squares / n


def ref_whiten(x, m, shift_mean, eps=1e-8):
    mean = ref_masked_mean_all(x, m)
    std = math.sqrt(ref_masked_var(x, m, True) + eps)
    out = []
    for row_x, row_m in zip(x, m):
        out.append([((v - mean) / std + (0.0 if shift_mean else mean)) if keep else 0.0
                    for v, keep in zip(row_x, row_m)])
    return out


def ref_kl_token(logp, ref_logp, estimator):
    logr = ref_logp - logp
    if estimator == "k1":
        return -logr
    if estimator == "k2":
        return 0.5 * logr * logr
    if estimator == "k3":
        return math.exp(logr) - 1.0 - logr
    return abs(logr)


def ref_shaped_rewards(scores, logps, ref_logps, m, coef, estimator):
    rewards, non_score = [], []
    for b, row_m in enumerate(m):
        row = [(-coef * ref_kl_token(logps[b][t], ref_logps[b][t], estimator) if keep else 0.0)
               for t, keep in enumerate(row_m)]
        non_score.append(list(row))
        last = max((t for t, keep in enumerate(row_m) if keep), default=None)
        if last is not None:
            row[last] += scores[b]
        rewards.append(row)
    return rewards, non_score


def ref_aggregate(loss, m, mode, max_len=None):
    if mode in ("grpo", "seq_mean_token_mean"):
        return sum(ref_masked_mean_all([lr], [mr]) for lr, mr in zip(loss, m)) / len(loss)
    if mode in ("dapo", "token_mean"):
        return ref_masked_mean_all(loss, m)
    total = sum(v for lr, mr in zip(loss, m) for v, keep in zip(lr, mr) if keep)
    return total / (len(loss) * (max_len or len(loss[0])))


def ref_clip_metrics(low_clipped, high_clipped, m):
    """TRL's clip_ratio/*: token means, and the extreme per-sequence fractions."""
    rows = [b for b in range(len(m)) if any(m[b])]
    low_rows = [ref_masked_mean_all([low_clipped[b]], [m[b]]) for b in rows]
    high_rows = [ref_masked_mean_all([high_clipped[b]], [m[b]]) for b in rows]
    low, high = ref_masked_mean_all(low_clipped, m), ref_masked_mean_all(high_clipped, m)
    return {"clip_ratio/low_mean": low, "clip_ratio/low_min": min(low_rows, default=0.0),
            "clip_ratio/high_mean": high, "clip_ratio/high_max": max(high_rows, default=0.0),
            "clip_ratio/region_mean": low + high}


def ref_ppo_policy(logps, old, adv, m, clip=0.2, clip_high=None, dual_clip=None,
                   agg="token_mean"):
    high = clip if clip_high is None else clip_high
    loss = [[0.0] * len(m[0]) for _ in m]
    low_clipped = [[0.0] * len(m[0]) for _ in m]
    high_clipped = [[0.0] * len(m[0]) for _ in m]
    n = clipped = dual = 0
    kl_sum = ratio_sum = 0.0
    for b in range(len(m)):
        for t in range(len(m[0])):
            if not m[b][t]:
                continue
            ratio = math.exp(logps[b][t] - old[b][t])
            a = adv[b][t]
            plain = -a * ratio
            clipped_branch = -a * min(max(ratio, 1.0 - clip), 1.0 + high)
            value = max(plain, clipped_branch)
            if dual_clip is not None and a < 0:
                if value > -a * dual_clip:
                    dual += 1
                value = min(value, -a * dual_clip)
            loss[b][t] = value
            n += 1
            clipped += clipped_branch > plain
            low_clipped[b][t] = float(clipped_branch > plain and a < 0)
            high_clipped[b][t] = float(clipped_branch > plain and a > 0)
            kl_sum += 0.5 * (logps[b][t] - old[b][t]) ** 2
            ratio_sum += ratio
    metrics = {
        "policy/approx_kl": kl_sum / n if n else 0.0,
        **ref_clip_metrics(low_clipped, high_clipped, m),
        "policy/ratio_mean": ratio_sum / n if n else 0.0,
    }
    assert metrics["clip_ratio/region_mean"] == pytest.approx(clipped / n if n else 0.0)
    if dual_clip is not None:
        metrics["policy/dual_clipfrac"] = dual / n if n else 0.0
    return ref_aggregate(loss, m, agg), metrics


def ref_ppo_value(values, old, returns, m, clip=0.2):
    loss = [[0.0] * len(m[0]) for _ in m]
    errors = [[0.0] * len(m[0]) for _ in m]
    clipped = n = 0
    for b in range(len(m)):
        for t in range(len(m[0])):
            if not m[b][t]:
                continue
            v, v_old, r = values[b][t], old[b][t], returns[b][t]
            e1 = (v - r) ** 2
            if clip is None:
                e2 = e1
            else:
                e2 = (min(max(v, v_old - clip), v_old + clip) - r) ** 2
            loss[b][t] = 0.5 * max(e1, e2)
            errors[b][t] = e1
            clipped += e2 > e1
            n += 1
    metrics = {
        "value/clipfrac": clipped / n if n else 0.0,
        "value/mean": ref_masked_mean_all(values, m),
        "value/error": ref_masked_mean_all(errors, m),
    }
    return ref_masked_mean_all(loss, m), metrics


def ref_grpo(logps, old, ref, adv, m, clip=0.2, clip_high=None, beta=0.04, loss_type="grpo",
             max_len=None):
    high = clip if clip_high is None else clip_high
    loss = [[0.0] * len(m[0]) for _ in m]
    kls = [[0.0] * len(m[0]) for _ in m]
    low_clipped = [[0.0] * len(m[0]) for _ in m]
    high_clipped = [[0.0] * len(m[0]) for _ in m]
    for b in range(len(m)):
        for t in range(len(m[0])):
            if not m[b][t]:
                continue
            a = adv[b] if not isinstance(adv[b], list) else adv[b][t]
            ratio = math.exp(logps[b][t] - old[b][t])
            surrogate = min(ratio * a, min(max(ratio, 1.0 - clip), 1.0 + high) * a)
            logr = ref[b][t] - logps[b][t]
            kls[b][t] = math.exp(logr) - 1.0 - logr
            loss[b][t] = -surrogate + beta * kls[b][t]
            low_clipped[b][t] = float(ratio < 1.0 - clip and a < 0)
            high_clipped[b][t] = float(ratio > 1.0 + high and a > 0)
    metrics = {"kl": ref_masked_mean_all(kls, m),
               **ref_clip_metrics(low_clipped, high_clipped, m)}
    return ref_aggregate(loss, m, loss_type, max_len), metrics


def finite_difference_grad(f, x, h=1e-6):
    """Central differences of the scalar ``f(x)`` for ``x`` a list of lists of floats."""
    grad = []
    for b in range(len(x)):
        row = []
        for t in range(len(x[0])):
            up = [list(r) for r in x]
            down = [list(r) for r in x]
            up[b][t] += h
            down[b][t] -= h
            row.append((f(up) - f(down)) / (2 * h))
        grad.append(row)
    return torch.tensor(grad, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

SHAPES = [(3, 7), (5, 13)]  # a round-ish one and an awkward one


def random_batch(shape, *, seed=0, spread=0.3):
    """float64 per-token inputs; the mask has an empty row, a full row and a row with holes."""
    gen = torch.Generator().manual_seed(seed)
    batch, length = shape

    def randn():
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    logps = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    mask = torch.rand(shape, generator=gen) < 0.7
    mask[0] = False
    mask[1] = True
    if batch > 2:
        mask[2, ::2] = True
        mask[2, 1::2] = False
    return dict(
        logps=logps,
        old_logps=logps + spread * randn(),
        ref_logps=logps + 0.5 * randn(),
        advantages=randn(),
        mask=mask,
        values=randn(),
        old_values=randn() * 0.2,
        returns=randn(),
        scores=torch.randn(batch, generator=gen, dtype=torch.float64),
        upstream=randn(),
    )


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def assert_metrics(metrics, expected, atol=1e-10):
    assert set(metrics) == set(expected)
    for name, value in metrics.items():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad, name
        assert value.item() == pytest.approx(expected[name], abs=max(atol, 1e-6)), name


# ----------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [None, 0, 1])
def test_masked_mean_matches_reference(shape, dim):
    data = random_batch(shape)
    x, mask, g = leaf(data["values"]), data["mask"], data["upstream"]
    xs, ms = as_list(x), as_bools(mask)
    out = masked_mean(x, mask, dim=dim)
    ref = {None: lambda v: ref_masked_mean_all(v, ms), 0: lambda v: ref_masked_mean_cols(v, ms),
           1: lambda v: ref_masked_mean_rows(v, ms)}[dim]
    torch.testing.assert_close(out, torch.tensor(ref(xs), dtype=torch.float64))
    weights = [1.0] if dim is None else as_list(g[0, : out.numel()])
    out.backward(torch.tensor(weights, dtype=torch.float64).reshape(out.shape))

    def objective(v):
        result = ref(v)
        result = [result] if dim is None else result
        return sum(w * r for w, r in zip(weights, result))

    torch.testing.assert_close(x.grad, finite_difference_grad(objective, xs), atol=1e-7, rtol=0)


def test_masked_mean_of_nothing_is_zero_and_ignores_padding():
    x = leaf(torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]], dtype=torch.float64))
    empty = torch.zeros(2, 2, dtype=torch.bool)
    out = masked_mean(x, empty)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros(2, 2, dtype=torch.float64))
    rows = masked_mean(x.detach(), torch.tensor([[1, 0], [0, 0]]), dim=1)  # 0/1 integer mask
    torch.testing.assert_close(rows, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert masked_mean(x.detach(), torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == 1.5


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_var_matches_reference(shape, unbiased):
    data = random_batch(shape)
    x, mask = data["values"], data["mask"]
    out = masked_var(x, mask, unbiased=unbiased)
    assert out.item() == pytest.approx(ref_masked_var(as_list(x), as_bools(mask), unbiased))


def test_masked_var_with_one_or_no_token_is_zero():
    x = torch.tensor([[3.0, 5.0]])
    assert masked_var(x, torch.tensor([[True, False]])).item() == 0.0
    assert masked_var(x, torch.tensor([[False, False]])).item() == 0.0
    assert masked_var(x, torch.tensor([[True, True]])).item() == pytest.approx(2.0)
    assert masked_var(x, torch.tensor([[True, True]]), unbiased=False).item() == pytest.approx(1.0)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_whiten_matches_reference(shape, shift_mean):
    data = random_batch(shape)
    x, mask, g = leaf(data["advantages"]), data["mask"], data["upstream"]
    xs, ms, gs = as_list(x), as_bools(mask), as_list(g)
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(out, torch.tensor(ref_whiten(xs, ms, shift_mean),
                                                 dtype=torch.float64))
    out.backward(g)

    def objective(v):
        w = ref_whiten(v, ms, shift_mean)
        return sum(gi * wi for gr, wr in zip(gs, w) for gi, wi in zip(gr, wr))

    torch.testing.assert_close(x.grad, finite_difference_grad(objective, xs), atol=1e-6, rtol=0)


@settings(max_examples=30)
@given(values=st.lists(st.floats(-100, 100), min_size=2, max_size=40),
       seed=st.integers(0, 2**16))
def test_whitened_tokens_have_zero_mean_and_unit_variance(values, seed):
    x = torch.tensor(values, dtype=torch.float64).reshape(1, -1)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(x.shape, generator=gen) < 0.6
    mask[0, :2] = True
    out = masked_whiten(x, mask)
    assert torch.all(out[~mask] == 0)
    variance = ref_masked_var(as_list(x), as_bools(mask), True)
    if variance > 1e-6:
        assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-9)
        # (x − mean) / sqrt(var + eps) has variance var / (var + eps), not exactly 1.
        assert masked_var(out, mask).item() == pytest.approx(variance / (variance + 1e-8),
                                                             rel=1e-6)


# ----------------------------------------------------------------------------------------------
# KL estimators, controllers, shaped rewards
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_kl_penalty_matches_reference(estimator):
    data = random_batch((4, 9))
    logps, ref, g = leaf(data["logps"]), leaf(data["ref_logps"]), data["upstream"]
    ls, rs, gs = as_list(logps), as_list(ref), as_list(g)
    out = kl_penalty(logps, ref, estimator=estimator)
    expected = [[ref_kl_token(a, b, estimator) for a, b in zip(la, ra)] for la, ra in zip(ls, rs)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    out.backward(g)

    def objective(lp):
        return sum(gi * ref_kl_token(a, b, estimator)
                   for ga, la, ra in zip(gs, lp, rs) for gi, a, b in zip(ga, la, ra))

    torch.testing.assert_close(logps.grad, finite_difference_grad(objective, ls),
                               atol=1e-6, rtol=0)
    if estimator == "k3":
        assert torch.all(out >= 0)


def test_k3_is_accurate_for_tiny_log_ratios():
    logr = torch.tensor([1e-3, -1e-4, 3e-5])
    out = kl_penalty(torch.zeros(3), logr, estimator="k3")
    assert out.dtype == torch.float32
    series = torch.tensor([x * x / 2 + x**3 / 6 for x in logr.double().tolist()],
                          dtype=torch.float64)
    # float32 e^x − 1 − x loses everything to cancellation; expm1 keeps ~1e-3 of a tiny k3
    naive = torch.exp(logr) - 1 - logr
    assert torch.all(out >= 0)
    assert torch.all((out.double() - series).abs() <= 5e-3 * series)
    assert torch.all((out.double() - series).abs() < (naive.double() - series).abs())


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 12: error 12/6 − 1 = 1 is clipped to 0.2; β·(1 + 0.2·256/10000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * 1.00512)
    # KL 3: error −0.5 → −0.2
    assert ctl.update(torch.tensor(3.0), 256) == pytest.approx(0.1 * 1.00512 * 0.99488)
    # KL 6.6: error 0.1, unclipped
    assert ctl.update(6.6, 100) == pytest.approx(0.1 * 1.00512 * 0.99488 * 1.001)
    # KL on target: unchanged
    before = ctl.value
    assert ctl.update(6.0, 1000) == pytest.approx(before)
    assert ctl.update(100.0, 0) == pytest.approx(before)

    state = ctl.state_dict()
    other = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert other.update(0.0, 500) == ctl.update(0.0, 500) == pytest.approx(before * 0.99)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 256) == 0.05 and ctl.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kl_shaped_rewards_matches_reference(shape, estimator):
    data = random_batch(shape)
    logps = leaf(data["logps"])
    rewards, non_score = kl_shaped_rewards(data["scores"], logps, data["ref_logps"], data["mask"],
                                           kl_coef=0.05, estimator=estimator)
    ref_rewards, ref_non_score = ref_shaped_rewards(
        as_list(data["scores"]), as_list(logps), as_list(data["ref_logps"]),
        as_bools(data["mask"]), 0.05, estimator)
    torch.testing.assert_close(rewards, torch.tensor(ref_rewards, dtype=torch.float64))
    torch.testing.assert_close(non_score, torch.tensor(ref_non_score, dtype=torch.float64))
    assert not rewards.requires_grad and not non_score.requires_grad
    assert torch.all(rewards[0] == 0)  # the empty row gets nothing, not even its score


def test_kl_shaped_rewards_puts_the_score_on_the_last_masked_token():
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    zeros = torch.zeros(3, 6)
    rewards, non_score = kl_shaped_rewards(torch.tensor([1.0, 2.0, 3.0]), zeros, zeros, mask,
                                           kl_coef=torch.tensor(0.2))
    expected = torch.zeros(3, 6)
    expected[0, 3], expected[1, 1], expected[2, 5] = 1.0, 2.0, 3.0
    assert torch.equal(rewards, expected) and torch.equal(non_score, torch.zeros(3, 6))


# ----------------------------------------------------------------------------------------------
# PPO losses
# ----------------------------------------------------------------------------------------------

POLICY_CASES = [
    dict(),
    dict(clip=0.1, clip_high=0.28),
    dict(dual_clip=1.5),
    dict(clip=0.3, dual_clip=2.0, loss_agg="seq_mean_token_mean"),
    dict(loss_agg="seq_mean_token_sum_norm"),
    dict(loss_agg="grpo"),
]


@pytest.mark.parametrize("options", POLICY_CASES, ids=lambda o: ",".join(map(str, o.items())))
@pytest.mark.parametrize("shape", SHAPES)
def test_ppo_policy_loss_matches_reference(shape, options):
    data = random_batch(shape, spread=0.8)
    logps, old, adv = leaf(data["logps"]), leaf(data["old_logps"]), leaf(data["advantages"])
    mask = data["mask"]
    loss, metrics = ppo_policy_loss(logps, old, adv, mask, **options)
    ls, os_, as_, ms = as_list(logps), as_list(old), as_list(adv), as_bools(mask)
    ref_options = dict(options)
    ref_options["agg"] = ref_options.pop("loss_agg", "token_mean")
    ref_loss, ref_metrics = ref_ppo_policy(ls, os_, as_, ms, **ref_options)
    assert loss.dim() == 0 and loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12)
    assert_metrics(metrics, ref_metrics)
    assert 0 < ref_metrics["clip_ratio/region_mean"] < 1  # both branches are exercised
    loss.backward()
    expected = finite_difference_grad(lambda lp: ref_ppo_policy(lp, os_, as_, ms,
                                                                **ref_options)[0], ls)
    torch.testing.assert_close(logps.grad, expected, atol=1e-7, rtol=0)
    assert old.grad is None and adv.grad is None  # constants


def test_dual_clip_acts_only_on_negative_advantages():
    # Four tokens, ratios e^2 ≈ 7.39 (far above 1 + ε) or 1: A > 0 stays clipped at −A·1.2; A < 0
    # is bounded by −A·c = 3·|A| instead of −A·ρ ≈ 7.39·|A|.
    logps = leaf(torch.tensor([[2.0, 2.0, 0.0, 0.0]], dtype=torch.float64))
    old = torch.zeros(1, 4, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    plain, plain_metrics = ppo_policy_loss(logps, old, adv, mask)
    dual, dual_metrics = ppo_policy_loss(logps, old, adv, mask, dual_clip=3.0)
    ratio = math.exp(2.0)
    assert plain.item() == pytest.approx((-1.2 + ratio - 1.0 + 1.0) / 4)
    assert dual.item() == pytest.approx((-1.2 + 3.0 - 1.0 + 1.0) / 4)
    assert dual_metrics["policy/dual_clipfrac"].item() == 0.25
    assert "policy/dual_clipfrac" not in plain_metrics
    dual.backward()
    # the dual-clipped token is constant in logp; the unclipped ratio-1 tokens give ∓A·ρ / 4
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0, -0.25, 0.25]],
                                                        dtype=torch.float64))
    # with only positive advantages, the dual clip changes nothing
    pos = adv.abs()
    assert ppo_policy_loss(logps, old, pos, mask, dual_clip=3.0)[0].item() == \
        pytest.approx(ppo_policy_loss(logps, old, pos, mask)[0].item())


@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("shape", SHAPES)
def test_ppo_value_loss_matches_reference(shape, clip):
    data = random_batch(shape)
    values, mask = leaf(data["values"]), data["mask"]
    old, returns = data["old_values"], data["returns"]
    loss, metrics = ppo_value_loss(values, old, returns, mask, clip=clip)
    vs, os_, rs, ms = as_list(values), as_list(old), as_list(returns), as_bools(mask)
    ref_loss, ref_metrics = ref_ppo_value(vs, os_, rs, ms, clip)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12)
    assert_metrics(metrics, ref_metrics)
    if clip is not None:
        assert 0 < ref_metrics["value/clipfrac"] < 1
    loss.backward()
    expected = finite_difference_grad(lambda v: ref_ppo_value(v, os_, rs, ms, clip)[0], vs)
    torch.testing.assert_close(values.grad, expected, atol=1e-7, rtol=0)


def test_ppo_total_loss():
    entropy = torch.tensor([[1.0, 2.0, 9.0]])
    mask = torch.tensor([[True, True, False]])
    total, metrics = ppo_total_loss(torch.tensor(0.5), torch.tensor(2.0), entropy, mask,
                                    vf_coef=0.1, ent_coef=0.01)
    assert total.item() == pytest.approx(0.5 + 0.2 - 0.015)
    assert metrics["policy/entropy"].item() == 1.5
    assert metrics["loss/total"].item() == pytest.approx(total.item())
    alone, alone_metrics = ppo_total_loss(torch.tensor(0.5), torch.tensor(2.0))
    assert alone.item() == pytest.approx(0.7) and "policy/entropy" not in alone_metrics


def test_all_masked_losses_are_zero_with_zero_gradients():
    data = random_batch((3, 5))
    mask = torch.zeros(3, 5, dtype=torch.bool)
    # garbage in the padding must not leak either
    logps = leaf(data["logps"].masked_fill(torch.ones(3, 5, dtype=torch.bool), float("nan")))
    values = leaf(data["values"])
    results = [ppo_policy_loss(logps, data["old_logps"], data["advantages"], mask,
                               dual_clip=3.0, loss_agg=agg)[0]
               for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")]
    results += [grpo_loss(logps, data["old_logps"], data["ref_logps"], data["scores"], mask,
                          loss_type=kind)[0] for kind in ("grpo", "dapo", "dr_grpo")]
    results.append(ppo_value_loss(values, data["old_values"], data["returns"], mask)[0])
    for loss in results:
        assert loss.item() == 0.0
    sum(results).backward()
    assert torch.equal(logps.grad, torch.zeros(3, 5, dtype=torch.float64))
    assert torch.equal(values.grad, torch.zeros(3, 5, dtype=torch.float64))
    _, metrics = ppo_policy_loss(logps, data["old_logps"], data["advantages"], mask)
    assert all(v.item() == 0.0 for v in metrics.values())


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batches_give_zero(shape):
    x, mask = torch.zeros(shape, requires_grad=True), torch.zeros(shape, dtype=torch.bool)
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        loss, metrics = ppo_policy_loss(x, x, x, mask, loss_agg=agg)
        assert loss.item() == 0.0 and all(v.item() == 0.0 for v in metrics.values())
    assert ppo_value_loss(x, x, x, mask)[0].item() == 0.0
    assert grpo_loss(x, None, x, torch.zeros(shape[0]), mask)[0].item() == 0.0
    rewards, _ = kl_shaped_rewards(torch.zeros(shape[0]), x, x, mask, kl_coef=0.1)
    assert rewards.shape == shape
    assert grpo_advantages(torch.zeros(0), 4).shape == (0,)


def test_half_precision_inputs_give_float32_results():
    data = random_batch((2, 6))
    bf16 = {k: v.to(torch.bfloat16) for k, v in data.items() if v.is_floating_point()}
    logps = leaf(bf16["logps"])
    loss, metrics = ppo_policy_loss(logps, bf16["old_logps"], bf16["advantages"], data["mask"])
    assert loss.dtype == torch.float32
    loss.backward()
    assert logps.grad.dtype == torch.bfloat16
    loss, _ = grpo_loss(bf16["logps"], None, bf16["ref_logps"], bf16["scores"], data["mask"])
    assert loss.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Aggregation, GRPO and RLOO
# ----------------------------------------------------------------------------------------------


def test_aggregation_modes_differ_on_unequal_lengths():
    per_token = torch.tensor([[4.0, 7.0, 7.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    # grpo: mean of the per-sequence means (4 and 1); dapo: 7 / 4 tokens; dr_grpo: 7 / (2·3)
    assert aggregate_token_loss(per_token, mask, mode="grpo").item() == pytest.approx(2.5)
    assert aggregate_token_loss(per_token, mask, mode="dapo").item() == pytest.approx(1.75)
    assert aggregate_token_loss(per_token, mask, mode="dr_grpo").item() == pytest.approx(7 / 6)
    assert aggregate_token_loss(per_token, mask, mode="dr_grpo",
                                max_len=4).item() == pytest.approx(7 / 8)
    # equal lengths: grpo and dapo agree
    full = torch.ones_like(mask)
    assert aggregate_token_loss(per_token, full, mode="grpo").item() == pytest.approx(
        aggregate_token_loss(per_token, full, mode="dapo").item())


@pytest.mark.parametrize("mode", ["grpo", "dapo", "dr_grpo", "token_mean", "seq_mean_token_mean",
                                  "seq_mean_token_sum_norm"])
def test_aggregation_matches_reference(mode):
    data = random_batch((5, 13))
    x, mask = leaf(data["values"]), data["mask"]
    xs, ms = as_list(x), as_bools(mask)
    out = aggregate_token_loss(x, mask, mode=mode)
    assert out.item() == pytest.approx(ref_aggregate(xs, ms, mode), abs=1e-12)
    out.backward()
    expected = finite_difference_grad(lambda v: ref_aggregate(v, ms, mode), xs)
    torch.testing.assert_close(x.grad, expected, atol=1e-7, rtol=0)


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    # group 1: mean 2.5, unbiased std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3)
    std = math.sqrt(5 / 3)
    expected = [(r - 2.5) / (std + 1e-4) for r in (1, 2, 3, 4)] + [0.0] * 4
    torch.testing.assert_close(grpo_advantages(rewards, 4), torch.tensor(expected))
    torch.testing.assert_close(grpo_advantages(rewards, 4, scale_rewards=False),
                               torch.tensor([-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0]))
    batch_std = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]).std().item()
    torch.testing.assert_close(
        grpo_advantages(rewards, 4, scale_rewards="batch"),
        torch.tensor([-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0]) / (batch_std + 1e-4))
    assert torch.equal(grpo_advantages(rewards, 1), torch.zeros(8))  # a group of one: 0, not NaN
    assert grpo_advantages(rewards, 2).shape == (8,)


def test_rloo_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 10.0, 20.0])
    # [1, 2, 3]: 1 − 2.5, 2 − 2, 3 − 1.5;  [0, 10, 20]: 0 − 15, 10 − 10, 20 − 5
    torch.testing.assert_close(rloo_advantages(rewards, 3),
                               torch.tensor([-1.5, 0.0, 1.5, -15.0, 0.0, 15.0]))
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 3.0]), 2),
                               torch.tensor([-2.0, 2.0]))
    # the leave-one-out baseline is the G/(G − 1)-scaled mean-centred reward
    r = torch.randn(12, dtype=torch.float64)
    centred = r.view(3, 4) - r.view(3, 4).mean(1, keepdim=True)
    torch.testing.assert_close(rloo_advantages(r, 4), (centred * 4 / 3).reshape(-1))


GRPO_CASES = [
    dict(),
    dict(loss_type="dapo", clip_high=0.28),
    dict(loss_type="dr_grpo", beta=0.0),
    dict(loss_type="dr_grpo", max_len=20, beta=0.1),
    dict(loss_type="grpo", per_token_advantages=True),
]


@pytest.mark.parametrize("options", GRPO_CASES, ids=lambda o: ",".join(map(str, o.items())))
@pytest.mark.parametrize("shape", SHAPES)
def test_grpo_loss_matches_reference(shape, options):
    options = dict(options)
    data = random_batch(shape, spread=0.5)
    logps, mask = leaf(data["logps"]), data["mask"]
    adv = data["advantages"] if options.pop("per_token_advantages", False) else data["scores"]
    loss, metrics = grpo_loss(logps, data["old_logps"], data["ref_logps"], adv, mask, **options)
    ls, os_, rs, ms = (as_list(logps), as_list(data["old_logps"]), as_list(data["ref_logps"]),
                       as_bools(mask))
    advs = as_list(adv)
    ref_loss, ref_metrics = ref_grpo(ls, os_, rs, advs, ms, **options)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12)
    metrics.pop("ratio_mean")
    assert_metrics(metrics, ref_metrics)
    assert ref_metrics["clip_ratio/region_mean"] > 0
    loss.backward()
    expected = finite_difference_grad(lambda lp: ref_grpo(lp, os_, rs, advs, ms, **options)[0], ls)
    torch.testing.assert_close(logps.grad, expected, atol=1e-7, rtol=0)


def test_grpo_loss_without_old_logps_is_on_policy():
    data = random_batch((4, 6))
    logps, mask, adv = leaf(data["logps"]), data["mask"], data["scores"]
    loss, metrics = grpo_loss(logps, None, data["ref_logps"], adv, mask)
    ls, rs, ms, advs = as_list(logps), as_list(data["ref_logps"]), as_bools(mask), as_list(adv)
    # ρ = 1 in value; its gradient is that of exp(logp − logp_old) with logp_old frozen at logp
    assert loss.item() == pytest.approx(ref_grpo(ls, ls, rs, advs, ms)[0], abs=1e-12)
    assert metrics["ratio_mean"].item() == 1.0 and metrics["clip_ratio/region_mean"].item() == 0.0
    loss.backward()
    expected = finite_difference_grad(lambda lp: ref_grpo(lp, ls, rs, advs, ms)[0], ls)
    torch.testing.assert_close(logps.grad, expected, atol=1e-7, rtol=0)
    # with β = 0 no reference is needed, and there is no "kl" metric
    loss0, metrics0 = grpo_loss(logps, None, None, adv, mask, beta=0.0)
    assert "kl" not in metrics0
    assert loss0.item() == pytest.approx(ref_grpo(ls, ls, rs, advs, ms, beta=0.0)[0], abs=1e-12)


# ----------------------------------------------------------------------------------------------
# TRPO line search, on a tiny linear softmax policy
# ----------------------------------------------------------------------------------------------

STATES = [[1.0, 0.0], [0.5, -1.0], [-0.3, 0.8]]
ACTIONS = [0, 2, 1]
ADVANTAGES = [1.0, -0.5, 2.0]


def hand_policy(weight, state):
    logits = [sum(w * s for w, s in zip(row, state)) for row in weight]
    top = max(logits)
    exps = [math.exp(z - top) for z in logits]
    return [e / sum(exps) for e in exps]


def hand_kl(old_weight, new_weight):
    """Mean over states of KL(π_old ‖ π_new) = Σ_a π_old(a) log(π_old(a) / π_new(a))."""
    total = 0.0
    for state in STATES:
        p, q = hand_policy(old_weight, state), hand_policy(new_weight, state)
        total += sum(pa * math.log(pa / qa) for pa, qa in zip(p, q))
    return total / len(STATES)


def make_policy(seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=torch.float64))
    old_logp = torch.log_softmax(torch.tensor(STATES, dtype=torch.float64) @ weight.T, -1).detach()

    def kl_fn():  # the exact KL of the current weight against the old policy, in torch
        logp = torch.log_softmax(torch.tensor(STATES, dtype=torch.float64) @ weight.T, -1)
        return (old_logp.exp() * (old_logp - logp)).sum(-1).mean()

    def surrogate_fn():  # E[ρ·A] over the sampled actions
        logp = torch.log_softmax(torch.tensor(STATES, dtype=torch.float64) @ weight.T, -1)
        picked = torch.arange(len(ACTIONS)), torch.tensor(ACTIONS)
        ratio = (logp[picked] - old_logp[picked]).exp()
        return (ratio * torch.tensor(ADVANTAGES, dtype=torch.float64)).mean()

    return weight, kl_fn, surrogate_fn


def test_line_search_accepts_a_small_step():
    weight, kl_fn, _ = make_policy()
    start = weight.detach().clone()
    step = torch.full((3, 2), 0.01, dtype=torch.float64)
    step[0] = -0.02
    result = kl_line_search([weight], [step], kl_fn, max_kl=0.01)
    assert result.accepted and result.step_fraction == 1.0 and result.n_backtracks == 0
    torch.testing.assert_close(weight.detach(), start + step)
    assert result.kl == pytest.approx(hand_kl(start.tolist(), (start + step).tolist()), rel=1e-9)
    assert result.surrogate_improvement is None


def test_line_search_backtracks_a_big_step_to_the_first_admissible_fraction():
    weight, kl_fn, _ = make_policy()
    start = weight.detach().clone()
    step = torch.tensor([[3.0, -2.0], [-1.0, 4.0], [0.5, 0.5]], dtype=torch.float64)
    max_kl = 0.01
    result = kl_line_search([weight], [step], kl_fn, max_kl, backtrack_ratio=0.5)
    assert result.accepted and result.n_backtracks > 0
    alpha = result.step_fraction
    assert alpha == 0.5**result.n_backtracks
    torch.testing.assert_close(weight.detach(), start + alpha * step)
    assert result.kl == pytest.approx(hand_kl(start.tolist(), (start + alpha * step).tolist()))
    assert result.kl <= max_kl
    assert hand_kl(start.tolist(), (start + 2 * alpha * step).tolist()) > max_kl  # one less failed
    assert kl_fn().item() == pytest.approx(result.kl)


def test_line_search_bound_is_inclusive_and_sharp():
    weight, kl_fn, _ = make_policy()
    start = weight.detach().clone()
    step = torch.tensor([[0.3, -0.2], [-0.1, 0.4], [0.05, 0.05]], dtype=torch.float64)
    with torch.no_grad():
        weight.copy_(start + step)
        full_kl = kl_fn().item()
        weight.copy_(start)
    at_bound = kl_line_search([weight], [step], kl_fn, max_kl=full_kl)
    assert at_bound.accepted and at_bound.step_fraction == 1.0 and at_bound.kl == full_kl
    with torch.no_grad():
        weight.copy_(start)
    below = kl_line_search([weight], [step], kl_fn, max_kl=full_kl * 0.999, backtrack_ratio=0.9)
    assert below.accepted and below.n_backtracks == 1 and below.step_fraction == 0.9
    assert below.kl <= full_kl * 0.999


def test_line_search_rejects_and_restores_exactly():
    weight, kl_fn, _ = make_policy()
    bias = torch.nn.Parameter(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    start, start_bias = weight.detach().clone(), bias.detach().clone()
    step = [torch.full((3, 2), 10.0, dtype=torch.float64).tril(), torch.full((3,), 1 / 3,
                                                                             dtype=torch.float64)]
    step[0][0, 0] = -10.0
    result = kl_line_search([weight, bias], step, kl_fn, max_kl=1e-8, max_backtracks=3)
    assert not result.accepted and result.step_fraction == 0.0 and result.n_backtracks == 3
    smallest = hand_kl(start.tolist(), (start + 0.125 * step[0]).tolist())
    assert result.kl == pytest.approx(smallest) and smallest > 1e-8
    assert torch.equal(weight.detach(), start) and torch.equal(bias.detach(), start_bias)


def test_line_search_requires_the_surrogate_to_improve():
    weight, kl_fn, surrogate_fn = make_policy()
    start = weight.detach().clone()
    gradient = torch.autograd.grad(surrogate_fn(), weight)[0]
    uphill = kl_line_search([weight], [0.1 * gradient], kl_fn, 0.05, surrogate_fn=surrogate_fn)
    assert uphill.accepted and uphill.surrogate_improvement > 0
    with torch.no_grad():
        weight.copy_(start)
    downhill = kl_line_search([weight], [-0.1 * gradient], kl_fn, 0.05, surrogate_fn=surrogate_fn)
    assert not downhill.accepted and torch.equal(weight.detach(), start)


def test_line_search_restores_when_kl_fn_fails_or_is_nan():
    weight, _, _ = make_policy()
    start = weight.detach().clone()

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        kl_line_search([weight], [torch.ones(3, 2, dtype=torch.float64)], broken, 0.1)
    assert torch.equal(weight.detach(), start)
    result = kl_line_search([weight], [torch.ones(3, 2, dtype=torch.float64)],
                            lambda: torch.tensor(float("nan")), 0.1, max_backtracks=2)
    assert not result.accepted and torch.equal(weight.detach(), start)


# ----------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------

X = torch.zeros(2, 3)
M = torch.ones(2, 3, dtype=torch.bool)
P = torch.nn.Parameter(torch.zeros(2))

BAD_CALLS = [
    ("mean-mask-shape", lambda: masked_mean(X, M[:, :2]), ValueError, "mask must have the shape"),
    ("mean-int-x", lambda: masked_mean(X.long(), M), TypeError, "x must be a floating-point"),
    ("mean-mask-list", lambda: masked_mean(X, [[1]]), TypeError, "mask must be a torch.Tensor"),
    ("whiten-eps", lambda: masked_whiten(X, M, eps=0.0), ValueError, "eps must be"),
    ("kl-estimator", lambda: kl_penalty(X, X, estimator="k4"), ValueError, "unknown estimator"),
    ("kl-shape", lambda: kl_penalty(X, X[:1]), ValueError, "ref_logps must have the shape"),
    ("ctl-target", lambda: AdaptiveKLController(0.1, 0.0, 100), ValueError, "target must be"),
    ("ctl-horizon", lambda: AdaptiveKLController(0.1, 6.0, -1), ValueError, "horizon must be"),
    ("ctl-init", lambda: AdaptiveKLController(-0.1, 6.0, 10), ValueError, "init_kl_coef must be"),
    ("ctl-nan-kl", lambda: AdaptiveKLController(0.1, 6.0, 10).update(float("nan"), 1),
     ValueError, "current_kl must be finite"),
    ("ctl-steps", lambda: AdaptiveKLController(0.1, 6.0, 10).update(1.0, -1), ValueError,
     "n_steps must be"),
    ("ctl-state", lambda: AdaptiveKLController(0.1, 6.0, 10).load_state_dict({"value": 1.0}),
     ValueError, "state is missing"),
    ("fixed-negative", lambda: FixedKLController(-1.0), ValueError, "kl_coef must be"),
    ("shaped-scores", lambda: kl_shaped_rewards(torch.zeros(3), X, X, M, kl_coef=0.1),
     ValueError, "scores must have shape"),
    ("shaped-coef", lambda: kl_shaped_rewards(torch.zeros(2), X, X, M, kl_coef=-1.0),
     ValueError, "kl_coef must be"),
    ("policy-1d", lambda: ppo_policy_loss(X[0], X[0], X[0], M[0]), ValueError,
     r"logps must be 2-D \[B, T\]"),
    ("policy-adv-shape", lambda: ppo_policy_loss(X, X, X[:, :1], M), ValueError,
     "advantages must have the shape"),
    ("policy-clip-zero", lambda: ppo_policy_loss(X, X, X, M, clip=0.0), ValueError,
     "clip must be"),
    ("policy-clip-one", lambda: ppo_policy_loss(X, X, X, M, clip=1.0), ValueError,
     r"clip must lie in \(0, 1\)"),
    ("policy-clip-high", lambda: ppo_policy_loss(X, X, X, M, clip_high=-0.1), ValueError,
     "clip_high must be"),
    ("policy-dual-clip", lambda: ppo_policy_loss(X, X, X, M, dual_clip=1.0), ValueError,
     "dual_clip must be > 1"),
    ("policy-clip-str", lambda: ppo_policy_loss(X, X, X, M, clip="0.2"), TypeError,
     "clip must be a float"),
    ("policy-agg", lambda: ppo_policy_loss(X, X, X, M, loss_agg="sum"), ValueError,
     "unknown mode"),
    ("value-clip", lambda: ppo_value_loss(X, X, X, M, clip=-0.2), ValueError, "clip must be"),
    ("value-returns", lambda: ppo_value_loss(X, X, X.T, M), ValueError,
     "returns must have the shape"),
    ("total-coef", lambda: ppo_total_loss(X.sum(), X.sum(), vf_coef=-1.0), ValueError,
     "vf_coef must be"),
    ("total-mask", lambda: ppo_total_loss(X.sum(), X.sum(), X), ValueError, "mask is required"),
    ("agg-max-len", lambda: aggregate_token_loss(X, M, mode="dr_grpo", max_len=0), ValueError,
     "max_len must be > 0"),
    ("grpo-adv-group", lambda: grpo_advantages(torch.zeros(6), 4), ValueError,
     "group_size 4 does not divide the batch of 6"),
    ("grpo-adv-2d", lambda: grpo_advantages(X, 3), ValueError, "rewards must be 1-D"),
    ("grpo-adv-scale", lambda: grpo_advantages(torch.zeros(4), 2, scale_rewards="max"),
     ValueError, "unknown scale_rewards"),
    ("grpo-adv-size", lambda: grpo_advantages(torch.zeros(4), 0), ValueError,
     "group_size must be >= 1"),
    ("grpo-adv-float-g", lambda: grpo_advantages(torch.zeros(4), 2.0), TypeError,
     "group_size must be an int"),
    ("rloo-one", lambda: rloo_advantages(torch.zeros(4), 1), ValueError,
     "group_size must be >= 2"),
    ("grpo-loss-type", lambda: grpo_loss(X, X, X, X[:, 0], M, loss_type="mean"), ValueError,
     "unknown mode"),
    ("grpo-adv-shape", lambda: grpo_loss(X, X, X, X[0], M), ValueError,
     "advantages must have shape"),
    ("grpo-no-ref", lambda: grpo_loss(X, X, None, X[:, 0], M), ValueError,
     "ref_logps is required when beta > 0"),
    ("grpo-beta", lambda: grpo_loss(X, X, X, X[:, 0], M, beta=-0.1), ValueError,
     "beta must be"),
    ("ls-lengths", lambda: kl_line_search([P], [], lambda: 0.0, 0.1), ValueError,
     "step must have one tensor per parameter"),
    ("ls-shape", lambda: kl_line_search([P], [torch.zeros(3)], lambda: 0.0, 0.1), ValueError,
     r"step\[0\] must have the shape"),
    ("ls-max-kl", lambda: kl_line_search([P], [torch.zeros(2)], lambda: 0.0, 0.0), ValueError,
     "max_kl must be"),
    ("ls-ratio", lambda: kl_line_search([P], [torch.zeros(2)], lambda: 0.0, 0.1,
                                        backtrack_ratio=1.0), ValueError, "backtrack_ratio"),
    ("ls-backtracks", lambda: kl_line_search([P], [torch.zeros(2)], lambda: 0.0, 0.1,
                                             max_backtracks=-1), ValueError, "max_backtracks"),
    ("ls-kl-fn", lambda: kl_line_search([P], [torch.zeros(2)], None, 0.1), TypeError,
     "kl_fn must be callable"),
    ("ls-kl-shape", lambda: kl_line_search([P], [torch.zeros(2)], lambda: torch.zeros(2), 0.1),
     ValueError, "kl_fn must return a scalar"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
