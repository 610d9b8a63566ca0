"""Numerical robustness of the fused head ops at the extremes, and non-finite inputs.

Part 1, extreme logits: raw logits reach ±1e4 with float32 inputs and ±1e3 with bfloat16,
temperature runs from 1e-2 to 1e2 (scaled logits up to ±1e6), with and without a softcap: the
whole grid with V = 1031 (C++ kernel, reference) and V = 300 (Triton, through the interpreter on
CPU), and its hardest corners with V = 256k on the C++ kernel. Three logit layouts per token:
"spread" (one logit at +L, one at −L, the rest in between), "dominant" (one token at +L, every
other about −L) and "ties" (four identical top rows). Every output and every gradient (random
upstream gradients) must be finite, log-probs ≤ 0, 0 ≤ entropy ≤ log V and KL ≥ 0, and
everything must agree with a float64 ground truth:

* values: |ours − truth| ≤ 4·|PyTorch float32 − truth| + a few float32 ulps. PyTorch float32 is
  the materialising reference computing the logits in float32 from the same inputs: the kernels
  compute logits in float32 too, so they must be as good as PyTorch at that precision.
* gradients: the same bar, plus c·Σ_v |∂L/∂a_v|·|W_v| (and Σ_n |∂L/∂a_n|·|h_n| for the head): the
  sum of the magnitudes of the terms a gradient adds up. A gradient that is a small difference of
  huge terms (a 4-way tie at temperature 1e-2) can only be known to that precision relative to
  its terms; c is a few float32 ulps for float32 inputs and a few bfloat16 ulps for bfloat16 (whose
  backward may multiply bfloat16 operands, as tensor cores do).

Part 2, non-finite inputs: ``check_finite=True`` raises a ValueError that names the tensor and the
kind of value; without it a NaN or ±inf in one token's hidden state gives non-finite outputs on
that token only (the others bit-identical to a clean run), a NaN in the head gives non-finite
outputs everywhere, and a non-finite hidden state on an ignored / masked token changes nothing.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import impl_device, impl_is_available

import fastalign
from fastalign import (
    linear_kl,
    linear_kl_reference,
    linear_logprobs,
    linear_logprobs_reference,
)

IMPLS = ("cpp", "triton", "reference")
VOCAB = {"cpp": 1031, "reference": 1031, "triton": 300}  # the full grid; 256k: a subset, below
LARGE_VOCAB = 256_000
N_TOKENS, HIDDEN = 3, 8
LIMITS = {torch.float32: 1e4, torch.bfloat16: 1e3}  # the largest |raw logit| per input dtype
KINDS = ("spread", "dominant", "ties")
TEMPERATURES = (1e-2, 1.0, 1e2)
SOFTCAPS = (None, 30.0)
N_TIED = 4
# Slack for the gradients' sums of term magnitudes, per input dtype (see the module docstring).
TERM_SLACK = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -7}

# The interpreter evaluates masked-out lanes, and non-finite inputs, with numpy: warnings only.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
)


def _require(impl):
    if not impl_is_available(impl):
        pytest.skip(f"{impl} is not available here: {fastalign.available_implementations()}")


# ----------------------------------------------------------------------------------------------
# Inputs and the float64 ground truth
# ----------------------------------------------------------------------------------------------


def extreme_head(kind: str, vocab: int, limit: float, dtype: torch.dtype, seed: int = 0):
    """hidden [N, H] (unit rows), weight [V, H] (rows of norm ``limit``) and targets [N] whose raw
    logits h·W_v reach about ±limit; built in float64, then cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    targets = torch.randint(0, vocab, (N_TOKENS,), generator=gen)
    if kind == "spread":  # token n: row n at +limit, row N + n at −limit, the rest in between
        hidden = unit(torch.randn(N_TOKENS, HIDDEN, **f64))
        weight = limit * unit(torch.randn(vocab, HIDDEN, **f64))
        weight[:N_TOKENS] = limit * hidden
        weight[N_TOKENS:2 * N_TOKENS] = -limit * hidden
        targets[0] = N_TOKENS  # token 0 targets its lowest logit: logp ≈ −2·limit/T
    else:  # every token near one direction u: the top row(s) +limit·u, the others about −limit
        n_top = 1 if kind == "dominant" else N_TIED
        u = unit(torch.randn(HIDDEN, **f64))
        hidden = unit(u + 0.05 * torch.randn(N_TOKENS, HIDDEN, **f64))
        low = 0.5 + 0.5 * torch.rand(vocab, 1, **f64)
        weight = limit * unit(-low * u + 0.05 * torch.randn(vocab, HIDDEN, **f64))
        weight[:n_top] = limit * u  # identical rows: exactly tied logits
        targets[0], targets[1] = 0, vocab - 1  # a top token, and a far-below one
    return hidden.to(dtype), weight.to(dtype), targets


