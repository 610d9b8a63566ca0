"""Preference losses (DPO family, SimPO/CPO/ORPO, KTO, reward model) against independent references.

The reference at the top of this module is written per example with Python floats and the ``math``
module, straight from the formulas in docs/ALGORITHMS.md §5–7; it shares no code with
``fastalign.losses``. Gradients of the reference are central finite differences of those per-example
float64 functions. The fused losses are judged on values *and* gradients after a random upstream
weight, in float32 and float64.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign.losses.dpo import DPO_LOSS_TYPES, cpo_loss, dpo_loss, orpo_loss, simpo_loss
from fastalign.losses.kto import kto_loss, kto_mismatched_indices
from fastalign.losses.options import DPOOptions
from fastalign.losses.reward import reward_loss, votes_to_score

# ----------------------------------------------------------------------------------------------
# Independent reference: one example at a time, Python floats
# ----------------------------------------------------------------------------------------------


def log_sig(x: float) -> float:
    """log(1 / (1 + e^{-x})) without overflow for either sign of x."""
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def ref_dpo_one(kind, pc, pr, rc, rr, *, beta, eps=0.0, tau=0.05, n_w=None, n_l=None, delta=0.0):
    """ALGORITHMS.md §5 for one pair; pc/pr policy, rc/rr reference log-probs."""
    if kind == "ipo" and n_w is not None:
        pc, pr, rc, rr = pc / n_w, pr / n_l, rc / n_w, rr / n_l
    rho_w = pc - rc
    rho_l = pr - rr
    d = rho_w - rho_l
    bd = beta * d
    if kind == "sigmoid":
        return -(1 - eps) * log_sig(bd) - eps * log_sig(-bd)
    if kind == "robust":
        return (-(1 - eps) * log_sig(bd) + eps * log_sig(-bd)) / (1 - 2 * eps)
    if kind == "hinge":
        return max(0.0, 1 - bd)
    if kind == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        return (sig(bd) * (log_sig(bd) - math.log(1 - eps))
                + sig(-bd) * (log_sig(-bd) - math.log(eps)))
    if kind == "nca_pair":
        return (-log_sig(beta * rho_w) - 0.5 * log_sig(-beta * rho_w)
                - 0.5 * log_sig(-beta * rho_l))
    if kind == "bco_pair":
        return -log_sig(beta * rho_w - delta) - log_sig(-(beta * rho_l - delta))
    if kind == "sppo_hard":
        return (rho_w - 1 / (2 * beta)) ** 2 + (rho_l + 1 / (2 * beta)) ** 2
    if kind == "apo_zero":
        return (1 - sig(beta * rho_w)) + sig(beta * rho_l)
    if kind == "apo_down":
        return sig(beta * rho_w) + (1 - sig(bd))
    if kind == "discopop":
        m = sig(bd / tau)
        # m underflows to exactly 0 long before e^{−u} overflows a Python float (u < −709).
        return (1 - m) * -log_sig(bd) + (0.0 if m == 0.0 else m * math.exp(-bd))
    if kind == "sigmoid_norm":
        return -log_sig(beta * (rho_w / n_w - rho_l / n_l))
    if kind == "sft":
        return -pc / n_w
    raise ValueError(kind)


def ref_aot_batch(kind, pc, pr, rc, rr, *, beta, eps=0.0):
    """AOT (Melnyk et al., 2024) over lists: the sorted margins compared quantile by quantile."""
    if kind == "aot":
        first = sorted(a - b for a, b in zip(pc, pr))
        second = sorted(a - b for a, b in zip(rc, rr))
    else:
        first = sorted(a - b for a, b in zip(pc, rc))
        second = sorted(a - b for a, b in zip(pr, rr))
    losses = [-(1 - eps) * log_sig(beta * (a - b)) - eps * log_sig(-beta * (a - b))
              for a, b in zip(first, second)]
    return sum(losses) / len(losses)


def ref_orpo_one(lw, ll, *, beta, nll=None):
    """NLL(y_w) − β·log σ(log odds_w − log odds_l) with odds = p / (1 − p), p = exp(mean logp)."""
    p_w, p_l = math.exp(lw), math.exp(ll)
    log_odds_w = math.log(p_w) - math.log1p(-p_w)
    log_odds_l = math.log(p_l) - math.log1p(-p_l)
    nll = -lw if nll is None else nll
    return nll - beta * log_sig(log_odds_w - log_odds_l)


def ref_kto(p, r, pk, rk, desirable, *, beta, w_d=1.0, w_u=1.0):
    """Mean over the batch of the weighted KTO losses (§6); z_ref from the KL pairs."""
    z_ref = max(0.0, sum(a - b for a, b in zip(pk, rk)) / len(pk))
    total = 0.0
    for p_i, r_i, d_i in zip(p, r, desirable):
        reward = p_i - r_i
        if d_i:
            total += w_d * (1 - sig(beta * (reward - z_ref)))
        else:
            total += w_u * (1 - sig(beta * (z_ref - reward)))
    return total / len(p), z_ref


def finite_difference(fn, columns, h=1e-6):
    """Per-row central differences of fn(*row) in each argument: one list per column."""
    grads = [[] for _ in columns]
    for row in zip(*columns):
        for j in range(len(row)):
            up, down = list(row), list(row)
            up[j] += h
            down[j] -= h
            grads[j].append((fn(*up) - fn(*down)) / (2 * h))
    return grads


# ----------------------------------------------------------------------------------------------
# Inputs and comparisons
# ----------------------------------------------------------------------------------------------

# (dtype, value atol, value rtol, grad atol, grad rtol). float32 inputs are rounded before the
# reference sees them, so only float32 arithmetic inside the loss is being judged.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5, 2e-6, 2e-4),
    torch.float64: (1e-12, 1e-12, 1e-8, 1e-6),
}
DTYPES = [torch.float32, torch.float64]


def as_floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().double().tolist()]


def make_pairs(batch_size, dtype, seed, *, spread=3.0):
    """Summed log-probs in [−60, −5] and references a few nats away; 4 leaf tensors [B]."""
    gen = torch.Generator().manual_seed(seed)
    pc = -(5 + 55 * torch.rand(batch_size, generator=gen, dtype=torch.float64))
    pr = -(5 + 55 * torch.rand(batch_size, generator=gen, dtype=torch.float64))
    rc = pc + spread * torch.randn(batch_size, generator=gen, dtype=torch.float64)
    rr = pr + spread * torch.randn(batch_size, generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (pc, pr, rc, rr)]


def check_close(actual: torch.Tensor | None, expected, atol, rtol, what):
    """``actual`` ≈ ``expected``; a missing gradient (None) counts as zeros."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    if actual is None:
        actual = torch.zeros_like(expected)
    torch.testing.assert_close(actual.detach().double(), expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def check_metrics_are_detached_floats(metrics):
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor), name
        assert value.dim() == 0 and value.dtype == torch.float32, name
        assert not value.requires_grad, name
        assert math.isfinite(float(value)), name


