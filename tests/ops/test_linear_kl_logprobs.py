"""linear_kl with the policy's targets: KL, log-prob and entropy of the same tokens from one pass.

Ground truth: the three materialised in float64 (``_materialised`` below), under random upstream
gradients of all three outputs at once. float32 must agree to 1e-5 relative to each tensor's
scale; bfloat16 is judged relative to PyTorch's own error at that dtype, as in test_linear_kl.
FusedPPOLoss(kl_estimator="exact") streams the policy head once through it and equals the
two-pass composition (linear_logprobs, then linear_kl).
"""

import pytest
import torch
from helpers import (
    FUSED_IMPLS,
    assert_close_fp32,
    assert_low_precision_ok,
    impl_device,
    impl_is_available,
    tiled,
)
from test_linear_kl import make_kl_inputs

import fastalign
from fastalign import fused, linear_kl, linear_logprobs

ALL_IMPLS = (*FUSED_IMPLS, "reference")


def _require(impl):
    if not impl_is_available(impl):
        pytest.skip(f"{impl} is not available here: {fastalign.available_implementations()}")


def _materialised(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None, ref_bias=None,
                  mask=None, temperature=1.0, softcap=None, ignore_index=-100,
                  softmax_dtype=torch.float64):
    """(kl, logp, entropy) through the [N, V] logits: the matmuls at the inputs' dtype, the
    softmaxes in ``softmax_dtype``."""
    def log_softmax(h, w, b):
        a = h @ w.T
        a = (a + b if b is not None else a).to(softmax_dtype)
        if softcap is not None:
            a = softcap * torch.tanh(a / softcap)
        return torch.log_softmax(a / temperature, -1)

    log_p = log_softmax(hidden, weight, bias)
    log_q = log_softmax(ref_hidden, ref_weight, ref_bias)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    scored = targets != ignore_index
    if mask is not None:
        kl = torch.where(mask, kl, 0.0)
        scored = scored & mask
    logp = log_p.gather(-1, torch.where(scored, targets, 0)[..., None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return kl, torch.where(scored, logp, 0.0), torch.where(scored, entropy, 0.0)


def make_targets(lead_shape, vocab_size, *, ignore_index=-100, ignore_fraction=0.25, seed=1,
                 device="cpu"):
    """Random targets with 0 and V − 1 among them and a fraction ignored."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab_size, lead_shape, generator=gen).view(-1)
    targets[0], targets[-1] = 0, vocab_size - 1
    ignored = torch.rand(targets.shape, generator=gen) < ignore_fraction
    ignored[:2] = False
    targets[ignored] = ignore_index
    return targets.view(lead_shape).to(device)


def run_scored(tensors, mask, targets, upstreams, *, impl=None, upcast=None, options=None,
               eager=False, return_entropy=True):
    """Forward + backward of (kl, logp, entropy) under ``upstreams`` (three tensors);
    ``impl=None`` is the float64 materialised truth (inputs in ``upcast``), ``eager`` the
    materialised computation at the inputs' dtype with float32 softmaxes."""
    options = dict(options or {})
    leaves = {name: (t.detach().to(upcast) if upcast else t.detach().clone()).requires_grad_(
        not name.startswith("ref_")) for name, t in tensors.items() if t is not None}
    args = (leaves["hidden"], leaves["weight"], leaves["ref_hidden"], leaves["ref_weight"])
    kwargs = dict(bias=leaves.get("bias"), ref_bias=leaves.get("ref_bias"), mask=mask,
                  **options)
    if impl is None:
        outputs = _materialised(*args, targets, softmax_dtype=torch.float32 if eager
                                else torch.float64, **kwargs)
        outputs = outputs if return_entropy else outputs[:2]
    else:
        outputs = linear_kl(*args, impl=impl, targets=targets, return_entropy=return_entropy,
                            **kwargs)
    loss = sum((out * up.to(out.dtype)).sum() for out, up in zip(outputs, upstreams))
    loss.backward()
    grads = {name: leaf.grad for name, leaf in leaves.items() if leaf.requires_grad}
    return [out.detach() for out in outputs], grads


def _upstreams(shape, device, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device) for _ in range(3)]


# (id, leading shape, H, V, input options, op options)
CASES = [
    ("round", (32,), 32, 256, {}, {}),
    ("awkward-3d", (3, 7), 31, 123, {"bias": True}, {}),
    ("vocab-prime-biases", (9,), 24, 997, {"bias": True, "ref_bias": True}, {}),
    ("ref-hidden-size", (7,), 16, 200, {"ref_hidden_size": 40}, {}),
    ("softcap-temp-bias", (2, 5), 20, 130, {"bias": True, "logit_scale": 40.0},
     {"softcap": 30.0, "temperature": 0.7}),
    ("masked-ignore-index", (4, 6), 24, 150, {"mask_fraction": 0.4}, {"ignore_index": 0}),
    ("peaked", (8,), 32, 120, {"logit_scale": 50.0}, {}),
]
CASE_IDS = [case[0] for case in CASES]
NAMES = ("kl", "logp", "entropy")


def _case(case, dtype, device):
    _, shape, hidden_size, vocab_size, input_options, options = case
    tensors, mask, _ = make_kl_inputs(shape, hidden_size, vocab_size, dtype=dtype,
                                      device=device, **input_options)
    targets = make_targets(shape, vocab_size, ignore_index=options.get("ignore_index", -100),
                           device=device)
    return tensors, mask, targets, _upstreams(shape, device), options


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_values_and_gradients_match_the_materialised_truth(impl, case):
    _require(impl)
    tensors, mask, targets, upstreams, options = _case(case, torch.float32, impl_device(impl))
    outputs, grads = run_scored(tensors, mask, targets, upstreams, impl=impl, options=options)
    truth, truth_grads = run_scored(tensors, mask, targets, upstreams, upcast=torch.float64,
                                    options=options)
    for name, ours, expected in zip(NAMES, outputs, truth):
        assert ours.dtype == torch.float32 and ours.shape == targets.shape, name
        assert_close_fp32(ours, expected, name)
    assert set(grads) == set(truth_grads)
    for name, grad in truth_grads.items():
        assert grads[name].dtype == torch.float32
        assert_close_fp32(grads[name], grad, f"d{name}")


@pytest.mark.parametrize("strategy", ["chunked", "atomic"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=[CASES[1][0], CASES[4][0]])
def test_both_triton_backward_strategies(monkeypatch, strategy, case):
    """A workspace of a few rows, so that the chunked backward crosses chunk boundaries."""
    _require("triton")
    monkeypatch.setenv("FASTALIGN_TRITON_BACKWARD", strategy)
    monkeypatch.setenv("FASTALIGN_BACKWARD_WORKSPACE_MIB", repr(4 * 256 * 4 / 2**20))
    tensors, mask, targets, upstreams, options = _case(case, torch.float32,
                                                       impl_device("triton"))
    _, grads = run_scored(tensors, mask, targets, upstreams, impl="triton", options=options)
    _, truth_grads = run_scored(tensors, mask, targets, upstreams, upcast=torch.float64,
                                options=options)
    for name, grad in truth_grads.items():
        assert_close_fp32(grads[name], grad, f"d{name}")


@pytest.mark.parametrize("schedule", ["owned", "shared"])
@pytest.mark.parametrize("case", [CASES[2], CASES[5]], ids=[CASES[2][0], CASES[5][0]])
def test_cpp_across_vocabulary_blocks_and_threads(schedule, case):
    """Small blocks: each row's statistics (and its target logit) merge over many vocabulary
    blocks, and, in the shared schedule, over the threads' slots."""
    _require("cpp")
    tensors, mask, targets, upstreams, options = _case(case, torch.float32, "cpu")
    tiling = {"FASTALIGN_CPU_SCHEDULE": schedule, "FASTALIGN_CPU_BLOCK_N": 3,
              "FASTALIGN_CPU_BLOCK_V": 13, "threads": 2}
    with tiled(tiling):
        outputs, grads = run_scored(tensors, mask, targets, upstreams, impl="cpp",
                                    options=options)
    truth, truth_grads = run_scored(tensors, mask, targets, upstreams, upcast=torch.float64,
                                    options=options)
    for name, ours, expected in zip(NAMES, outputs, truth):
        assert_close_fp32(ours, expected, name)
    for name, grad in truth_grads.items():
        assert_close_fp32(grads[name], grad, f"d{name}")


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=[CASES[1][0], CASES[4][0]])
def test_bfloat16_within_pytorchs_own_error(impl, case):
    _require(impl)
    tensors, mask, targets, upstreams, options = _case(case, torch.bfloat16, impl_device(impl))
    outputs, grads = run_scored(tensors, mask, targets, upstreams, impl=impl, options=options)
    eager, eager_grads = run_scored(tensors, mask, targets, upstreams, options=options,
                                    eager=True)
    truth, truth_grads = run_scored(tensors, mask, targets, upstreams, upcast=torch.float64,
                                    options=options)
    for name, ours, theirs, expected in zip(NAMES, outputs, eager, truth):
        assert ours.dtype == torch.float32, name
        assert_low_precision_ok(ours, theirs, expected, name)
    # The gradients sum three terms per logit before the one bfloat16 rounding of ∂L/∂a that the
    # chunked backward stores, as the two-pass composition (linear_logprobs + linear_kl) does:
    # on softcap-temp-bias both give 2.1× eager's dbias error, hence a factor of 3 here.
    for name, grad in truth_grads.items():
        assert grads[name].dtype == torch.bfloat16
        assert_low_precision_ok(grads[name], eager_grads[name], grad, f"d{name}", factor=3.0)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_without_entropy_and_without_a_kl_gradient(impl):
    """(kl, logp) only, and a loss of logp alone: the gradient of logp through the same op."""
    _require(impl)
    tensors, mask, targets, upstreams, options = _case(CASES[1], torch.float32,
                                                       impl_device(impl))
    upstreams[0] = torch.zeros_like(upstreams[0])
    outputs, grads = run_scored(tensors, mask, targets, upstreams, impl=impl,
                                return_entropy=False)
    truth, truth_grads = run_scored(tensors, mask, targets, upstreams, upcast=torch.float64,
                                    return_entropy=False)
    assert len(outputs) == 2
    for name, ours, expected in zip(NAMES, outputs, truth):
        assert_close_fp32(ours, expected, name)
    for name, grad in truth_grads.items():
        assert_close_fp32(grads[name], grad, f"d{name}")


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_logp_and_entropy_equal_linear_logprobs(impl):
    """The same numbers as the op that streams the policy head alone."""
    _require(impl)
    tensors, mask, targets, _, options = _case(CASES[4], torch.float32, impl_device(impl))
    _, logp, entropy = linear_kl(tensors["hidden"], tensors["weight"], tensors["ref_hidden"],
                                 tensors["ref_weight"], bias=tensors["bias"], targets=targets,
                                 return_entropy=True, impl=impl, **options)
    alone = linear_logprobs(tensors["hidden"], tensors["weight"], targets, bias=tensors["bias"],
                            return_entropy=True, impl=impl, **options)
    assert_close_fp32(logp, alone[0], "logp")
    assert_close_fp32(entropy, alone[1], "entropy")


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_float64_gradcheck(impl):
    _require(impl)
    tensors, mask, _ = make_kl_inputs((2, 3), 5, 11, dtype=torch.float64, bias=True,
                                      mask_fraction=0.3, seed=3)
    targets = make_targets((2, 3), 11)
    names = ["hidden", "weight", "bias"]
    leaves = [tensors[n].clone().requires_grad_() for n in names]

    def fn(h, w, b):
        return linear_kl(h, w, tensors["ref_hidden"], tensors["ref_weight"], bias=b, mask=mask,
                         targets=targets, return_entropy=True, impl=impl, softcap=5.0,
                         temperature=0.8)

    assert all(out.dtype == torch.float64 for out in fn(*leaves))
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)