def _scaled(a, temperature, softcap):
    if softcap is not None:
        a = softcap * torch.tanh(a / softcap)
    return a / temperature


def logits_truth(hidden, weights, loss_fn):
    """Float64 values of ``loss_fn(raw logits...)`` and the gradients of their weighted sum.

    ``weights`` are the heads ([V, H] each) applied to ``hidden`` (a list of [N, H]). Returns the
    outputs, the gradients of each hidden and head, and for each the sum of the magnitudes of the
    terms it adds up (Σ_v |∂L/∂a_v|·|W_v| and Σ_n |∂L/∂a_n|·|h_n|)."""
    hs = [h.detach().double() for h in hidden]
    ws = [w.detach().double() for w in weights]
    logits = [(h @ w.T).requires_grad_() for h, w in zip(hs, ws)]
    outputs, loss = loss_fn(*logits)
    loss.backward()
    grads, terms = [], []
    for h, w, a in zip(hs, ws, logits):
        grads.append((a.grad @ w, a.grad.T @ h))
        terms.append((a.grad.abs() @ w.abs(), a.grad.abs().T @ h.abs()))
    return [o.detach() for o in outputs], grads, terms


def assert_value_ok(name, ours, truth, torch_fp32, *, abs_slack=1e-5):
    """|ours − truth| ≤ 4·max|PyTorch float32 − truth| + 2^-20·|truth| + abs_slack, elementwise."""
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)}"
    assert torch.isfinite(ours).all(), f"{name} is not finite: {ours}"
    torch_err = (torch_fp32.double() - truth).abs().max().item()
    error = (ours.double() - truth).abs()
    bound = 4 * torch_err + 2.0 ** -20 * truth.abs() + abs_slack
    worst = int((error - bound).argmax())
    assert (error <= bound).all(), (
        f"{name}: error {error.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
        f"(PyTorch float32's error {torch_err:.3g}, truth {truth.flatten()[worst]:.6g}, "
        f"ours {ours.flatten()[worst].item():.6g})")


def assert_grad_ok(name, ours, truth, terms, torch_fp32, dtype):
    """|ours − truth| ≤ 4·max|PyTorch float32 − truth| + c·(sum of term magnitudes), elementwise."""
    assert ours is not None, f"{name}: no gradient"
    assert ours.shape == truth.shape and ours.dtype == dtype, f"{name}: {ours.shape} {ours.dtype}"
    assert torch.isfinite(ours).all(), f"{name} is not finite"
    torch_err = (torch_fp32.double() - truth).abs().max().item()
    error = (ours.double() - truth).abs()
    bound = 4 * torch_err + TERM_SLACK[dtype] * terms + 1e-15  # 1e-15: a saturated softcap
    worst = int((error - bound).argmax())
    assert (error <= bound).all(), (
        f"{name}: error {error.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
        f"(PyTorch float32's error {torch_err:.3g}, term magnitudes {terms.flatten()[worst]:.3g},"
        f" truth {truth.flatten()[worst]:.3g})")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


# ----------------------------------------------------------------------------------------------
# linear_logprobs at the extremes
# ----------------------------------------------------------------------------------------------


def _logprob_loss(targets, temperature, softcap, g_logp, g_ent):
    def loss_fn(a):
        log_probs = torch.log_softmax(_scaled(a, temperature, softcap), dim=-1)
        logp = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return (logp, entropy), (logp * g_logp).sum() + (entropy * g_ent).sum()
    return loss_fn


def _grid(impls, vocab_of, combos):
    """pytest params (impl, vocab, dtype, kind, temperature, softcap) with readable ids."""
    return [pytest.param(impl, vocab_of(impl), dtype, kind, temperature, softcap,
                         id=f"{impl}-V{vocab_of(impl)}-{str(dtype).removeprefix('torch.')}-{kind}"
                            f"-T{temperature:g}-{'softcap30' if softcap else 'no-softcap'}")
            for impl in impls for dtype in LIMITS for kind, temperature, softcap in combos]