# ----------------------------------------------------------------------------------------------
# DPO family
# ----------------------------------------------------------------------------------------------

SMOOTHED = ("sigmoid", "robust", "exo_pair")
# Losses of one pair at a time (aot and aot_unpaired couple the batch through a sort).
PAIRWISE_TYPES = [kind for kind in DPO_LOSS_TYPES if kind not in ("aot", "aot_unpaired")]
DPO_CASES = [
    (kind, beta, eps)
    for kind in PAIRWISE_TYPES
    for beta in (0.1, 0.5, 2.0)
    for eps in ((0.0, 0.1, 0.3) if kind in ("sigmoid", "robust") else
                (1e-3, 0.2) if kind == "exo_pair" else (0.0,))
    if not (kind == "exo_pair" and eps == 0.0)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind, beta, eps", DPO_CASES)
def test_dpo_matches_reference(kind, beta, eps, dtype):
    batch = 7
    tensors = make_pairs(batch, dtype, seed=DPO_CASES.index((kind, beta, eps)))
    lengths_w = torch.randint(1, 40, (batch,), generator=torch.Generator().manual_seed(1))
    lengths_l = torch.randint(1, 40, (batch,), generator=torch.Generator().manual_seed(2))
    with_lengths = kind in ("ipo", "sft", "sigmoid_norm")
    kwargs = dict(chosen_lengths=lengths_w, rejected_lengths=lengths_l) if with_lengths else {}
    loss, metrics = dpo_loss(*tensors, beta=beta, loss_type=kind, label_smoothing=eps, **kwargs)
    upstream = 0.5 + random.Random(kind).random()
    (loss * upstream).backward()

    columns = [as_floats(t) for t in tensors]
    n_w = [float(n) for n in lengths_w] if with_lengths else [None] * batch
    n_l = [float(n) for n in lengths_l] if with_lengths else [None] * batch
    per_example = []
    grads = [[], [], [], []]
    for i in range(batch):
        def one(pc, pr, rc, rr, i=i):
            return ref_dpo_one(kind, pc, pr, rc, rr, beta=beta, eps=eps, n_w=n_w[i], n_l=n_l[i])
        row = [c[i] for c in columns]
        per_example.append(one(*row))
        for j, g in enumerate(finite_difference(one, [[v] for v in row])):
            grads[j].append(g[0] * upstream / batch)

    v_atol, v_rtol, g_atol, g_rtol = TOLERANCES[dtype]
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dim() == 0 and loss.dtype == expected_dtype
    check_close(loss, sum(per_example) / batch, v_atol, v_rtol, "loss")
    for name, t, g in zip(("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"),
                          tensors, grads):
        assert t.grad is None or t.grad.dtype == dtype
        check_close(t.grad, g, g_atol, g_rtol, f"d loss / d {name}")
    check_metrics_are_detached_floats(metrics)
    assert not any(name.startswith("loss/") for name in metrics)


def test_dpo_metrics_match_trl_definitions():
    pc, pr, rc, rr = make_pairs(9, torch.float64, seed=3)
    beta = 0.3
    _, metrics = dpo_loss(pc, pr, rc, rr, beta=beta)
    rho_w = [a - b for a, b in zip(as_floats(pc), as_floats(rc))]
    rho_l = [a - b for a, b in zip(as_floats(pr), as_floats(rr))]
    expected = {
        "rewards/chosen": sum(beta * x for x in rho_w) / 9,
        "rewards/rejected": sum(beta * x for x in rho_l) / 9,
        "rewards/accuracies": sum(a > b for a, b in zip(rho_w, rho_l)) / 9,
        "rewards/margins": sum(beta * (a - b) for a, b in zip(rho_w, rho_l)) / 9,
        "logps/chosen": sum(as_floats(pc)) / 9,
        "logps/rejected": sum(as_floats(pr)) / 9,
    }
    assert set(metrics) == set(expected)
    assert 0 < float(metrics["rewards/accuracies"]) < 1  # the data exercises both outcomes
    for name, value in expected.items():
        check_close(metrics[name], value, 1e-6, 1e-6, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kinds, weights", [
    (["sigmoid", "sft"], [1.0, 0.3]),
    (["ipo", "hinge", "apo_zero"], None),
    (["robust", "bco_pair", "discopop", "sppo_hard"], [0.5, 2.0, -0.25, 0.01]),
])
def test_combined_losses_are_the_weighted_sum(kinds, weights, dtype):
    batch, beta, eps = 6, 0.4, 0.1 if "robust" in kinds or "sigmoid" in kinds else 0.0
    tensors = make_pairs(batch, dtype, seed=5)
    n_w = torch.arange(3, 3 + batch)
    n_l = torch.arange(10, 10 + batch).double()  # float lengths are accepted too
    loss, metrics = dpo_loss(*tensors, beta=beta, loss_type=kinds, loss_weights=weights,
                             label_smoothing=eps, chosen_lengths=n_w, rejected_lengths=n_l)
    loss.backward()
    w = weights or [1.0] * len(kinds)
    columns = [as_floats(t) for t in tensors]
    total, grads = 0.0, [[0.0] * batch for _ in range(4)]
    for kind, weight in zip(kinds, w):
        per = []
        for i in range(batch):
            def one(pc, pr, rc, rr, i=i, kind=kind):
                return ref_dpo_one(kind, pc, pr, rc, rr, beta=beta, eps=eps,
                                   n_w=float(n_w[i]), n_l=float(n_l[i]))
            row = [c[i] for c in columns]
            per.append(one(*row))
            for j, g in enumerate(finite_difference(one, [[v] for v in row])):
                grads[j][i] += weight * g[0] / batch
        total += weight * sum(per) / batch
        check_close(metrics[f"loss/{kind}"], sum(per) / batch, 1e-5, 1e-5, f"loss/{kind}")
    v_atol, v_rtol, g_atol, g_rtol = TOLERANCES[dtype]
    check_close(loss, total, v_atol, v_rtol, "combined loss")
    for t, g in zip(tensors, grads):
        check_close(t.grad, g, g_atol, g_rtol, "combined gradient")
    check_metrics_are_detached_floats(metrics)


