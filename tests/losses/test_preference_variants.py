"""TRL 1.16's preference-loss options: LD-DPO's ``ld_alpha``, WPO's ``use_weighting`` (and the
``linear_logit_stats(..., log_sum_sq_probs=True)`` it needs), KTO's ``apo_zero_unpaired``,
CPO's ``hinge`` / ``ipo`` and AlphaPO.

Each ground truth is written here from the paper's formula in plain loops and materialised
softmaxes: nothing of ``fastalign.losses`` is used for it. Values and gradients are compared
after ``backward`` of a random upstream gradient, on odd lengths and masks with holes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastalign import FusedCPOLoss, FusedDPOLoss, FusedSimPOLoss
from fastalign.losses import (
    CPOOptions,
    DPOOptions,
    KTOOptions,
    cpo_loss,
    dpo_loss,
    kto_loss,
    ld_sequence_logps,
    simpo_loss,
    wpo_sequence_weights,
)
from fastalign.ops import linear_logit_stats, linear_logit_stats_reference

# ----------------------------------------------------------------------------------------------
# Plain references
# ----------------------------------------------------------------------------------------------


def ld_reference(chosen, chosen_mask, rejected, rejected_mask, alpha):
    """Per pair: the first min(n_w, n_l) answer tokens at weight 1, the later ones at alpha."""
    out_w, out_l = [], []
    for b in range(chosen.shape[0]):
        idx_w = chosen_mask[b].nonzero().flatten().tolist()
        idx_l = rejected_mask[b].nonzero().flatten().tolist()
        shared = min(len(idx_w), len(idx_l))
        for idx, values, out in ((idx_w, chosen[b], out_w), (idx_l, rejected[b], out_l)):
            total = values.new_zeros(())
            for k, t in enumerate(idx):
                total = total + (1.0 if k < shared else alpha) * values[t]
            out.append(total)
    return torch.stack(out_w), torch.stack(out_l)


def logits_of(hidden, weight, bias=None, temperature=1.0, softcap=None):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def wpo_reference(logits, targets, mask):
    """exp(mean over the answer of log p(y_t) − log Σ_v p_v²), from the softmax itself."""
    probs = torch.softmax(logits.double(), dim=-1)
    token = torch.log(probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1))
    collision = torch.log((probs ** 2).sum(-1))
    m = mask.double()
    return torch.exp(((token - collision) * m).sum(-1) / m.sum(-1).clamp(min=1))


def _masks(batch, length, generator):
    """Masks with holes and odd, different lengths; every row keeps at least one token."""
    mask = torch.rand(batch, length, generator=generator) > 0.35
    mask[:, 0] = True
    mask[0, length // 2:] = False  # one short answer
    return mask


# ----------------------------------------------------------------------------------------------
# LD-DPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_sequence_logps_values_and_gradients(alpha):
    gen = torch.Generator().manual_seed(0)
    chosen = (-torch.rand(3, 13, generator=gen, dtype=torch.float64)).requires_grad_()
    rejected = (-torch.rand(3, 9, generator=gen, dtype=torch.float64)).requires_grad_()
    chosen_mask, rejected_mask = _masks(3, 13, gen), _masks(3, 9, gen)
    ours = ld_sequence_logps(chosen, chosen_mask, rejected, rejected_mask, alpha)
    expected = ld_reference(chosen, chosen_mask, rejected, rejected_mask, alpha)
    upstream = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    ours_grads = torch.autograd.grad(sum((u * o).sum() for u, o in zip(upstream, ours)),
                                     (chosen, rejected))
    expected_grads = torch.autograd.grad(
        sum((u * e).sum() for u, e in zip(upstream, expected)), (chosen, rejected))
    for o, e in zip((*ours, *ours_grads), (*expected, *expected_grads)):
        torch.testing.assert_close(o, e)
    if alpha == 1.0:  # no down-weighting: the plain masked sums
        torch.testing.assert_close(ours[0], (chosen * chosen_mask).sum(-1))


def test_ld_alpha_is_checked():
    with pytest.raises(ValueError, match=r"ld_alpha must lie in \[0.0, 1.0\]"):
        DPOOptions(ld_alpha=1.5)
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="ld_alpha"):
        ld_sequence_logps(x, m, x, m, -0.1)


# ----------------------------------------------------------------------------------------------
# WPO: the op, the weights, the loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, hidden_size, vocab, bias, options, blocks", [
    ((64,), 32, 256, False, {}, {}),
    ((3, 47), 31, 123, True, {}, {"block_rows": 40, "block_vocab": 16}),
    ((2, 13), 20, 211, True, {"softcap": 5.0, "temperature": 0.7},
     {"block_rows": 8, "block_vocab": 50}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_log_sum_sq_probs_matches_the_softmax(shape, hidden_size, vocab, bias, options, blocks,
                                              dtype):
    gen = torch.Generator().manual_seed(1)
    hidden = (2 * torch.randn(*shape, hidden_size, generator=gen)).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5).to(dtype)
    head_bias = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    ours = linear_logit_stats(hidden, weight, bias=head_bias, log_sum_sq_probs=True, **options,
                              **blocks).log_sum_sq_probs
    probs = torch.softmax(logits_of(hidden, weight, head_bias, **options), dim=-1)
    expected = torch.log((probs ** 2).sum(-1))
    assert ours.shape == shape and not ours.requires_grad
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours.double(), expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(ours, linear_logit_stats_reference(
        hidden, weight, bias=head_bias, **options).log_sum_sq_probs, rtol=1e-5, atol=1e-5)


def test_wpo_weights_and_weighted_dpo_loss():
    gen = torch.Generator().manual_seed(2)
    batch, length, vocab = 3, 11, 17
    logits = torch.randn(2 * batch, length, vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (2 * batch, length), generator=gen)
    mask = _masks(2 * batch, length, gen)
    log_probs = torch.log_softmax(logits, -1)
    token_logps = log_probs.gather(-1, targets[..., None]).squeeze(-1) * mask
    collision = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
    weights = wpo_sequence_weights(token_logps, collision, mask)
    torch.testing.assert_close(weights, wpo_reference(logits, targets, mask))

    policy = torch.randn(2 * batch, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2 * batch, generator=gen, dtype=torch.float64)
    pair_weights = weights[:batch] * weights[batch:]
    loss, _ = dpo_loss(*policy.chunk(2), *ref.chunk(2), beta=0.3, pair_weights=pair_weights,
                       options=None)
    rho = policy - ref
    expected = (-F.logsigmoid(0.3 * (rho[:batch] - rho[batch:])) * pair_weights).mean()
    torch.testing.assert_close(loss, expected)
    grad, = torch.autograd.grad(loss, policy)
    expected_grad, = torch.autograd.grad(expected, policy)
    torch.testing.assert_close(grad, expected_grad)


def test_use_weighting_checks():
    with pytest.raises(ValueError, match="use_weighting cannot weight loss_type 'aot'"):
        DPOOptions(loss_type=("sigmoid", "aot"), use_weighting=True)
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="use_weighting .* needs pair_weights"):
        dpo_loss(x, x, x, x, options=DPOOptions(use_weighting=True))
    with pytest.raises(ValueError, match="pair_weights cannot weight loss_type 'aot_unpaired'"):
        dpo_loss(x, x, x, x, loss_type="aot_unpaired", pair_weights=torch.ones(2))
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        dpo_loss(x, x, x, x, pair_weights=torch.ones(3))


# ----------------------------------------------------------------------------------------------
# FusedDPOLoss with both options, against the materialised logits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ld_alpha, use_weighting", [(0.4, False), (None, True), (0.0, True)])
def test_fused_dpo_with_ld_alpha_and_wpo_equals_eager(ld_alpha, use_weighting):
    gen = torch.Generator().manual_seed(3)
    pairs, length, hidden_size, vocab, beta = 3, 10, 12, 37, 0.5
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=gen, dtype=torch.float64,
                         requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64)
              / hidden_size ** 0.5).requires_grad_()
    ref_hidden = hidden.detach() + 0.3 * torch.randn(hidden.shape, generator=gen,
                                                     dtype=torch.float64)
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    labels[:, :3] = -100  # prompt
    labels[1, 6:] = -100  # a short chosen answer
    labels[pairs + 2, 5:] = -100  # a short rejected answer
    labels[pairs, 4] = -100  # a hole

    loss_fn = FusedDPOLoss(beta=beta, ld_alpha=ld_alpha, use_weighting=use_weighting,
                           impl="reference")
    loss, metrics = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=weight)

    targets, mask = labels[:, 1:], labels[:, 1:] != -100

    def sequence(h, w):
        log_probs = torch.log_softmax(logits_of(h, w)[:, :-1], -1)
        token = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
        if ld_alpha is None:
            return token.sum(-1).chunk(2)
        return ld_reference(*token.chunk(2)[:1], mask[:pairs], token[pairs:], mask[pairs:],
                            ld_alpha)

    chosen, rejected = sequence(hidden, weight)
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence(ref_hidden, weight.detach())
    per_pair = -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    if use_weighting:
        with torch.no_grad():
            w = wpo_reference(logits_of(hidden, weight)[:, :-1], targets, mask)
        per_pair = per_pair * w[:pairs] * w[pairs:]
    expected = per_pair.mean()

    torch.testing.assert_close(loss.double(), expected)
    upstream = 1.7
    grads = torch.autograd.grad(upstream * loss, (hidden, weight))
    expected_grads = torch.autograd.grad(upstream * expected, (hidden, weight))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(metrics["logps/chosen"].double(), chosen.mean().detach(),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# KTO's apo_zero_unpaired
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5])
def test_kto_apo_zero_unpaired(batch):
    gen = torch.Generator().manual_seed(4)
    policy = torch.randn(batch, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(batch, generator=gen, dtype=torch.float64)
    desirable = torch.rand(batch, generator=gen) > 0.5
    desirable[0] = batch == 1 or bool(desirable[0])
    beta, w_d, w_u = 0.7, 1.3, 0.6
    loss, metrics = kto_loss(policy, ref, None, None, desirable, beta=beta, desirable_weight=w_d,
                             undesirable_weight=w_u, loss_type="apo_zero_unpaired")
    expected = []
    for b in range(batch):
        r = policy[b] - ref[b]
        expected.append(w_d * (1 - torch.sigmoid(beta * r)) if desirable[b]
                        else w_u * torch.sigmoid(beta * r))
    expected = torch.stack(expected).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, policy)[0],
                               torch.autograd.grad(expected, policy)[0])
    assert metrics["kl"].item() == 0.0


def test_kto_apo_zero_unpaired_refuses_kl_logps_and_unknown_types():
    x, d = torch.zeros(2), torch.tensor([True, False])
    with pytest.raises(ValueError, match="loss_type 'apo_zero_unpaired' has no KL reference"):
        kto_loss(x, x, x, x, d, loss_type="apo_zero_unpaired")
    with pytest.raises(ValueError, match="unknown loss_type 'apo_down'"):
        KTOOptions(loss_type="apo_down")
    with pytest.raises(ValueError, match="B >= 2"):
        kto_loss(x[:1], x[:1], None, None, d[:1])  # kto itself still needs two


# ----------------------------------------------------------------------------------------------
# CPO's hinge and ipo, AlphaPO
# ----------------------------------------------------------------------------------------------


def alphapo(logps, alpha):
    return (1 - torch.exp(logps) ** (-alpha)) / alpha if alpha else logps


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, -0.3])
def test_cpo_loss_types_and_alphapo(loss_type, alpha):
    gen = torch.Generator().manual_seed(5)
    chosen = (-2 * torch.rand(6, generator=gen, dtype=torch.float64)).requires_grad_()
    rejected = (-2 * torch.rand(6, generator=gen, dtype=torch.float64)).requires_grad_()
    beta, nll_weight = 0.8, 0.4
    loss, metrics = cpo_loss(chosen, rejected, beta=beta, alpha=nll_weight, loss_type=loss_type,
                             alphapo_alpha=alpha)
    margin = alphapo(chosen, alpha) - alphapo(rejected, alpha)
    per_pair = {"sigmoid": -F.logsigmoid(beta * margin),
                "hinge": torch.relu(1 - beta * margin),
                "ipo": (margin - 1 / (2 * beta)) ** 2}[loss_type]
    expected = per_pair.mean() + nll_weight * (-chosen).mean()
    torch.testing.assert_close(loss, expected)
    for ours, theirs in zip(torch.autograd.grad(loss, (chosen, rejected)),
                            torch.autograd.grad(expected, (chosen, rejected))):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(metrics["rewards/chosen"].double(),
                               beta * alphapo(chosen, alpha).mean().detach(), rtol=1e-6,
                               atol=1e-7)


def test_simpo_alphapo():
    gen = torch.Generator().manual_seed(6)
    chosen = (-torch.rand(5, generator=gen, dtype=torch.float64)).requires_grad_()
    rejected = -torch.rand(5, generator=gen, dtype=torch.float64)
    loss, _ = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5, alphapo_alpha=0.25)
    expected = -F.logsigmoid(2.0 * (alphapo(chosen, 0.25) - alphapo(rejected, 0.25)) - 0.5)
    torch.testing.assert_close(loss, expected.mean())
    torch.testing.assert_close(torch.autograd.grad(loss, chosen)[0],
                               torch.autograd.grad(expected.mean(), chosen)[0])


def test_cpo_options_are_checked():
    with pytest.raises(ValueError, match="label_smoothing=0.1 has no effect with "
                                         "loss_type='hinge'"):
        CPOOptions(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown loss_type 'simpo'"):
        CPOOptions(loss_type="simpo")
    with pytest.raises(ValueError, match="alphapo_alpha"):
        CPOOptions(alphapo_alpha=float("nan"))


@pytest.mark.parametrize("module, options, averaged", [
    (FusedCPOLoss, {"loss_type": "ipo", "alphapo_alpha": 0.2}, True),
    (FusedCPOLoss, {"loss_type": "hinge"}, False),
    (FusedSimPOLoss, {"alphapo_alpha": -0.5}, True),
])
def test_fused_reference_free_variants_read_the_right_log_probs(module, options, averaged):
    """CPO's ipo reads mean log-probs, hinge the sums (TRL's ``average_log_prob``)."""
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(4, 9, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(29, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 29, (4, 9), generator=gen)
    labels[:, :2] = -100
    labels[3, 6:] = -100
    loss, _ = module(impl="reference", **options)(hidden, weight, labels)
    log_probs = torch.log_softmax(logits_of(hidden, weight)[:, :-1], -1)
    mask = labels[:, 1:] != -100
    token = log_probs.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * mask
    sums, lengths = token.sum(-1), mask.sum(-1)
    per_sequence = sums / lengths if averaged else sums
    nll = -sums[:2].sum() / lengths[:2].sum()
    loss_fn = cpo_loss if module is FusedCPOLoss else simpo_loss
    expected, _ = loss_fn(*per_sequence.chunk(2), chosen_nll=nll, **options)
    torch.testing.assert_close(loss, expected)