FULL_GRID = [(kind, t, c) for kind in KINDS for t in TEMPERATURES for c in SOFTCAPS]
# At 256k (C++ only; a few seconds): the hardest layouts. Peaked at T = 1e-2 (scaled logits
# ±1e6), flat over 256k tokens at T = 1e2 with a softcap (entropy ≈ log V, sums of 256k similar
# terms), four-way ties.
LARGE_GRID = [("dominant", 1e-2, None), ("spread", 1e2, 30.0), ("ties", 1.0, 30.0)]
CASE_ARGS = "impl, vocab, dtype, kind, temperature, softcap"
CASES = (_grid(IMPLS, VOCAB.get, FULL_GRID)
         + _grid(["cpp"], lambda impl: LARGE_VOCAB, LARGE_GRID))


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_linear_logprobs_extreme_logits(impl, vocab, dtype, kind, temperature, softcap):
    _require(impl)
    hidden, weight, targets = extreme_head(kind, vocab, LIMITS[dtype], dtype)
    gen = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(N_TOKENS, generator=gen), torch.randn(N_TOKENS, generator=gen)
    options = dict(temperature=temperature, softcap=softcap, return_entropy=True)

    device = impl_device(impl)
    h, w = _leaves(hidden.to(device), weight.to(device))
    logp, entropy = linear_logprobs(h, w, targets.to(device), impl=impl, **options)
    ((logp * g_logp.to(device)).sum() + (entropy * g_ent.to(device)).sum()).backward()
    logp, entropy = logp.detach().cpu(), entropy.detach().cpu()
    dh, dw = h.grad.cpu(), w.grad.cpu()

    # PyTorch at float32: the bar the kernels must clear.
    if impl == "reference":  # the same computation
        h32, w32, logp32, entropy32 = h, w, logp, entropy
    else:
        h32, w32 = _leaves(hidden, weight)
        logp32, entropy32 = linear_logprobs_reference(h32, w32, targets,
                                                      compute_dtype=torch.float32, **options)
        ((logp32 * g_logp).sum() + (entropy32 * g_ent).sum()).backward()

    (logp64, entropy64), [(dh64, dw64)], [(terms_h, terms_w)] = logits_truth(
        [hidden], [weight], _logprob_loss(targets, temperature, softcap, g_logp.double(),
                                          g_ent.double()))

    # The constructions reach the advertised magnitudes.
    raw = hidden.double() @ weight.double().T
    assert raw.abs().max() >= 0.95 * LIMITS[dtype]

    assert logp.dtype == entropy.dtype == torch.float32
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all(), (logp, entropy)
    assert (logp <= 0).all(), logp
    assert (entropy >= -1e-6).all() and (entropy <= math.log(vocab) + 1e-4).all(), entropy
    assert_value_ok("logp", logp, logp64, logp32)
    assert_value_ok("entropy", entropy, entropy64, entropy32)
    assert_grad_ok("d hidden", dh, dh64, terms_h, h32.grad, dtype)
    assert_grad_ok("d weight", dw, dw64, terms_w, w32.grad, dtype)

    if temperature == 1e-2 and kind != "spread":
        # Independent of any reference: at T = 1e-2 the top row(s) take all the mass.
        n_top = 1 if kind == "dominant" else N_TIED
        assert abs(logp[0].item() + math.log(n_top)) < 1e-5, logp
        assert abs(entropy[0].item() - math.log(n_top)) < 1e-5, entropy


def test_logits_truth_matches_the_library_reference():
    """The test's own float64 truth (autograd through materialised float64 logits) is the
    library's reference: same values, same gradients."""
    hidden, weight, targets = extreme_head("spread", 500, 30.0, torch.float32)
    g_logp, g_ent = torch.randn(N_TOKENS), torch.randn(N_TOKENS)
    (logp64, entropy64), [(dh64, dw64)], _ = logits_truth(
        [hidden], [weight], _logprob_loss(targets, 0.7, 20.0, g_logp.double(), g_ent.double()))
    h, w = _leaves(hidden.double(), weight.double())
    logp, entropy = linear_logprobs_reference(h, w, targets, temperature=0.7, softcap=20.0,
                                              return_entropy=True)
    ((logp * g_logp.double()).sum() + (entropy * g_ent.double()).sum()).backward()
    for ours, ref in ((logp64, logp), (entropy64, entropy), (dh64, h.grad), (dw64, w.grad)):
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# linear_kl at the extremes
# ----------------------------------------------------------------------------------------------

