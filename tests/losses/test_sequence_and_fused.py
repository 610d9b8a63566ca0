"""Sequence log-probs and the fused loss modules against the materialised-logits computation.

The eager path here is what a TRL user runs: full logits from the head, log_softmax, gather of the
shifted labels, masked sums; then the same loss function. The fused modules must give the same
losses, metrics and gradients (to hidden states, head weight and bias) without the logits.
"""

import pytest
import torch
from helpers import impl_device, impl_is_available

import fastalign
from fastalign import next_token_targets, sequence_logprobs
from fastalign.fused import (
    FusedCPOLoss,
    FusedDPOLoss,
    FusedKTOLoss,
    FusedORPOLoss,
    FusedPPOLoss,
    FusedSimPOLoss,
)
from fastalign.losses.dpo import cpo_loss, dpo_loss, orpo_loss, simpo_loss
from fastalign.losses.kl import kl_penalty
from fastalign.losses.kto import kto_loss
from fastalign.losses.masked import masked_mean
from fastalign.losses.ppo import ppo_policy_loss, ppo_value_loss

IMPLS = ("cpp", "triton")


def _require(impl):
    if not impl_is_available(impl):
        pytest.skip(f"{impl} is not available here: {fastalign.available_implementations()}")


def eager_token_logps(hidden, weight, labels, *, bias=None, temperature=1.0, softcap=None,
                      with_entropy=False):
    """Materialised: logits [B, T, V] → log_softmax → gather labels[:, 1:] → [B, T − 1]."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits / temperature, -1)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    token = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
    entropy = -(log_probs.exp() * log_probs).sum(-1) * mask
    return (token, mask, entropy) if with_entropy else (token, mask)


def make_batch(batch, length, hidden_size, vocab, *, dtype=torch.float64, device="cpu", seed=0):
    """Random hidden states and labels: a prompt of 1..3 tokens (-100), response, right padding."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5 * 2
    bias = torch.randn(vocab, generator=gen) * 0.1
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    labels = ids.clone()
    for b in range(batch):
        prompt = int(torch.randint(1, 4, (1,), generator=gen))
        end = int(torch.randint(prompt + 1, length + 1, (1,), generator=gen))
        labels[b, :prompt] = -100
        labels[b, end:] = -100
    to = dict(device=device)
    return (hidden.to(dtype=dtype, **to), weight.to(dtype=dtype, **to), bias.to(dtype=dtype, **to),
            ids.to(**to), labels.to(**to))


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _assert_grads_close(fused, eager, names, rtol, atol):
    for name, a, b in zip(names, fused, eager):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(a.grad.double(), b.grad.double(), rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"d{n}: {m}")


# ---------------------------------------------------------------------------------------------
# Sequence log-probs
# ---------------------------------------------------------------------------------------------


def test_next_token_targets_shift_within_each_sequence():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    assert next_token_targets(labels).tolist() == [[5, 6, -100, -100], [-100, 7, 8, -100]]
    packed = torch.tensor([1, 2, 3, 4, 5, 6])
    cu = torch.tensor([0, 2, 2, 6])  # the middle sequence is empty
    assert next_token_targets(packed, cu_seqlens=cu).tolist() == [2, -100, 4, 5, 6, -100]


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_padded_sequence_logprobs_match_eager(impl):
    _require(impl)
    hidden, weight, bias, ids, labels = make_batch(4, 9, 16, 37)
    response_mask = labels != -100
    h1, w1, b1 = _leaves(hidden, weight, bias)
    h2, w2, b2 = _leaves(hidden, weight, bias)
    result = sequence_logprobs(h1, w1, ids, response_mask, bias=b1, temperature=0.8,
                               softcap=5.0, return_entropy=True, impl=impl)
    token, mask, entropy = eager_token_logps(h2, w2, labels, bias=b2, temperature=0.8,
                                             softcap=5.0, with_entropy=True)
    assert result.token_logps.shape == (4, 8) and result.token_mask.equal(mask)
    torch.testing.assert_close(result.token_logps, token)
    torch.testing.assert_close(result.token_entropy, entropy)
    torch.testing.assert_close(result.sum_logps, token.sum(-1))
    assert result.lengths.tolist() == mask.sum(-1).tolist()
    torch.testing.assert_close(result.mean_logps, token.sum(-1) / mask.sum(-1))
    upstream = torch.randn(2, 4, dtype=torch.float64)
    (upstream[0] * result.sum_logps + upstream[1] * result.mean_logps).sum().backward()
    (upstream[0] * token.sum(-1) + upstream[1] * token.sum(-1) / mask.sum(-1)).sum().backward()
    _assert_grads_close([h1, w1, b1], [h2, w2, b2], ["hidden", "weight", "bias"], 1e-10, 1e-12)