def test_ipo_with_lengths_equals_ipo_on_averaged_inputs():
    pc, pr, rc, rr = (t.detach() for t in make_pairs(5, torch.float64, seed=8))
    n_w, n_l = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([7, 1, 9, 2, 4])
    with_lengths, _ = dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=n_w,
                               rejected_lengths=n_l)
    averaged, _ = dpo_loss(pc / n_w, pr / n_l, rc / n_w, rr / n_l, loss_type="ipo")
    torch.testing.assert_close(with_lengths, averaged)


def test_bco_delta_shifts_the_rewards():
    tensors = [t.detach() for t in make_pairs(4, torch.float64, seed=9)]
    loss, _ = dpo_loss(*tensors, beta=0.2, loss_type="bco_pair", bco_delta=0.7)
    expected = sum(ref_dpo_one("bco_pair", *row, beta=0.2, delta=0.7)
                   for row in zip(*map(as_floats, tensors))) / 4
    check_close(loss, expected, 1e-12, 1e-12, "bco_pair with delta")


def test_half_precision_inputs_compute_in_float32():
    tensors = [t.detach().to(torch.bfloat16).requires_grad_()
               for t in make_pairs(4, torch.float64, seed=10)]
    loss, metrics = dpo_loss(*tensors, loss_type=["sigmoid", "apo_down"])
    loss.backward()
    assert loss.dtype == torch.float32
    assert all(t.grad.dtype == torch.bfloat16 for t in tensors)
    check_metrics_are_detached_floats(metrics)
    rows = list(zip(*map(as_floats, tensors)))
    expected = sum(ref_dpo_one("sigmoid", *r, beta=0.1) + ref_dpo_one("apo_down", *r, beta=0.1)
                   for r in rows) / 4
    check_close(loss, expected, 1e-5, 1e-5, "bf16 inputs")


# ----------------------------------------------------------------------------------------------
# Large margins: finite losses and gradients everywhere
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", DPO_LOSS_TYPES)
def test_large_margins_stay_finite(kind, dtype):
    # Rows: Δ = +1e3, Δ = −1e3, and ρ_w, ρ_l of ±1e3 separately.
    pc = torch.tensor([0.0, -1000.0, 1000.0, -1000.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1000.0, 0.0, 1000.0, -1000.0], dtype=dtype, requires_grad=True)
    rc = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=dtype)
    rr = torch.tensor([0.0, 0.0, 0.0, 1000.0], dtype=dtype)
    eps = 1e-3 if kind == "exo_pair" else 0.0
    lengths = torch.ones(4)
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type=kind, label_smoothing=eps,
                             chosen_lengths=lengths, rejected_lengths=lengths)
    loss.backward()
    assert torch.isfinite(loss), kind
    for t in (pc, pr):
        assert t.grad is None or torch.isfinite(t.grad).all(), kind
    check_metrics_are_detached_floats(metrics)


def test_large_margin_sigmoid_has_the_linear_asymptote():
    # −log σ(u) → −u as u → −∞; its gradient → −β/B on policy_chosen.
    pc = torch.tensor([-1000.0], requires_grad=True)
    pr, rc, rr = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=1.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(1000.0)
    assert float(pc.grad) == pytest.approx(-1.0)