# The reference head for each layout: "near" (the policy's hidden states moved by 1%) gives a
# small KL from two huge log-sum-exps; "far" (the head's rows rolled by one, so the reference's
# top token is elsewhere) gives KL ≈ 2·L/T, up to 2e6. The reverse direction is the same kernel
# with the heads' roles swapped: it alternates with the temperature to keep the grid small.
KL_REFERENCE = {"spread": "near", "dominant": "far", "ties": "far"}


def _reference_head(kind, hidden, weight):
    if KL_REFERENCE[kind] == "near":
        gen = torch.Generator().manual_seed(2)
        shift = 1e-2 * torch.randn(hidden.shape, generator=gen, dtype=torch.float64)
        return (hidden.double() + shift).to(hidden.dtype), weight
    return hidden, torch.roll(weight, 1, 0)


def _kl_loss(temperature, softcap, reverse, g):
    def loss_fn(a, a_ref):
        log_p = torch.log_softmax(_scaled(a, temperature, softcap), dim=-1)
        log_q = torch.log_softmax(_scaled(a_ref, temperature, softcap), dim=-1)
        if reverse:
            log_p, log_q = log_q, log_p
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return (kl,), (kl * g).sum()
    return loss_fn


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_linear_kl_extreme_logits(impl, vocab, dtype, kind, temperature, softcap):
    _require(impl)
    reverse = temperature == 1.0
    hidden, weight, _ = extreme_head(kind, vocab, LIMITS[dtype], dtype)
    ref_hidden, ref_weight = _reference_head(kind, hidden, weight)
    g = torch.randn(N_TOKENS, generator=torch.Generator().manual_seed(1))
    options = dict(temperature=temperature, softcap=softcap, reverse=reverse)

    device = impl_device(impl)
    h, w = _leaves(hidden.to(device), weight.to(device))
    kl = linear_kl(h, w, ref_hidden.to(device), ref_weight.to(device), impl=impl, **options)
    (kl * g.to(device)).sum().backward()
    kl, dh, dw = kl.detach().cpu(), h.grad.cpu(), w.grad.cpu()

    if impl == "reference":  # the same computation
        h32, w32, kl32 = h, w, kl
    else:
        h32, w32 = _leaves(hidden, weight)
        kl32 = linear_kl_reference(h32, w32, ref_hidden, ref_weight,
                                   compute_dtype=torch.float32, **options)
        (kl32 * g).sum().backward()

    (kl64,), [(dh64, dw64), _], [(terms_h, terms_w), _] = logits_truth(
        [hidden, ref_hidden], [weight, ref_weight],
        _kl_loss(temperature, softcap, reverse, g.double()))

    assert kl.dtype == torch.float32
    assert torch.isfinite(kl).all(), kl
    # The fused kernels clamp rounding's tiny negatives at 0; the reference does not.
    assert (kl >= (-1e-6 if impl == "reference" else 0.0)).all(), kl
    # KL is a difference of two log-sum-exps of up to 256k terms, each summed in float32: a few
    # float32 ulps of log V ≈ 12.5 is the absolute floor.
    assert_value_ok("kl", kl, kl64, kl32, abs_slack=1e-5)
    assert_grad_ok("d hidden", dh, dh64, terms_h, h32.grad, dtype)
    assert_grad_ok("d weight", dw, dw64, terms_w, w32.grad, dtype)
    if KL_REFERENCE[kind] == "far" and softcap is None and temperature == 1e-2:
        # The reference puts ~no mass where the policy puts ≥ 1/4 of it: KL ~ L/T, yet finite.
        assert (kl > 0.2 * LIMITS[dtype] / temperature).all(), kl


# ----------------------------------------------------------------------------------------------
# check_finite=True
# ----------------------------------------------------------------------------------------------

BAD_VALUES = {"nan": (float("nan"), "NaN"), "+inf": (float("inf"), "inf"),
              "-inf": (float("-inf"), "inf")}