def test_bad_options_are_named():
    tensors, _, _ = make_kl_inputs((4,), 8, 20)
    heads = (tensors["hidden"], tensors["weight"], tensors["ref_hidden"], tensors["ref_weight"])
    targets = make_targets((4,), 20)
    with pytest.raises(ValueError, match="return_entropy=True needs targets"):
        linear_kl(*heads, return_entropy=True)
    with pytest.raises(ValueError, match="reverse=True"):
        linear_kl(*heads, targets=targets, reverse=True)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V\)"):
        linear_kl(*heads, targets=torch.full((4,), 20))
    with pytest.raises(ValueError, match="targets must have the leading shape"):
        linear_kl(*heads, targets=targets[:3])


# ----------------------------------------------------------------------------------------------
# FusedPPOLoss: one pass over the policy head
# ----------------------------------------------------------------------------------------------


def _two_pass_linear_kl(hidden, weight, ref_hidden, ref_weight, *, targets=None,
                        return_entropy=False, mask=None, bias=None, ignore_index=-100,
                        **options):
    """What FusedPPOLoss computed before the one pass: linear_logprobs streams the policy head
    for log-probs and entropies, linear_kl streams it again for the KL."""
    kl = linear_kl(hidden, weight, ref_hidden, ref_weight, mask=mask, bias=bias, **options)
    options.pop("ref_bias", None)
    scored = torch.where(mask, targets, ignore_index)
    logp, entropy = linear_logprobs(hidden, weight, scored, bias=bias, return_entropy=True,
                                    ignore_index=ignore_index, **options)
    return (kl, logp, entropy) if return_entropy else (kl, logp)