def test_packed_sequences_equal_the_padded_batch():
    hidden, weight, _, ids, labels = make_batch(3, 7, 8, 23, seed=1)
    lengths = [7, 4, 6]
    response_mask = labels != -100
    padded = sequence_logprobs(hidden, weight, ids, response_mask)
    cu = torch.tensor([0, 7, 11, 17])
    packed_hidden = torch.cat([hidden[b, :n] for b, n in enumerate(lengths)])
    packed_ids = torch.cat([ids[b, :n] for b, n in enumerate(lengths)])
    packed_mask = torch.cat([response_mask[b, :n] for b, n in enumerate(lengths)])
    packed = sequence_logprobs(packed_hidden[None], weight, packed_ids[None], packed_mask[None],
                               cu_seqlens=cu)
    # Truncating a sequence drops its tail, so compare against the eager sums of the kept prefix.
    for b, n in enumerate(lengths):
        token, _ = eager_token_logps(hidden[b:b + 1, :n], weight, labels[b:b + 1, :n])
        torch.testing.assert_close(packed.sum_logps[b], token.sum())
    assert packed.token_logps.shape == (17,)
    assert packed.sum_logps[0].item() == pytest.approx(padded.sum_logps[0].item(), rel=1e-12)


def test_a_sequence_without_response_tokens_gives_zero_not_nan():
    hidden, weight, _, ids, labels = make_batch(2, 5, 8, 11)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 3:] = True
    result = sequence_logprobs(hidden.requires_grad_(), weight, ids, mask)
    assert result.lengths.tolist() == [2, 0]
    assert result.sum_logps[1] == 0 and result.mean_logps[1] == 0
    result.mean_logps.sum().backward()
    assert torch.isfinite(hidden.grad).all() and (hidden.grad[1] == 0).all()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(input_ids=torch.zeros(2, 5)), TypeError, "input_ids must be an integer"),
    (dict(response_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "response_mask must"),
    (dict(cu_seqlens=torch.tensor([0, 3, 9])), ValueError, "cu_seqlens must start at 0"),
])
def test_bad_sequence_inputs_are_named(kwargs, error, match):
    hidden, weight, _, ids, labels = make_batch(2, 5, 8, 11)
    args = dict(input_ids=ids, response_mask=None)
    args.update(kwargs)
    if "cu_seqlens" in kwargs:
        hidden, args["input_ids"] = hidden.reshape(10, 8), ids.reshape(10)
    with pytest.raises(error, match=match):
        sequence_logprobs(hidden, weight, args.pop("input_ids"), args.pop("response_mask"),
                          **args)


# ---------------------------------------------------------------------------------------------
# Fused loss modules
# ---------------------------------------------------------------------------------------------


def _device_dtype(impl):
    # float64 on the C++ kernel (exact comparison), float32 through the Triton interpreter.
    return impl_device(impl), (torch.float64 if impl == "cpp" else torch.float32)