def test_reference_free_and_kto_and_reward_large_values_stay_finite():
    big = torch.tensor([1000.0, -1000.0])
    w = torch.tensor([-1e-3, -1000.0], requires_grad=True)
    lose = torch.tensor([-1000.0, -1e-3], requires_grad=True)
    for fn in (simpo_loss, cpo_loss, orpo_loss):
        w.grad = lose.grad = None
        loss, metrics = fn(w, lose)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(w.grad).all(), fn.__name__
        assert torch.isfinite(lose.grad).all(), fn.__name__
        check_metrics_are_detached_floats(metrics)
    p = big.clone().requires_grad_()
    loss, metrics = kto_loss(p, -big, big.flip(0), -big, torch.tensor([True, False]), beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    r_w = big.clone().requires_grad_()
    loss, _ = reward_loss(r_w, -big, margin=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(r_w.grad).all()


def test_orpo_at_logp_zero_is_finite():
    w = torch.tensor([0.0, -0.5], requires_grad=True)
    lose = torch.tensor([-2.0, 0.0], requires_grad=True)
    loss, metrics = orpo_loss(w, lose)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all() and torch.isfinite(lose.grad).all()
    check_metrics_are_detached_floats(metrics)


# ----------------------------------------------------------------------------------------------
# Reference-free: SimPO, CPO, ORPO
# ----------------------------------------------------------------------------------------------


def mean_logps(batch, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = -(0.01 + 3 * torch.rand(batch, generator=gen, dtype=torch.float64))
    lose = -(0.01 + 3 * torch.rand(batch, generator=gen, dtype=torch.float64))
    return w.to(dtype).requires_grad_(), lose.to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta, gamma, eps, alpha", [
    (2.0, 0.5, 0.0, 0.0), (2.5, 1.4, 0.1, 0.0), (10.0, 0.0, 0.3, 0.7),
])
def test_simpo_matches_reference(beta, gamma, eps, alpha, dtype):
    w, lose = mean_logps(8, dtype, seed=11)
    loss, metrics = simpo_loss(w, lose, beta=beta, gamma=gamma, label_smoothing=eps, alpha=alpha)
    upstream = 1.7
    (loss * upstream).backward()

    def one(lw, ll):
        u = beta * (lw - ll) - gamma
        return -(1 - eps) * log_sig(u) - eps * log_sig(-u) + alpha * -lw

    cols = [as_floats(w), as_floats(lose)]
    v_atol, v_rtol, g_atol, g_rtol = TOLERANCES[dtype]
    check_close(loss, sum(one(*r) for r in zip(*cols)) / 8, v_atol, v_rtol, "simpo")
    for t, g in zip((w, lose), finite_difference(one, cols)):
        check_close(t.grad, [x * upstream / 8 for x in g], g_atol, g_rtol, "simpo grad")
    check_close(metrics["rewards/chosen"], beta * sum(cols[0]) / 8, 1e-5, 1e-5, "rewards/chosen")
    check_close(metrics["nll_loss"], -sum(cols[0]) / 8, 1e-5, 1e-5, "nll_loss")
    check_metrics_are_detached_floats(metrics)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta, eps, alpha, nll_kind", [
    (0.1, 0.0, 1.0, None), (0.5, 0.2, 0.3, "per-sequence"), (1.0, 0.0, 2.0, "scalar"),
    (0.3, 0.1, 0.0, None),
])
def test_cpo_matches_reference(beta, eps, alpha, nll_kind, dtype):
    batch = 6
    w, lose = make_pairs(batch, dtype, seed=12)[:2]
    nll = {None: None, "per-sequence": torch.rand(batch, dtype=dtype) + 0.5,
           "scalar": torch.tensor(1.25, dtype=dtype)}[nll_kind]
    loss, metrics = cpo_loss(w, lose, beta=beta, chosen_nll=nll, label_smoothing=eps, alpha=alpha)
    loss.backward()
    cols = [as_floats(w), as_floats(lose)]
    if nll is None:
        nll_values = [-x for x in cols[0]]
    else:
        nll_values = as_floats(nll.expand(batch))

    def pref(lw, ll):
        u = beta * (lw - ll)
        return -(1 - eps) * log_sig(u) - eps * log_sig(-u)

    expected = sum(pref(*r) for r in zip(*cols)) / batch + alpha * sum(nll_values) / batch
    v_atol, v_rtol, g_atol, g_rtol = TOLERANCES[dtype]
    check_close(loss, expected, v_atol, v_rtol, "cpo")
    grad_w, grad_l = finite_difference(pref, cols)
    if nll is None:  # the default NLL −logp_w adds −α/B to the chosen gradient
        grad_w = [g - alpha for g in grad_w]
    check_close(w.grad, [g / batch for g in grad_w], g_atol, g_rtol, "cpo grad chosen")
    check_close(lose.grad, [g / batch for g in grad_l], g_atol, g_rtol, "cpo grad rejected")
    check_close(metrics["nll_loss"], sum(nll_values) / batch, 1e-5, 1e-5, "nll_loss")
    check_close(metrics["rewards/margins"],
                beta * (sum(cols[0]) - sum(cols[1])) / batch, 1e-5, 1e-5, "margins")
    check_metrics_are_detached_floats(metrics)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_orpo_matches_reference(beta, dtype):
    batch = 8
    w, lose = mean_logps(batch, dtype, seed=13)
    loss, metrics = orpo_loss(w, lose, beta=beta)
    upstream = 0.6
    (loss * upstream).backward()
    cols = [as_floats(w), as_floats(lose)]

    def one(lw, ll):
        return ref_orpo_one(lw, ll, beta=beta)

    v_atol, v_rtol, g_atol, g_rtol = TOLERANCES[dtype]
    check_close(loss, sum(one(*r) for r in zip(*cols)) / batch, v_atol, v_rtol, "orpo")
    for t, g in zip((w, lose), finite_difference(one, cols)):
        check_close(t.grad, [x * upstream / batch for x in g], g_atol, g_rtol, "orpo grad")
    log_odds = [(a - math.log1p(-math.exp(a))) - (b - math.log1p(-math.exp(b)))
                for a, b in zip(*cols)]
    check_close(metrics["log_odds_chosen"], sum(log_odds) / batch, 1e-5, 1e-5, "log_odds")
    check_close(metrics["log_odds_ratio"], sum(map(log_sig, log_odds)) / batch, 1e-5, 1e-5,
                "log_odds_ratio")
    check_close(metrics["nll_loss"], -sum(cols[0]) / batch, 1e-5, 1e-5, "nll_loss")
    check_close(metrics["rewards/rejected"], beta * sum(cols[1]) / batch, 1e-5, 1e-5, "rejected")


def test_orpo_with_explicit_nll():
    w, lose = mean_logps(4, torch.float64, seed=14)
    nll = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    loss, metrics = orpo_loss(w, lose, beta=0.2, chosen_nll=nll)
    expected = sum(ref_orpo_one(a, b, beta=0.2, nll=n)
                   for a, b, n in zip(as_floats(w), as_floats(lose), as_floats(nll))) / 4
    check_close(loss, expected, 1e-12, 1e-12, "orpo with nll")
    assert float(metrics["nll_loss"]) == pytest.approx(1.25)


