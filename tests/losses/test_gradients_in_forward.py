"""The fused loss modules with their head gradients formed in forward (fastalign.ops.sequence_loss).

Each module's default (``gradients_in_forward=True``) must give the values, metrics and gradients
of its streamed path (``gradients_in_forward=False``: ``linear_logprobs`` then autograd, itself
checked against materialised logits in test_sequence_and_fused.py), with one chunk and with one
group per chunk, for every implementation of the row passes; losses that are not separable over
groups must take the streamed path; backward must scale by the upstream gradient.
"""

import pytest
import torch
from helpers import impl_device, impl_is_available
from test_sequence_and_fused import _leaves, eager_token_logps, make_batch

import fastalign
import fastalign.fused as fused_module
from fastalign.bench.memory import cpu_peak_supported, measure_peak_memory
from fastalign.fused import (
    FusedCPOLoss,
    FusedDPOLoss,
    FusedKTOLoss,
    FusedORPOLoss,
    FusedPPOLoss,
    FusedSimPOLoss,
)
from fastalign.losses.dpo import dpo_loss
from fastalign.ops.sequence_loss import pair_groups, sequence_loss_with_head_grads

IMPLS = ("cpp", "triton")
ONE_GROUP_PER_CHUNK = "1e-6"  # MiB: below one group's tile, so every chunk holds one group


def _require(impl):
    if not impl_is_available(impl):
        pytest.skip(f"{impl} is not available here: {fastalign.available_implementations()}")


def _device_dtype(impl):
    # float64 on the C++ kernel and in PyTorch (exact comparison), float32 through Triton.
    return impl_device(impl), (torch.float32 if impl == "triton" else torch.float64)


def _tolerances(dtype):
    return (1e-9, 1e-11) if dtype == torch.float64 else (2e-4, 2e-5)


@pytest.fixture(params=["one-chunk", "group-per-chunk"])
def chunking(request, monkeypatch):
    if request.param == "group-per-chunk":
        monkeypatch.setenv("FASTALIGN_BACKWARD_WORKSPACE_MIB", ONE_GROUP_PER_CHUNK)
    return request.param


def _run(module, head, args, kwargs, upstream):
    """(loss, metrics, gradients of the head) of ``upstream · loss``."""
    leaves = _leaves(*head)
    named = dict(zip(("hidden", "weight", "bias"), leaves))
    hidden, weight = named["hidden"], named["weight"]
    if "bias" in named:
        kwargs = {**kwargs, "bias": named["bias"]}
    loss, metrics = module(hidden, weight, *args, **kwargs)
    (upstream * loss).backward()
    return loss.detach(), metrics, [leaf.grad for leaf in leaves]