def _small_head_inputs(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, h_size, vocab = 5, 8, 37
    tensors = dict(
        hidden=torch.randn(n, h_size, generator=gen),
        weight=torch.randn(vocab, h_size, generator=gen),
        bias=torch.randn(vocab, generator=gen),
        ref_hidden=torch.randn(n, h_size, generator=gen),
        ref_weight=torch.randn(vocab, h_size, generator=gen),
        ref_bias=torch.randn(vocab, generator=gen),
    )
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    return tensors, targets


def _poison(tensor, value, index=1):
    """A copy of ``tensor`` with one element (row ``index`` for matrices) set to ``value``."""
    tensor = tensor.clone()
    if tensor.dim() == 1:
        tensor[index] = value
    else:
        tensor[index, 3] = value
    return tensor


def _call_logprobs(tensors, targets, impl, **kwargs):
    return linear_logprobs(tensors["hidden"], tensors["weight"], targets, bias=tensors["bias"],
                           return_entropy=True, impl=impl, **kwargs)


def _call_kl(tensors, impl, **kwargs):
    return linear_kl(tensors["hidden"], tensors["weight"], tensors["ref_hidden"],
                     tensors["ref_weight"], bias=tensors["bias"], ref_bias=tensors["ref_bias"],
                     impl=impl, **kwargs)


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("name", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("impl", IMPLS)
def test_check_finite_names_the_tensor_linear_logprobs(impl, name, bad):
    _require(impl)
    tensors, targets = _small_head_inputs(impl_device(impl))
    value, word = BAD_VALUES[bad]
    tensors[name] = _poison(tensors[name], value)
    with pytest.raises(ValueError, match=rf"^{name} contains {word} \(1 of "):
        _call_logprobs(tensors, targets, impl, check_finite=True)


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("name", ["hidden", "weight", "bias", "ref_hidden", "ref_weight",
                                  "ref_bias"])
@pytest.mark.parametrize("impl", IMPLS)
def test_check_finite_names_the_tensor_linear_kl(impl, name, bad):
    _require(impl)
    tensors, _ = _small_head_inputs(impl_device(impl))
    value, word = BAD_VALUES[bad]
    tensors[name] = _poison(tensors[name], value)
    with pytest.raises(ValueError, match=rf"^{name} contains {word} \(1 of "):
        _call_kl(tensors, impl, check_finite=True)


def test_check_finite_reports_both_kinds_in_bfloat16():
    tensors, targets = _small_head_inputs("cpu", dtype=torch.bfloat16)
    hidden = _poison(tensors["hidden"], float("nan"), index=0)
    tensors["hidden"] = _poison(hidden, float("-inf"), index=2)
    with pytest.raises(ValueError, match=r"^hidden contains NaN and inf \(2 of 40 values, first "
                                         r"at index \(0, 3\)\)"):
        _call_logprobs(tensors, targets, "auto", check_finite=True)
    with pytest.raises(ValueError, match=r"^hidden contains NaN and inf"):
        _call_kl(tensors, "auto", check_finite=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_check_finite_passes_finite_inputs_unchanged(impl):
    _require(impl)
    tensors, targets = _small_head_inputs(impl_device(impl))
    for checked, unchecked in ((_call_logprobs(tensors, targets, impl, check_finite=True),
                                _call_logprobs(tensors, targets, impl)),
                               ((_call_kl(tensors, impl, check_finite=True),),
                                (_call_kl(tensors, impl),))):
        for a, b in zip(checked, unchecked):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Without check_finite: where a non-finite input shows up
# ----------------------------------------------------------------------------------------------

def _logprobs_and_grads(tensors, targets, impl):
    leaves = {k: tensors[k].detach().clone().requires_grad_() for k in ("hidden", "weight",
                                                                         "bias")}
    logp, entropy = _call_logprobs(leaves, targets, impl)
    gen = torch.Generator().manual_seed(3)
    g1, g2 = (torch.randn(logp.shape, generator=gen).to(logp.device) for _ in range(2))
    ((logp * g1).sum() + (entropy * g2).sum()).backward()
    return logp.detach(), entropy.detach(), {k: v.grad for k, v in leaves.items()}


# A NaN must stay a NaN: a clamp such as min(logp, 0) that drops it would turn a diverged token
# into log-prob 0, a perfect prediction (Triton's tl.minimum did, before propagate_nan).
@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("impl", IMPLS)
def test_nonfinite_hidden_shows_on_its_token_only_linear_logprobs(impl, bad):
    _require(impl)
    tensors, targets = _small_head_inputs(impl_device(impl))
    clean = _logprobs_and_grads(tensors, targets, impl)
    tensors["hidden"] = _poison(tensors["hidden"], BAD_VALUES[bad][0], index=1)
    logp, entropy, grads = _logprobs_and_grads(tensors, targets, impl)
    others = [0, 2, 3, 4]
    # The poisoned token: no finite number that could pass for a log-prob or an entropy.
    assert not torch.isfinite(logp[1]) and not torch.isfinite(entropy[1]), (logp, entropy)
    assert torch.equal(logp[others], clean[0][others])
    assert torch.equal(entropy[others], clean[1][others])
    assert torch.equal(grads["hidden"][others], clean[2]["hidden"][others])
    assert not torch.isfinite(grads["hidden"][1]).all()


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nan_in_the_head_shows_on_every_token_linear_logprobs(impl, name):
    _require(impl)
    tensors, targets = _small_head_inputs(impl_device(impl))
    tensors[name] = _poison(tensors[name], float("nan"), index=7)
    logp, entropy, _ = _logprobs_and_grads(tensors, targets, impl)
    assert not torch.isfinite(logp).any(), logp
    assert not torch.isfinite(entropy).any(), entropy


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("impl", IMPLS)
def test_nonfinite_hidden_on_an_ignored_token_changes_nothing(impl, bad):
    """Padding positions may hold anything: an ignored token gets no gradient and gives none
    (no 0·NaN in the head's gradient either)."""
    _require(impl)
    tensors, targets = _small_head_inputs(impl_device(impl))
    targets[1] = -100
    zeroed = dict(tensors, hidden=_poison(tensors["hidden"], 0.0, index=1))
    clean = _logprobs_and_grads(zeroed, targets, impl)
    tensors["hidden"] = _poison(tensors["hidden"], BAD_VALUES[bad][0], index=1)
    logp, entropy, grads = _logprobs_and_grads(tensors, targets, impl)
    assert logp[1] == 0 and entropy[1] == 0
    assert torch.equal(logp, clean[0]) and torch.equal(entropy, clean[1])
    for name in ("hidden", "weight", "bias"):
        assert torch.isfinite(grads[name]).all(), f"d {name} is not finite"
        torch.testing.assert_close(grads[name], clean[2][name], rtol=1e-6, atol=1e-6)


def _kl_and_grads(tensors, impl, mask=None):
    leaves = {k: tensors[k].detach().clone().requires_grad_() for k in ("hidden", "weight",
                                                                         "bias")}
    kl = _call_kl(dict(tensors, **leaves), impl, mask=mask)
    g = torch.randn(kl.shape, generator=torch.Generator().manual_seed(3)).to(kl.device)
    (kl * g).sum().backward()
    return kl.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("name", ["hidden", "ref_hidden"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nonfinite_hidden_shows_on_its_token_only_linear_kl(impl, name, bad):
    _require(impl)
    tensors, _ = _small_head_inputs(impl_device(impl))
    clean_kl, clean_grads = _kl_and_grads(tensors, impl)
    tensors[name] = _poison(tensors[name], BAD_VALUES[bad][0], index=1)
    kl, grads = _kl_and_grads(tensors, impl)
    others = [0, 2, 3, 4]
    assert torch.isnan(kl[1]), kl
    assert torch.equal(kl[others], clean_kl[others])
    assert torch.equal(grads["hidden"][others], clean_grads["hidden"][others])


@pytest.mark.parametrize("name", ["weight", "bias", "ref_weight", "ref_bias"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nan_in_either_head_shows_on_every_token_linear_kl(impl, name):
    _require(impl)
    tensors, _ = _small_head_inputs(impl_device(impl))
    tensors[name] = _poison(tensors[name], float("nan"), index=7)
    kl, _ = _kl_and_grads(tensors, impl)
    assert torch.isnan(kl).all(), kl


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("impl", IMPLS)
def test_nonfinite_hidden_on_a_masked_token_changes_nothing_linear_kl(impl, bad):
    _require(impl)
    tensors, _ = _small_head_inputs(impl_device(impl))
    mask = torch.tensor([True, False, True, True, True], device=impl_device(impl))
    clean_kl, clean_grads = _kl_and_grads(tensors, impl, mask)
    for name in ("hidden", "ref_hidden"):
        tensors[name] = _poison(tensors[name], BAD_VALUES[bad][0], index=1)
    kl, grads = _kl_and_grads(tensors, impl, mask)
    assert kl[1] == 0 and torch.equal(kl, clean_kl)
    for name in ("hidden", "weight", "bias"):
        assert torch.isfinite(grads[name]).all(), f"d {name} is not finite"
        assert torch.equal(grads[name], clean_grads[name])