# ----------------------------------------------------------------------------------------------
# KTO
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta, w_d, w_u, kl_shift", [
    (0.1, 1.0, 1.0, 2.0), (0.5, 1.33, 1.0, 0.5), (2.0, 1.0, 0.7, -20.0),
])
def test_kto_matches_reference(beta, w_d, w_u, kl_shift, dtype):
    batch = 7
    p, _, r, _ = make_pairs(batch, dtype, seed=15)  # r a few nats from p
    idx = kto_mismatched_indices(batch)
    pk = (p.detach()[idx] + kl_shift).requires_grad_()  # kl_shift = −20 hits the clamp at 0
    rk = r.detach()[idx].clone()
    desirable = torch.tensor([True, False, True, True, False, False, True])
    loss, metrics = kto_loss(p, r, pk, rk, desirable, beta=beta, desirable_weight=w_d,
                             undesirable_weight=w_u)
    upstream = 1.3
    (loss * upstream).backward()

    cols = [as_floats(p), as_floats(r)]
    kl_cols = [as_floats(pk), as_floats(rk)]
    d = desirable.tolist()
    expected, z_ref = ref_kto(*cols, *kl_cols, d, beta=beta, w_d=w_d, w_u=w_u)
    v_atol, v_rtol, g_atol, g_rtol = TOLERANCES[dtype]
    check_close(loss, expected, v_atol, v_rtol, "kto")
    check_close(metrics["kl"], z_ref, 1e-5, 1e-5, "kl")
    if kl_shift < 0:
        assert z_ref == 0.0

    def one(p_i, r_i, d_i):
        return ref_kto([p_i], [r_i], *kl_cols, [d_i], beta=beta, w_d=w_d, w_u=w_u)[0]

    grads = [[], []]
    for i in range(batch):
        gp, gr = finite_difference(lambda a, b, i=i: one(a, b, d[i]), [[cols[0][i]], [cols[1][i]]])
        grads[0].append(gp[0] * upstream / batch)
        grads[1].append(gr[0] * upstream / batch)
    check_close(p.grad, grads[0], g_atol, g_rtol, "kto grad policy")
    check_close(r.grad, grads[1], g_atol, g_rtol, "kto grad ref")
    assert pk.grad is None  # z_ref is detached

    rewards = [beta * (a - b) for a, b in zip(*cols)]
    good = [x for x, k in zip(rewards, d) if k]
    bad = [x for x, k in zip(rewards, d) if not k]
    check_close(metrics["rewards/chosen"], sum(good) / len(good), 1e-5, 1e-5, "rewards/chosen")
    check_close(metrics["rewards/rejected"], sum(bad) / len(bad), 1e-5, 1e-5, "rewards/rejected")
    check_close(metrics["rewards/margins"], sum(good) / len(good) - sum(bad) / len(bad),
                1e-5, 1e-5, "margins")
    check_close(metrics["logps/rejected"],
                sum(x for x, k in zip(cols[0], d) if not k) / len(bad), 1e-5, 1e-5, "logps")
    assert float(metrics["count/chosen"]) == 4 and float(metrics["count/rejected"]) == 3
    check_close(metrics["rewards/chosen_sum"], sum(good), 1e-4, 1e-5, "rewards/chosen_sum")
    check_metrics_are_detached_floats(metrics)


def test_kto_with_one_group_empty_has_no_nan():
    p, r, pk, rk = make_pairs(4, torch.float32, seed=16)
    loss, metrics = kto_loss(p, r, pk.detach(), rk.detach(), torch.ones(4, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss)
    check_metrics_are_detached_floats(metrics)
    assert float(metrics["count/rejected"]) == 0
    assert float(metrics["rewards/rejected"]) == 0 and float(metrics["logps/rejected"]) == 0


def test_dpo_sft_term_takes_a_token_mean_nll_as_trl():
    pc, pr, rc, rr = (t.detach() for t in make_pairs(4, torch.float64, seed=23))
    nll = torch.tensor(2.5, dtype=torch.float64)
    loss, metrics = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                             chosen_nll=nll)
    sigmoid, _ = dpo_loss(pc, pr, rc, rr)
    check_close(loss, float(sigmoid) + 0.5 * 2.5, 1e-12, 1e-12, "sigmoid + 0.5 sft")
    assert float(metrics["loss/sft"]) == 2.5


def test_kto_without_kl_uses_zero_reference_point():
    p, r = make_pairs(2, torch.float64, seed=17)[:2]
    loss, metrics = kto_loss(p, r, None, None, torch.tensor([False, True]), beta=0.3)
    expected, _ = ref_kto(as_floats(p), as_floats(r), [0.0, 0.0], [0.0, 0.0], [False, True],
                          beta=0.3)
    check_close(loss, expected, 1e-12, 1e-12, "kto without kl")
    assert float(metrics["kl"]) == 0


def test_kto_mismatched_indices_shift_completions_by_one_as_trl():
    idx = kto_mismatched_indices(5)
    assert idx.tolist() == [4, 0, 1, 2, 3]  # TRL: completions[-1:] + completions[:-1]
    assert sorted(idx.tolist()) == list(range(5))
    assert all(i != j for i, j in enumerate(idx.tolist()))