def _assert_same(fused, streamed, dtype):
    rtol, atol = _tolerances(dtype)
    (loss, metrics, grads), (loss2, metrics2, grads2) = fused, streamed
    torch.testing.assert_close(loss, loss2, rtol=rtol, atol=atol)
    assert set(metrics) == set(metrics2)
    for name in metrics:
        torch.testing.assert_close(metrics[name], metrics2[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name, a, b in zip(("hidden", "weight", "bias"), grads, grads2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


def _compare(make_module, head, args, kwargs, dtype, upstream=1.7):
    """The module with gradients in forward (the engine must run) against its streamed path."""
    calls = []
    engine = fused_module.sequence_loss_with_head_grads

    def counted(*a, **k):
        calls.append(1)
        return engine(*a, **k)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_module, "sequence_loss_with_head_grads", counted)
        fused = _run(make_module(gradients_in_forward=True), head, args, kwargs, upstream)
    assert calls, "the gradients were not formed in forward"
    streamed = _run(make_module(gradients_in_forward=False), head, args, kwargs, upstream)
    _assert_same(fused, streamed, dtype)


def _reference_head(hidden, weight):
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(hidden.shape, generator=gen, dtype=torch.float64)
    return (hidden + (0.3 * noise).to(hidden)).detach(), (weight * 1.05).detach()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", [
    dict(loss_type="sigmoid", label_smoothing=0.1),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(loss_type="ipo"),
    dict(loss_type="bco_pair", use_weighting=True),
    dict(loss_type="apo_zero", ld_alpha=0.5),
    dict(loss_type="sigmoid_norm", f_divergence_type="js_divergence"),
], ids=["sigmoid-smoothed", "sigmoid+sft", "ipo", "bco-wpo", "apo_zero-ld", "norm-js"])
def test_fused_dpo_forms_the_streamed_gradients(impl, options, chunking):
    _require(impl)
    device, dtype = _device_dtype(impl)
    hidden, weight, bias, _, labels = make_batch(6, 9, 12, 29, dtype=dtype, device=device)
    ref_hidden, ref_weight = _reference_head(hidden, weight)

    def make(**kw):
        return FusedDPOLoss(beta=0.2, impl=impl, softcap=6.0, temperature=0.8, **options, **kw)

    _compare(make, (hidden, weight, bias), (labels,),
             dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=bias), dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("module,options", [
    (FusedSimPOLoss, dict(beta=2.0, gamma=0.5, alpha=0.3)),
    (FusedCPOLoss, dict(beta=0.1, alpha=1.0, loss_type="hinge")),
    (FusedORPOLoss, dict(beta=0.1)),
], ids=["simpo", "cpo-hinge", "orpo"])
def test_fused_reference_free_losses_form_the_streamed_gradients(impl, module, options,
                                                                 chunking):
    _require(impl)
    device, dtype = _device_dtype(impl)
    hidden, weight, bias, _, labels = make_batch(4, 8, 10, 23, dtype=dtype, device=device)
    _compare(lambda **kw: module(impl=impl, **options, **kw), (hidden, weight, bias), (labels,),
             {}, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_fused_kto_forms_the_streamed_gradients(impl, loss_type, chunking):
    _require(impl)
    device, dtype = _device_dtype(impl)
    hidden, weight, _, _, labels = make_batch(5, 7, 10, 31, dtype=dtype, device=device)
    ref_hidden, ref_weight = _reference_head(hidden, weight)
    desirable = torch.tensor([True, False, True, True, False], device=device)
    kwargs = dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
    if loss_type == "kto":
        kl_hidden, _, _, _, kl_labels = make_batch(5, 7, 10, 31, dtype=dtype, device=device,
                                                   seed=4)
        kwargs.update(kl_hidden=kl_hidden, kl_labels=kl_labels, ref_kl_hidden=kl_hidden * 1.1)
    _compare(lambda **kw: FusedKTOLoss(beta=0.3, undesirable_weight=1.3, loss_type=loss_type,
                                       impl=impl, **kw),
             (hidden, weight), (labels, desirable), kwargs, dtype)


def _ppo_inputs(dtype, device, batch=4):
    hidden, weight, _, _, labels = make_batch(batch, 9, 10, 27, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        token, _ = eager_token_logps(hidden, weight, labels)

    def noise(scale):
        return (scale * torch.randn(token.shape, generator=gen, dtype=torch.float64)).to(device,
                                                                                       dtype)

    old_logps, ref_logps = token.to(dtype) + noise(0.3), token.to(dtype) + noise(0.2)
    advantages = torch.randn(batch, generator=gen, dtype=torch.float64).to(device, dtype)
    return hidden, weight, labels, old_logps, ref_logps, advantages, noise


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", [
    dict(dual_clip=3.0, kl_coef=0.1, kl_estimator="k1", ent_coef=0.01),
    dict(loss_agg="grpo", kl_coef=0.04, kl_estimator="k3", use_bias_correction_kl=True),
    dict(loss_type="sapo", importance_sampling_level="sequence", kl_coef=0.1),
    dict(loss_type="luspo", importance_sampling_level="sequence",
         off_policy_mask_threshold=0.01, ent_coef=0.02),
    dict(loss_type="dapo", kl_coef=0.1, kl_estimator="k2"),
], ids=["ppo-entropy", "grpo-bias", "gspo-sapo", "luspo-offpolicy", "dapo"])
def test_fused_ppo_forms_the_streamed_gradients(impl, options, chunking):
    _require(impl)
    device, dtype = _device_dtype(impl)
    hidden, weight, labels, old_logps, ref_logps, advantages, noise = _ppo_inputs(dtype, device)
    values = noise(1.0)
    kwargs = dict(ref_logps=ref_logps, values=values, old_values=values + noise(0.3),
                  returns=noise(1.0))
    _compare(lambda **kw: FusedPPOLoss(impl=impl, vf_coef=0.5, **options, **kw),
             (hidden, weight), (labels, old_logps, advantages), kwargs, dtype)


def test_the_value_loss_still_reaches_the_value_head():
    device, dtype = _device_dtype("cpp" if impl_is_available("cpp") else "triton")
    hidden, weight, labels, old_logps, ref_logps, advantages, noise = _ppo_inputs(dtype, device)
    values = noise(1.0).requires_grad_()
    loss, metrics = FusedPPOLoss(vf_coef=0.5)(
        hidden.requires_grad_(), weight, labels, old_logps, advantages, values=values,
        old_values=values.detach() + noise(0.3), returns=noise(1.0))
    loss.backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    assert hidden.grad is not None and "loss/value" in metrics