def _tolerances(dtype):
    return (1e-9, 1e-11) if dtype == torch.float64 else (2e-4, 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type,extra", [
    ("sigmoid", dict(label_smoothing=0.1)),
    ("ipo", {}),
    (["sigmoid", "sft"], dict(loss_weights=[1.0, 0.5])),
    ("apo_zero", {}),
], ids=["sigmoid-smoothed", "ipo", "sigmoid+sft", "apo_zero"])
def test_fused_dpo_equals_materialised_logits(impl, loss_type, extra):
    _require(impl)
    device, dtype = _device_dtype(impl)
    hidden, weight, bias, _, labels = make_batch(6, 8, 12, 29, dtype=dtype, device=device)
    ref_hidden = hidden + 0.3 * torch.randn_like(hidden)
    ref_weight = weight + 0.05 * torch.randn_like(weight)
    options = dict(beta=0.2, loss_type=loss_type, **extra)

    h1, w1, b1 = _leaves(hidden, weight, bias)
    fused = FusedDPOLoss(impl=impl, softcap=8.0, **options)
    loss, metrics = fused(h1, w1, labels, bias=b1, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          ref_bias=bias)

    h2, w2, b2 = _leaves(hidden, weight, bias)
    token, mask = eager_token_logps(h2, w2, labels, bias=b2, softcap=8.0)
    ref_token, _ = eager_token_logps(ref_hidden, ref_weight, labels, bias=bias, softcap=8.0)
    lengths = mask.sum(-1)
    chosen, rejected = token.sum(-1).chunk(2)
    ref_chosen, ref_rejected = ref_token.sum(-1).chunk(2)
    chosen_nll = -chosen.sum() / lengths[:3].sum()  # TRL's token mean over the chosen answers
    expected, expected_metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                          chosen_lengths=lengths[:3].clamp(min=1),
                                          rejected_lengths=lengths[3:].clamp(min=1),
                                          chosen_nll=chosen_nll, **options)
    rtol, atol = _tolerances(dtype)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=rtol, atol=atol)
    assert set(metrics) == set(expected_metrics)
    for name in metrics:
        torch.testing.assert_close(metrics[name].double(), expected_metrics[name].double(),
                                   rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    loss.backward()
    expected.backward()
    _assert_grads_close([h1, w1, b1], [h2, w2, b2], ["hidden", "weight", "bias"], rtol, atol)


def test_fused_dpo_with_precomputed_reference_logps():
    hidden, weight, _, _, labels = make_batch(4, 6, 8, 19)
    ref_chosen, ref_rejected = torch.randn(2, 2, dtype=torch.float64)
    loss, metrics = FusedDPOLoss(beta=0.5)(hidden, weight, labels, ref_chosen_logps=ref_chosen,
                                           ref_rejected_logps=ref_rejected)
    token, _ = eager_token_logps(hidden, weight, labels)
    chosen, rejected = token.sum(-1).chunk(2)
    expected, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", ["sigmoid", "sft"]], ids=str)
def test_fused_dpo_all_masked_sequences_are_finite(loss_type):
    hidden, weight, _, _, labels = make_batch(4, 6, 8, 19)
    labels[1] = -100  # a chosen answer without tokens
    labels[3] = -100  # a rejected answer without tokens
    hidden.requires_grad_()
    loss_fn = FusedDPOLoss(loss_type=loss_type)
    loss, metrics = loss_fn(hidden, weight, labels, ref_hidden=hidden, ref_weight=weight)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_fused_dpo_explains_missing_reference_and_odd_batches():
    hidden, weight, _, _, labels = make_batch(4, 6, 8, 19)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        FusedDPOLoss()(hidden, weight, labels)
    with pytest.raises(ValueError, match="odd batch"):
        FusedDPOLoss()(hidden[:3], weight, labels[:3], ref_hidden=hidden[:3], ref_weight=weight)
    with pytest.raises(ValueError, match="beta"):
        FusedDPOLoss(beta=0.0)(hidden, weight, labels, ref_hidden=hidden, ref_weight=weight)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("module,loss_fn,options,averaged", [
    (FusedSimPOLoss, simpo_loss, dict(beta=2.0, gamma=0.5, alpha=0.3), True),
    (FusedCPOLoss, cpo_loss, dict(beta=0.1, alpha=1.0, label_smoothing=0.1), False),
    (FusedORPOLoss, orpo_loss, dict(beta=0.2), True),
], ids=["simpo", "cpo", "orpo"])
def test_fused_reference_free_equals_materialised_logits(impl, module, loss_fn, options,
                                                         averaged):
    _require(impl)
    device, dtype = _device_dtype(impl)
    hidden, weight, bias, _, labels = make_batch(6, 8, 12, 29, dtype=dtype, device=device)
    h1, w1, b1 = _leaves(hidden, weight, bias)
    loss, metrics = module(impl=impl, temperature=0.9, **options)(h1, w1, labels, bias=b1)

    h2, w2, b2 = _leaves(hidden, weight, bias)
    token, mask = eager_token_logps(h2, w2, labels, bias=b2, temperature=0.9)
    sums, lengths = token.sum(-1), mask.sum(-1)
    per_sequence = sums / lengths if averaged else sums
    chosen_nll = -sums[:3].sum() / lengths[:3].sum()  # token mean over the chosen answers (TRL)
    expected, expected_metrics = loss_fn(*per_sequence.chunk(2), chosen_nll=chosen_nll, **options)
    rtol, atol = _tolerances(dtype)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=rtol, atol=atol)
    assert set(metrics) == set(expected_metrics)
    for name in metrics:
        torch.testing.assert_close(metrics[name].double(), expected_metrics[name].double(),
                                   rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    loss.backward()
    expected.backward()
    _assert_grads_close([h1, w1, b1], [h2, w2, b2], ["hidden", "weight", "bias"], rtol, atol)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_kto_equals_materialised_logits(impl):
    _require(impl)
    device, dtype = _device_dtype(impl)
    hidden, weight, _, _, labels = make_batch(5, 7, 10, 31, dtype=dtype, device=device)
    kl_hidden, _, _, _, kl_labels = make_batch(5, 7, 10, 31, dtype=dtype, device=device, seed=4)
    ref_weight = weight + 0.05 * torch.randn_like(weight)
    desirable = torch.tensor([True, False, True, True, False], device=device)

    h1, w1 = _leaves(hidden, weight)
    loss, metrics = FusedKTOLoss(beta=0.3, undesirable_weight=1.3, impl=impl)(
        h1, w1, labels, desirable, kl_hidden=kl_hidden, kl_labels=kl_labels, ref_hidden=hidden,
        ref_weight=ref_weight, ref_kl_hidden=kl_hidden)

    h2, w2 = _leaves(hidden, weight)
    policy = eager_token_logps(h2, w2, labels)[0].sum(-1)
    ref = eager_token_logps(hidden, ref_weight, labels)[0].sum(-1)
    policy_kl = eager_token_logps(kl_hidden, weight, kl_labels)[0].sum(-1)
    ref_kl = eager_token_logps(kl_hidden, ref_weight, kl_labels)[0].sum(-1)
    expected, expected_metrics = kto_loss(policy, ref, policy_kl, ref_kl, desirable, beta=0.3,
                                          undesirable_weight=1.3)
    rtol, atol = _tolerances(dtype)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=rtol, atol=atol)
    for name in expected_metrics:
        torch.testing.assert_close(metrics[name].double(), expected_metrics[name].double(),
                                   rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    loss.backward()
    expected.backward()
    _assert_grads_close([h1, w1], [h2, w2], ["hidden", "weight"], rtol, atol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["ppo", "grpo"])
def test_fused_ppo_equals_materialised_logits(impl, mode):
    _require(impl)
    device, dtype = _device_dtype(impl)
    hidden, weight, _, _, labels = make_batch(4, 9, 10, 27, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        token, mask = eager_token_logps(hidden, weight, labels)
    shape = token.shape

    def noise(scale):
        return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, dtype)

    old_logps = token.to(dtype) + noise(0.3)
    ref_logps = token.to(dtype) + noise(0.2)
    if mode == "grpo":
        advantages = torch.randn(4, generator=gen, dtype=torch.float64).to(device, dtype)
        options = dict(loss_agg="grpo", kl_coef=0.04, kl_estimator="k3", ent_coef=0.0)
        extra = {}
    else:
        advantages = noise(1.0)
        options = dict(dual_clip=3.0, kl_coef=0.1, kl_estimator="k1", ent_coef=0.01, vf_coef=0.5)
        values = noise(1.0).requires_grad_()
        extra = dict(values=values, old_values=values.detach() + noise(0.3), returns=noise(1.0))

    h1, w1 = _leaves(hidden, weight)
    loss, metrics = FusedPPOLoss(impl=impl, **options)(h1, w1, labels, old_logps, advantages,
                                                       ref_logps=ref_logps, **extra)

    h2, w2 = _leaves(hidden, weight)
    token, mask, entropy = eager_token_logps(h2, w2, labels, with_entropy=True)
    adv = advantages[:, None].expand(shape) if advantages.dim() == 1 else advantages
    agg = options.get("loss_agg", "token_mean")
    expected, _ = ppo_policy_loss(token, old_logps, adv, mask, dual_clip=options.get("dual_clip"),
                                  loss_agg=agg)
    from fastalign.losses.masked import aggregate_token_loss
    expected = expected + options["kl_coef"] * aggregate_token_loss(
        kl_penalty(token, ref_logps, estimator=options["kl_estimator"]), mask, mode=agg)
    if mode == "ppo":
        value_loss, _ = ppo_value_loss(extra["values"], extra["old_values"], extra["returns"],
                                       mask)
        expected = expected + 0.5 * value_loss - 0.01 * masked_mean(entropy, mask)
    rtol, atol = _tolerances(dtype)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=rtol, atol=atol)
    assert {"loss/policy", "loss/total", "kl", "clip_ratio/region_mean"} <= set(metrics)
    loss.backward()
    expected.backward()
    _assert_grads_close([h1, w1], [h2, w2], ["hidden", "weight"], rtol, atol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", [
    dict(loss_type="sapo", importance_sampling_level="sequence", use_bias_correction_kl=True),
    dict(loss_type="cispo", clip_high=1.5, use_bias_correction_kl=True),
    dict(loss_type="vespo", vespo_k_neg=1.0),
    dict(loss_type="luspo", importance_sampling_level="sequence",
         off_policy_mask_threshold=0.01),
    dict(loss_type="bnpo", top_entropy_quantile=0.4, ent_coef=0.05),
    dict(loss_agg="grpo", use_bias_correction_kl=True),  # PPO's surrogate, corrected KL
], ids=["sapo-seq-bias", "cispo-bias", "vespo", "luspo-offpolicy", "bnpo-entropy", "grpo-bias"])
def test_fused_grpo_variants_equal_grpo_loss_on_materialised_logits(impl, options):
    from fastalign.losses.grpo import grpo_loss, high_entropy_mask

    _require(impl)
    device, dtype = _device_dtype(impl)
    hidden, weight, _, _, labels = make_batch(5, 9, 10, 27, dtype=dtype, device=device, seed=3)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        token, mask = eager_token_logps(hidden, weight, labels)
    old_logps = token.to(dtype) + (0.3 * torch.randn(token.shape, generator=gen,
                                                     dtype=torch.float64)).to(device, dtype)
    ref_logps = token.to(dtype) + (0.2 * torch.randn(token.shape, generator=gen,
                                                     dtype=torch.float64)).to(device, dtype)
    advantages = torch.randn(5, generator=gen, dtype=torch.float64).to(device, dtype)
    h1, w1 = _leaves(hidden, weight)
    loss, metrics = FusedPPOLoss(impl=impl, kl_coef=0.1, kl_estimator="k3", vf_coef=0.0,
                                 **options)(h1, w1, labels, old_logps, advantages,
                                            ref_logps=ref_logps)

    h2, w2 = _leaves(hidden, weight)
    token, mask, entropy = eager_token_logps(h2, w2, labels, with_entropy=True)
    functional = {k: v for k, v in options.items() if k not in ("ent_coef", "loss_agg")}
    loss_type = options.get("loss_type", options.get("loss_agg"))
    functional["loss_type"] = loss_type
    expected, _ = grpo_loss(token, old_logps, ref_logps, advantages, mask, beta=0.1,
                            entropies=entropy, **functional)
    if "ent_coef" in options:
        kept = high_entropy_mask(entropy, mask, options["top_entropy_quantile"])
        expected = expected - options["ent_coef"] * masked_mean(entropy, kept)
    rtol, atol = _tolerances(dtype)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=rtol, atol=atol)
    loss.backward()
    expected.backward()
    _assert_grads_close([h1, w1], [h2, w2], ["hidden", "weight"], rtol, atol)