def _ppo_batch(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, length, hidden_size, vocab = 3, 9, 24, 51
    hidden = torch.randn(batch, length, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.5
    bias = torch.randn(vocab, generator=gen)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[:, :3] = -100                 # prompts
    labels[1, 7:] = -100                 # padding
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=gen)
    ref_weight = weight + 0.1 * torch.randn(weight.shape, generator=gen)
    old_logps = -3.0 + 0.2 * torch.randn(batch, length - 1, generator=gen)
    advantages = torch.randn(batch, generator=gen)
    to = dict(device=device, dtype=dtype)
    return dict(hidden=hidden.to(**to), weight=weight.to(**to), bias=bias.to(**to),
                labels=labels.to(device), ref_hidden=ref_hidden.to(**to),
                ref_weight=ref_weight.to(**to), old_logps=old_logps.to(device),
                advantages=advantages.to(device))


def _ppo_run(batch, options):
    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone().requires_grad_()
    bias = batch["bias"].clone().requires_grad_()
    loss, metrics = fused.FusedPPOLoss(**options)(
        hidden, weight, batch["labels"], batch["old_logps"], batch["advantages"], bias=bias,
        ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"])
    loss.backward()
    return loss.detach(), metrics, {"hidden": hidden.grad, "weight": weight.grad,
                                    "bias": bias.grad}


PPO_OPTIONS = [
    dict(kl_coef=0.1, ent_coef=0.01, softcap=6.0, temperature=0.9),
    dict(kl_coef=0.04, loss_agg="grpo", loss_type="dapo", top_entropy_quantile=0.5),
    dict(kl_coef=0.2),
]


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("options", PPO_OPTIONS, ids=["ppo-entropy", "grpo-entropy-mask",
                                                      "no-entropy"])
def test_fused_ppo_exact_kl_streams_the_policy_head_once_and_equals_two_passes(
        monkeypatch, impl, options):
    _require(impl)
    options = dict(options, kl_estimator="exact", impl=impl)
    batch = _ppo_batch(impl_device(impl))
    calls = []

    def counted(op):
        def wrapper(*args, **kwargs):
            calls.append(op.__name__)
            return op(*args, **kwargs)
        return wrapper

    import fastalign.ops.sequence as sequence
    monkeypatch.setattr(fused, "linear_kl", counted(linear_kl))
    monkeypatch.setattr(sequence, "compute_linear_logprobs",
                        counted(sequence.compute_linear_logprobs))
    loss, metrics, grads = _ppo_run(batch, options)
    assert calls == ["linear_kl"]  # one op over the policy head: no linear_logprobs pass

    monkeypatch.setattr(fused, "linear_kl", _two_pass_linear_kl)
    two_loss, two_metrics, two_grads = _ppo_run(batch, options)
    torch.testing.assert_close(loss, two_loss, rtol=1e-5, atol=1e-6)
    assert set(metrics) == set(two_metrics)
    for name, value in two_metrics.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, grad in two_grads.items():
        assert_close_fp32(grads[name], grad, f"d{name}")