@pytest.mark.parametrize("make,args_of", [
    (lambda: FusedDPOLoss(loss_type="aot"), "dpo"),
    (lambda: FusedDPOLoss(loss_type=["sigmoid", "sft"], use_weighting=True), "dpo"),
    (lambda: FusedPPOLoss(loss_type="bnpo", top_entropy_quantile=0.4, ent_coef=0.05), "ppo"),
], ids=["aot-sorts-the-batch", "wpo-weighs-the-batch-nll", "entropy-quantile-of-the-batch"])
def test_losses_coupling_the_batch_take_the_streamed_path(make, args_of, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a loss coupling the batch must not form gradients in forward")

    monkeypatch.setattr(fused_module, "sequence_loss_with_head_grads", refuse)
    if args_of == "dpo":
        hidden, weight, _, _, labels = make_batch(4, 8, 10, 23)
        ref_hidden, ref_weight = _reference_head(hidden, weight)
        loss, _ = make()(hidden.requires_grad_(), weight, labels, ref_hidden=ref_hidden,
                         ref_weight=ref_weight)
    else:
        hidden, weight, labels, old_logps, ref_logps, advantages, _ = _ppo_inputs(
            torch.float64, "cpu")
        loss, _ = make()(hidden.requires_grad_(), weight, labels, old_logps, advantages)
    loss.backward()
    assert hidden.grad is not None


def test_no_gradients_no_work_in_forward(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("without gradients only the forward pass must run")

    monkeypatch.setattr(fused_module, "sequence_loss_with_head_grads", refuse)
    hidden, weight, _, _, labels = make_batch(4, 8, 10, 23)
    ref_hidden, ref_weight = _reference_head(hidden, weight)
    FusedDPOLoss()(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    with torch.no_grad():
        FusedDPOLoss()(hidden.requires_grad_(), weight, labels, ref_hidden=ref_hidden,
                       ref_weight=ref_weight)
    # A precomputed reference that requires grad: its gradient comes from the streamed path.
    ref_logps = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    loss, _ = FusedDPOLoss()(hidden, weight, labels, ref_chosen_logps=ref_logps,
                             ref_rejected_logps=ref_logps - 1.0)
    loss.backward()
    assert ref_logps.grad is not None


@pytest.mark.parametrize("impl", ("torch", *IMPLS))
def test_the_engine_scales_by_the_upstream_gradient_and_accumulates(impl, monkeypatch):
    """Gradient accumulation: two micro-batches' backward passes add into .grad, each scaled
    by its upstream gradient (a loss weight), as through autograd."""
    if impl != "torch":
        _require(impl)
    device, dtype = _device_dtype(impl)
    monkeypatch.setenv("FASTALIGN_BACKWARD_WORKSPACE_MIB", ONE_GROUP_PER_CHUNK)
    batches = [make_batch(4, 8, 10, 23, dtype=dtype, device=device, seed=s) for s in (1, 2)]
    weight = batches[0][1].detach().clone().requires_grad_()
    eager_weight = weight.detach().clone().requires_grad_()
    for (hidden, _, _, _, labels), scale in zip(batches, (0.25, -1.5)):
        ref_chosen, ref_rejected = torch.randn(4, dtype=dtype, device=device).chunk(2)

        def loss_of(policy, ref_chosen=ref_chosen, ref_rejected=ref_rejected):
            chosen, rejected = policy.sum_logps.chunk(2)
            return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)

        loss, metrics, sequences = sequence_loss_with_head_grads(
            hidden, weight, labels, loss_of, groups=pair_groups(4, device), impl=impl)
        (scale * loss).backward()
        token, mask = eager_token_logps(hidden, eager_weight, labels)
        expected, expected_metrics = loss_of(type("S", (), {"sum_logps": token.sum(-1)})())
        (scale * expected).backward()
        rtol, atol = _tolerances(dtype)
        torch.testing.assert_close(loss.double(), expected.double(), rtol=rtol, atol=atol)
        torch.testing.assert_close(sequences.token_logps.double(), token.double(), rtol=rtol,
                                   atol=atol)
        assert sequences.token_logps.grad_fn is None  # detached: the gradient went to the head
    torch.testing.assert_close(weight.grad.double(), eager_weight.grad.double(), rtol=rtol,
                               atol=atol)


def test_the_engine_checks_its_groups():
    hidden, weight, _, _, labels = make_batch(4, 8, 10, 23)
    with pytest.raises(ValueError, match="groups must be"):
        sequence_loss_with_head_grads(hidden, weight.requires_grad_(), labels,
                                      lambda s: (s.sum_logps.sum(), {}),
                                      groups=torch.arange(3)[:, None])


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_gradients_are_as_close_to_float32_as_eager_bfloat16(impl):
    """bf16 inputs, float32 accumulation: judged against the float32 computation, relative to
    the error of PyTorch's own bf16 path (materialised bf16 logits, then float32 softmax)."""
    _require(impl)
    device = impl_device(impl)
    hidden, weight, bias, _, labels = make_batch(6, 12, 16, 61, dtype=torch.float32,
                                                 device=device)
    ref_hidden, ref_weight = _reference_head(hidden, weight)
    module = FusedDPOLoss(beta=0.5, impl=impl)

    def eager_sums(h, w):  # logits in the input dtype, softmax in float32, as eager PyTorch
        log_probs = torch.log_softmax((h @ w.T).float(), -1)[:, :-1]
        targets = labels[:, 1:]
        token = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return (token * (targets != -100)).sum(-1)

    def grads(h, w, use_module=True):
        h, w = _leaves(h, w)
        if use_module:
            loss, _ = module(h, w, labels, ref_hidden=ref_hidden.to(h.dtype),
                             ref_weight=ref_weight.to(w.dtype))
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected = eager_sums(ref_hidden.to(h.dtype),
                                                      ref_weight.to(w.dtype)).chunk(2)
            chosen, rejected = eager_sums(h, w).chunk(2)
            loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
        loss.backward()
        return h.grad.double(), w.grad.double()

    truth = grads(hidden, weight)
    fused = grads(hidden.bfloat16(), weight.bfloat16())
    eager = grads(hidden.bfloat16(), weight.bfloat16(), use_module=False)
    for got, baseline, want in zip(fused, eager, truth):
        error = (got - want).norm() / want.norm()
        eager_error = (baseline - want).norm() / want.norm()
        assert error <= 3 * eager_error + 1e-3, (float(error), float(eager_error))


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")
@pytest.mark.skipif(not impl_is_available("cpp"), reason="C++ extension not built")
def test_a_dpo_step_holds_at_most_one_pairs_logits():
    """8 pairs × 256 tokens at V = 32768: eager's float32 logits are 512 MiB for the policy
    alone; the fused step's workspace is one pair's scored tokens (at most 2·256·V·4 = 64 MiB)
    plus the gradients formed in forward (dh 2 MiB, dW 8 MiB) and the float32 head copy."""
    pairs, length, hidden_size, vocab = 8, 256, 64, 32768
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) / 8).requires_grad_()
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    labels[:, :32] = -100
    ref_hidden = hidden.detach() + 0.1
    module = FusedDPOLoss(impl="cpp")

    def step():
        loss, _ = module(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=weight)
        loss.backward()
        return loss.detach()

    # Warm-up on two short pairs: the code this process has not run yet (libtorch's pages,
    # oneDNN's kernels) is loaded outside the measurement; the step below is still the first at
    # its shapes.
    short = hidden[:4, :40].detach().clone().requires_grad_()
    module(short, weight, labels[:4, :40], ref_hidden=ref_hidden[:4, :40],
           ref_weight=weight)[0].backward()
    weight.grad = None
    loss, peak = measure_peak_memory(step, "cpu")
    one_pair = 2 * length * vocab * 4
    eager_logits = 2 * pairs * length * vocab * 4
    assert torch.isfinite(loss) and weight.grad is not None
    assert peak < one_pair + 24 * 2**20, (
        f"peak rose by {peak / 2**20:.0f} MiB; one pair's logits are {one_pair / 2**20:.0f} MiB, "
        f"eager's {eager_logits / 2**20:.0f} MiB")


def test_a_second_backward_is_refused_not_scaled_twice():
    """The gradients formed in forward are scaled in place and handed over (no second dW at
    the peak): retain_graph=True and a second backward must fail clearly."""
    hidden, weight, _, _, labels = make_batch(4, 8, 10, 23)
    ref_hidden, ref_weight = _reference_head(hidden, weight)
    hidden.requires_grad_()
    loss, _ = FusedDPOLoss()(
        hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    nll = fastalign.linear_nll(hidden.reshape(-1, 10), weight, labels.reshape(-1))
    nll.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        nll.backward()