def _kto_rank(rank, world_size, store, results):
    """One gloo rank: its own KL batch; returns (z_ref metric, loss) through ``results``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)
    try:
        p, r, pk, rk = (t.detach() for t in make_pairs(4, torch.float64, seed=18))
        # Rank means of policy_kl − ref_kl are 1 and 3: z_ref = 2 (a sum would give 4, and
        # negative means would hide any reduction behind the clamp at 0).
        shift = 1.0 + 2.0 * rank - float((pk - rk).mean())
        loss, metrics = kto_loss(p, r, pk + shift, rk, torch.tensor([True, False, True, False]),
                                 process_group=dist.group.WORLD)
        results[rank] = (float(metrics["kl"]), float(loss))
    finally:
        dist.destroy_process_group()


def test_kto_process_group_averages_the_kl_over_two_ranks(tmp_path):
    """Two real gloo processes with different KL batches: z_ref is the mean of the rank means."""
    mp = pytest.importorskip("torch.multiprocessing")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_kto_rank, args=(2, tmp_path / "store", results), nprocs=2, join=True)
        results = dict(results)
    p, r, pk, rk = (t.detach() for t in make_pairs(4, torch.float64, seed=18))
    z_ref = 2.0
    assert results[0][0] == pytest.approx(z_ref, rel=1e-12)
    assert results[1][0] == pytest.approx(z_ref, rel=1e-12)
    # Both ranks' losses use the shared reference point, so they are equal on equal batches.
    expected, _ = ref_kto(as_floats(p), as_floats(r), [z_ref + float(rk.mean())] * 4,
                          [float(rk.mean())] * 4, [True, False, True, False], beta=0.1)
    assert results[0][1] == pytest.approx(expected, rel=1e-9)
    assert results[1][1] == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("margin_kind, center", [
    (None, 0.0), ("float", 0.01), ("tensor", 0.0), ("tensor", 0.5), (None, None),
])
def test_reward_loss_matches_reference(margin_kind, center, dtype):
    batch = 9
    gen = torch.Generator().manual_seed(19)
    r_w = (2 * torch.randn(batch, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    r_l = (2 * torch.randn(batch, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    margin_tensor = torch.rand(batch, generator=gen, dtype=torch.float64).to(dtype)
    margin = {None: None, "float": 0.75, "tensor": margin_tensor}[margin_kind]
    loss, metrics = reward_loss(r_w, r_l, margin=margin, center_coefficient=center)
    upstream = 0.9
    (loss * upstream).backward()

    m = [0.0] * batch if margin is None else (
        [margin] * batch if isinstance(margin, float) else as_floats(margin))
    c = center or 0.0
    cols = [as_floats(r_w), as_floats(r_l)]
    per = [lambda a, b, mi=mi: -log_sig(a - b - mi) + c * (a + b) ** 2 for mi in m]
    v_atol, v_rtol, g_atol, g_rtol = TOLERANCES[dtype]
    check_close(loss, sum(f(a, b) for f, a, b in zip(per, *cols)) / batch, v_atol, v_rtol,
                "reward loss")
    for i in range(batch):
        gw, gl = finite_difference(per[i], [[cols[0][i]], [cols[1][i]]])
        check_close(r_w.grad[i], gw[0] * upstream / batch, g_atol, g_rtol, "grad chosen")
        check_close(r_l.grad[i], gl[0] * upstream / batch, g_atol, g_rtol, "grad rejected")

    both = cols[0] + cols[1]
    expected = {
        "accuracy": sum(a > b for a, b in zip(*cols)) / batch,
        "rewards/chosen": sum(cols[0]) / batch,
        "rewards/rejected": sum(cols[1]) / batch,
        "margin": sum(a - b for a, b in zip(*cols)) / batch,
        "min_reward": min(both),
        "mean_reward": sum(both) / len(both),
        "max_reward": max(both),
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        check_close(metrics[name], value, 1e-5, 1e-5, name)


def test_reward_loss_accepts_reward_head_output():
    r_w, r_l = torch.randn(5, 1), torch.randn(5, 1)
    flat, _ = reward_loss(r_w[:, 0], r_l[:, 0])
    head, _ = reward_loss(r_w, r_l)
    torch.testing.assert_close(flat, head)


@pytest.mark.parametrize("upvotes, accepted, score", [
    (0, False, 0), (0, True, 1), (1, False, 1), (2, False, 2), (3, True, 3), (5, False, 3),
    (10, True, 4), (1000, False, 10), (-1, True, -1), (-7, False, -1),
])
def test_votes_to_score(upvotes, accepted, score):
    assert votes_to_score(upvotes, accepted) == score
    tensor_score = votes_to_score(torch.tensor([upvotes]), torch.tensor([accepted]))
    assert tensor_score.dtype == torch.int64 and tensor_score.tolist() == [score]


def test_votes_to_score_on_tensors_matches_ints():
    upvotes = torch.arange(-3, 300)
    accepted = upvotes % 3 == 0
    scores = votes_to_score(upvotes, accepted)
    assert scores.tolist() == [votes_to_score(int(u), bool(a)) for u, a in zip(upvotes, accepted)]
    assert votes_to_score(upvotes, True).tolist() == [
        -1 if u < 0 else round(math.log2(1 + u)) + 1 for u in upvotes.tolist()]


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def _pairs(batch=3):
    return [torch.randn(batch) - 10 for _ in range(4)]


def _kto_args(batch=3):
    p, r, pk, rk = _pairs(batch)
    return (p, r, pk, rk, torch.ones(batch, dtype=torch.bool))


BAD_CALLS = [
    ("beta-zero", lambda: dpo_loss(*_pairs(), beta=0.0), ValueError, "beta must be a finite"),
    ("beta-negative", lambda: dpo_loss(*_pairs(), beta=-0.1), ValueError, "beta must be"),
    ("beta-nan", lambda: dpo_loss(*_pairs(), beta=float("nan")), ValueError, "beta must be"),
    ("beta-inf", lambda: dpo_loss(*_pairs(), beta=float("inf")), ValueError, "beta must be"),
    ("beta-string", lambda: dpo_loss(*_pairs(), beta="0.1"), TypeError, "beta must be a float"),
    ("smoothing-half", lambda: dpo_loss(*_pairs(), label_smoothing=0.5), ValueError,
     r"label_smoothing must lie in \[0.0, 0.5\)"),
    ("smoothing-negative", lambda: dpo_loss(*_pairs(), label_smoothing=-0.1), ValueError,
     r"label_smoothing must lie in \[0.0, 0.5\)"),
    ("smoothing-unused", lambda: dpo_loss(*_pairs(), loss_type="hinge", label_smoothing=0.1),
     ValueError, "label_smoothing=0.1 has no effect"),
    ("exo-without-smoothing", lambda: dpo_loss(*_pairs(), loss_type="exo_pair"), ValueError,
     "'exo_pair' needs label_smoothing > 0"),
    ("unknown-type", lambda: dpo_loss(*_pairs(), loss_type="dpo"), ValueError,
     r"unknown loss_type 'dpo'; valid values are: sigmoid, robust"),
    ("unknown-in-list", lambda: dpo_loss(*_pairs(), loss_type=["sigmoid", "kto"]), ValueError,
     "unknown loss_type 'kto'"),
    ("empty-list", lambda: dpo_loss(*_pairs(), loss_type=[]), TypeError, "non-empty list"),
    ("repeated-type", lambda: dpo_loss(*_pairs(), loss_type=["ipo", "ipo"]), ValueError,
     "must not repeat"),
    ("weights-length", lambda: dpo_loss(*_pairs(), loss_type=["sigmoid", "ipo"],
                                        loss_weights=[1.0]),
     ValueError, "loss_weights must have one weight per loss type: got 1 weights for 2"),
    ("weights-nan", lambda: dpo_loss(*_pairs(), loss_weights=[float("nan")]), ValueError,
     r"loss_weights\[0\] must be a finite number"),
    ("batch-mismatch", lambda: dpo_loss(*_pairs()[:3], torch.randn(4)), ValueError,
     "mismatched batch sizes: policy_chosen_logps has B=3 but ref_rejected_logps has B=4"),
    ("not-1d", lambda: dpo_loss(torch.randn(3, 2), *_pairs()[1:]), ValueError,
     r"policy_chosen_logps must be 1-D \[B\]"),
    ("empty-batch", lambda: dpo_loss(*[torch.randn(0)] * 4), ValueError, "at least one sequence"),
    ("int-logps", lambda: dpo_loss(torch.ones(3, dtype=torch.long), *_pairs()[1:]), TypeError,
     "policy_chosen_logps must be a floating-point tensor"),
    ("list-logps", lambda: dpo_loss([0.0] * 3, *_pairs()[1:]), TypeError, "must be a torch.Tensor"),
    ("sft-without-lengths", lambda: dpo_loss(*_pairs(), loss_type="sft"), ValueError,
     "'sft' needs chosen_lengths"),
    ("zero-length", lambda: dpo_loss(*_pairs(), loss_type="sft",
                                     chosen_lengths=torch.tensor([3, 0, 2])),
     ValueError, "chosen_lengths must be > 0"),
    ("length-shape", lambda: dpo_loss(*_pairs(), loss_type="sft", chosen_lengths=torch.ones(4)),
     ValueError, r"chosen_lengths must have shape \[B\] = \[3\]"),
    ("ipo-one-length", lambda: dpo_loss(*_pairs(), loss_type="ipo",
                                        chosen_lengths=torch.ones(3)),
     ValueError, "'ipo' needs both chosen_lengths and rejected_lengths"),
    ("tau-zero", lambda: dpo_loss(*_pairs(), loss_type="discopop", discopop_tau=0.0), ValueError,
     "discopop_tau must be"),
    ("simpo-beta", lambda: simpo_loss(*_pairs()[:2], beta=0.0), ValueError, "beta must be"),
    ("simpo-smoothing", lambda: simpo_loss(*_pairs()[:2], label_smoothing=0.7), ValueError,
     "label_smoothing must lie in"),
    ("cpo-alpha", lambda: cpo_loss(*_pairs()[:2], alpha=-1.0), ValueError,
     "alpha must be a finite number >= 0"),
    ("cpo-nll-shape", lambda: cpo_loss(*_pairs()[:2], chosen_nll=torch.ones(2)), ValueError,
     r"chosen_nll must be 0-d or \[B\] = \[3\]"),
    ("orpo-batch", lambda: orpo_loss(torch.randn(3), torch.randn(2)), ValueError,
     "mismatched batch sizes"),
    ("kto-batch-of-one", lambda: kto_loss(*_kto_args(1)), ValueError,
     r"KTO needs a batch of at least 2 examples \(B >= 2\).*got B=1"),
    ("kto-desirable-dtype", lambda: kto_loss(*_kto_args()[:4], torch.ones(3)), TypeError,
     "desirable must be a bool tensor"),
    ("kto-desirable-shape", lambda: kto_loss(*_kto_args()[:4], torch.ones(2, dtype=torch.bool)),
     ValueError, r"desirable must have shape \[B\] = \[3\]"),
    ("kto-half-kl", lambda: kto_loss(*_kto_args()[:2], torch.randn(3), None,
                                     torch.ones(3, dtype=torch.bool)),
     ValueError, "both be tensors or both be None"),
    ("kto-beta", lambda: kto_loss(*_kto_args(), beta=-1.0), ValueError, "beta must be"),
    ("kto-weight", lambda: kto_loss(*_kto_args(), undesirable_weight=-1.0), ValueError,
     "undesirable_weight must be a finite number >= 0"),
    ("kto-batch-mismatch", lambda: kto_loss(torch.randn(3), torch.randn(4), *_kto_args()[2:]),
     ValueError, "mismatched batch sizes"),
    ("kto-indices-one", lambda: kto_mismatched_indices(1), ValueError, "batch_size must be >= 2"),
    ("reward-margin-shape", lambda: reward_loss(torch.randn(3), torch.randn(3),
                                                margin=torch.ones(2)),
     ValueError, r"margin must be 0-d or \[B\] = \[3\]"),
    ("reward-margin-nan", lambda: reward_loss(torch.randn(3), torch.randn(3), margin=math.nan),
     ValueError, "margin must be a finite number"),
    ("reward-center", lambda: reward_loss(torch.randn(3), torch.randn(3),
                                          center_coefficient=-0.01),
     ValueError, "center_coefficient must be a finite number >= 0"),
    ("reward-batch", lambda: reward_loss(torch.randn(3), torch.randn(2)), ValueError,
     "mismatched batch sizes"),
    ("votes-float", lambda: votes_to_score(2.0, True), TypeError, "upvotes must be an int"),
    ("votes-float-tensor", lambda: votes_to_score(torch.ones(2), True), TypeError,
     "upvotes must be an integer tensor"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ----------------------------------------------------------------------------------------------
# Properties over random inputs
# ----------------------------------------------------------------------------------------------

logp = st.floats(min_value=-500.0, max_value=0.0, allow_nan=False)
betas = st.floats(min_value=0.01, max_value=10.0)


@settings(max_examples=60)
@given(rows=st.lists(st.tuples(logp, logp, logp, logp), min_size=1, max_size=8), beta=betas,
       kind=st.sampled_from(["sigmoid", "ipo", "nca_pair", "discopop", "apo_down"]))
def test_dpo_property_matches_reference(rows, beta, kind):
    tensors = [torch.tensor(col, dtype=torch.float64, requires_grad=True) for col in zip(*rows)]
    loss, metrics = dpo_loss(*tensors, beta=beta, loss_type=kind)
    loss.backward()
    expected = sum(ref_dpo_one(kind, *row, beta=beta) for row in rows) / len(rows)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert all(torch.isfinite(t.grad).all() for t in tensors)
    assert 0.0 <= float(metrics["rewards/accuracies"]) <= 1.0


@settings(max_examples=60)
@given(rows=st.lists(st.tuples(logp, logp, st.booleans()), min_size=2, max_size=8), beta=betas,
       shift=st.floats(min_value=-20, max_value=20))
def test_kto_property_matches_reference(rows, beta, shift):
    p, r, d = (list(col) for col in zip(*rows))
    idx = kto_mismatched_indices(len(rows)).tolist()
    pk = [p[i] + shift for i in idx]
    rk = [r[i] for i in idx]
    pt = torch.tensor(p, dtype=torch.float64, requires_grad=True)
    loss, metrics = kto_loss(pt, torch.tensor(r, dtype=torch.float64),
                             torch.tensor(pk, dtype=torch.float64),
                             torch.tensor(rk, dtype=torch.float64), torch.tensor(d), beta=beta)
    loss.backward()
    expected, z_ref = ref_kto(p, r, pk, rk, d, beta=beta)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert float(metrics["kl"]) == pytest.approx(z_ref, rel=1e-6, abs=1e-6)
    assert torch.isfinite(pt.grad).all()
    assert float(metrics["count/chosen"]) + float(metrics["count/rejected"]) == len(rows)


@settings(max_examples=60)
@given(rows=st.lists(st.tuples(st.floats(-30.0, -1e-4), st.floats(-30.0, -1e-4)), min_size=1,
                     max_size=8), beta=betas)
def test_orpo_property_matches_reference(rows, beta):
    w, lose = (torch.tensor(col, dtype=torch.float64, requires_grad=True) for col in zip(*rows))
    loss, _ = orpo_loss(w, lose, beta=beta)
    loss.backward()
    expected = sum(ref_orpo_one(a, b, beta=beta) for a, b in rows) / len(rows)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert torch.isfinite(w.grad).all() and torch.isfinite(lose.grad).all()


# ----------------------------------------------------------------------------------------------
# AOT (batch-coupled) and the f-divergences
# ----------------------------------------------------------------------------------------------


def _batch_finite_difference(fn, columns, h=1e-6):
    """Central differences of fn(*columns) (lists of floats) in every entry of every column."""
    grads = []
    for j, column in enumerate(columns):
        grads.append([])
        for i in range(len(column)):
            up = [list(c) for c in columns]
            down = [list(c) for c in columns]
            up[j][i] += h
            down[j][i] -= h
            grads[j].append((fn(*up) - fn(*down)) / (2 * h))
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_aot_matches_the_sorted_reference(kind, eps, dtype):
    tensors = make_pairs(7, dtype, seed=11)
    loss, metrics = dpo_loss(*tensors, beta=0.5, loss_type=kind, label_smoothing=eps)
    loss.backward()
    columns = [as_floats(t) for t in tensors]

    def reference(*cols):
        return ref_aot_batch(kind, *cols, beta=0.5, eps=eps)

    v_atol, v_rtol, g_atol, g_rtol = TOLERANCES[dtype]
    check_close(loss, reference(*columns), v_atol, v_rtol, "loss")
    for t, g in zip(tensors, _batch_finite_difference(reference, columns)):
        check_close(t.grad, g, g_atol, g_rtol, "gradient")
    check_metrics_are_detached_floats(metrics)
    # The sort couples the batch: shuffling the pairs keeps the loss (unlike one pair alone).
    order = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    shuffled, _ = dpo_loss(*(t.detach()[order] for t in tensors), beta=0.5, loss_type=kind,
                           label_smoothing=eps)
    check_close(shuffled, reference(*columns), v_atol, v_rtol, "shuffled")


def _ref_f_scores(rho, kind, alpha):
    if kind == "forward_kl":
        return -math.exp(-rho)
    if kind == "js_divergence":
        return log_sig(rho)
    if kind == "alpha_divergence":
        return math.exp((alpha - 1) * rho) / (alpha - 1)
    return rho


@pytest.mark.parametrize("f_kind, alpha", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                           ("alpha_divergence", 0.3),
                                           ("alpha_divergence", 1.7)])
@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "nca_pair", "apo_zero",
                                  "apo_down", "sigmoid_norm"])
def test_f_divergence_scores_replace_the_log_ratios(kind, f_kind, alpha):
    """Wang et al. (2023): s = f'(π/π_ref) in place of ρ; apo_zero and apo_down's first term
    keep ρ. Checked against the per-pair formulas of this file, on the scores."""
    dtype = torch.float64
    pc, pr, rc, rr = make_pairs(6, dtype, seed=21, spread=0.5)
    n_w, n_l = torch.arange(3, 9), torch.arange(5, 11)
    options = DPOOptions(beta=0.4, loss_type=kind, f_divergence_type=f_kind,
                         f_alpha_divergence_coef=alpha)
    loss, _ = dpo_loss(pc, pr, rc, rr, chosen_lengths=n_w, rejected_lengths=n_l,
                       options=options)
    expected = []
    for i, (a, b, c, d) in enumerate(zip(*map(as_floats, (pc, pr, rc, rr)))):
        s_w, s_l = _ref_f_scores(a - c, f_kind, alpha), _ref_f_scores(b - d, f_kind, alpha)
        if kind == "apo_zero":
            expected.append(ref_dpo_one(kind, a, b, c, d, beta=0.4))
        elif kind == "apo_down":
            expected.append(sig(0.4 * (a - c)) + (1 - sig(0.4 * (s_w - s_l))))
        else:  # the pairwise formula on scores: ρ_w = s_w, ρ_l = s_l (references 0)
            expected.append(ref_dpo_one(kind, s_w, s_l, 0.0, 0.0, beta=0.4,
                                        n_w=float(n_w[i]), n_l=float(n_l[i])))
    check_close(loss, sum(expected) / 6, 1e-10, 1e-10, f"{kind} under {f_kind}")


def test_reverse_kl_and_the_alpha_limit_are_dpo():
    tensors = make_pairs(5, torch.float64, seed=2)
    dpo, _ = dpo_loss(*tensors, beta=0.3)
    for options in (DPOOptions(beta=0.3, f_divergence_type="reverse_kl"),
                    DPOOptions(beta=0.3, f_divergence_type="alpha_divergence",
                               f_alpha_divergence_coef=1.0)):
        same, _ = dpo_loss(*tensors, options=options)
        torch.testing.assert_close(same, dpo)


def test_bad_f_divergence_and_missing_lengths_are_named():
    with pytest.raises(ValueError, match="f_divergence_type must be one of reverse_kl"):
        DPOOptions(f_divergence_type="kl")
    with pytest.raises(ValueError, match="f_alpha_divergence_coef must be"):
        DPOOptions(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("nan"))
    with pytest.raises(ValueError, match="'sigmoid_norm' needs chosen_lengths and rejected"):
        dpo_loss(*make_pairs(3, torch.float32, seed=0), loss_type="sigmoid_norm")