def test_fused_ppo_refuses_dual_clip_with_a_grpo_variant():
    with pytest.raises(ValueError, match="dual_clip"):
        FusedPPOLoss(dual_clip=2.0, loss_type="sapo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        FusedPPOLoss(importance_sampling_level="sentence")


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_ppo_with_the_exact_kl_equals_materialised_logits(impl):
    _require(impl)
    device, dtype = _device_dtype(impl)
    hidden, weight, bias, _, labels = make_batch(4, 9, 10, 27, dtype=dtype, device=device)
    ref_hidden = hidden + 0.3 * torch.randn_like(hidden)
    ref_weight = weight + 0.1 * torch.randn_like(weight)
    with torch.no_grad():
        token, mask = eager_token_logps(hidden, weight, labels, bias=bias)
    old_logps = token.to(dtype) + 0.2 * torch.randn_like(token).to(dtype)
    advantages = torch.randn(4, dtype=dtype, device=device)
    options = dict(loss_agg="grpo", kl_coef=0.1, kl_estimator="exact", softcap=6.0)

    h1, w1, b1 = _leaves(hidden, weight, bias)
    loss, metrics = FusedPPOLoss(impl=impl, **options)(
        h1, w1, labels, old_logps, advantages, bias=b1, ref_hidden=ref_hidden,
        ref_weight=ref_weight, ref_bias=bias)

    h2, w2, b2 = _leaves(hidden, weight, bias)
    token, mask = eager_token_logps(h2, w2, labels, bias=b2, softcap=6.0)

    def log_probs(h, w, b):
        logits = (h.double() @ w.double().T + b.double())[:, :-1]
        return torch.log_softmax(6.0 * torch.tanh(logits / 6.0), -1)

    log_p, log_q = log_probs(h2, w2, b2), log_probs(ref_hidden, ref_weight, bias)
    exact_kl = (log_p.exp() * (log_p - log_q)).sum(-1) * mask
    from fastalign.losses.masked import aggregate_token_loss
    expected, _ = ppo_policy_loss(token, old_logps, advantages[:, None].expand(token.shape), mask,
                                  loss_agg="grpo")
    expected = expected + 0.1 * aggregate_token_loss(exact_kl, mask, mode="grpo")
    rtol, atol = _tolerances(dtype)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(metrics["kl"].double(), masked_mean(exact_kl, mask).detach(),
                               rtol=rtol, atol=atol)
    loss.backward()
    expected.backward()
    _assert_grads_close([h1, w1, b1], [h2, w2, b2], ["hidden", "weight", "bias"], rtol, atol)


def test_fused_ppo_refuses_unknown_options_at_construction():
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        FusedPPOLoss(kl_estimator="k5")
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        FusedPPOLoss(loss_agg="sum")


def test_fused_ppo_explains_a_missing_reference():
    hidden, weight, _, _, labels = make_batch(2, 5, 8, 13)
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="kl_estimator='exact' needs ref_hidden"):
        FusedPPOLoss(kl_coef=0.1, kl_estimator="exact")(hidden, weight, labels, zeros, zeros)
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logps"):
        FusedPPOLoss(kl_coef=0.1)(hidden, weight, labels, zeros, zeros)


def test_fused_ppo_all_masked_batch_is_finite():
    hidden, weight, _, _, labels = make_batch(2, 5, 8, 13)
    labels[:] = -100
    hidden.requires_grad_()
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    loss, metrics = FusedPPOLoss(ent_coef=0.1)(hidden, weight, labels, zeros, zeros,
                                               ref_logps=zeros)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


# ---------------------------------------------------------------------------------------------
# TRPO step check with the exact fused KL
# ---------------------------------------------------------------------------------------------


def test_trpo_line_search_with_the_exact_fused_kl():
    """A gradient step on a policy head, kept within a KL trust region measured by linear_kl."""
    from fastalign import kl_line_search, linear_kl

    hidden, weight, _, _, labels = make_batch(3, 8, 12, 40, dtype=torch.float32)
    old_weight = weight.clone()
    mask = next_token_targets(labels) != -100
    weight.requires_grad_()
    logps = fastalign.linear_logprobs(hidden, weight, next_token_targets(labels))
    (-(logps * mask).sum()).backward()
    step = [-10.0 * weight.grad]  # deliberately too long: the first tries must be rejected

    def mean_kl():  # KL(π_old ‖ π_new) over the response tokens, exact over the vocabulary
        kl = linear_kl(hidden, old_weight, hidden, weight.detach(), mask=mask)
        return kl.sum() / mask.sum()

    def surrogate():
        return fastalign.linear_logprobs(hidden, weight.detach(),
                                         next_token_targets(labels)).sum()

    result = kl_line_search([weight], step, mean_kl, max_kl=0.01, surrogate_fn=surrogate)
    assert result.accepted and result.n_backtracks > 0 and result.kl <= 0.01
    assert mean_kl().item() == pytest.approx(result.kl, rel=1e-6)
    torch.testing.assert_close(weight.detach(), old_weight + result.step_fraction * step[0])
    # The exact KL agrees with the materialised one.
    with torch.no_grad():
        log_p = torch.log_softmax(hidden @ old_weight.T, -1)
        log_q = torch.log_softmax(hidden @ weight.T, -1)
        eager = ((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum() / mask.sum()
    assert mean_kl().item() == pytest.approx(eager.item(), rel=1e-4, abs=1e-7)
