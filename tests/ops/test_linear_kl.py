"""Values and gradients of every linear_kl implementation against the materialising reference.

Ground truth: ``linear_kl_reference`` in float64 on the same inputs. float32 must agree to 1e-5
relative to each tensor's scale; bfloat16 / float16 are judged relative to PyTorch's own error at
that dtype (both head matmuls at that dtype, softmaxes in float32).
"""

import math

import pytest
import torch
from helpers import (
    FUSED_IMPLS,
    assert_close_fp32,
    assert_low_precision_ok,
    impl_device,
    impl_is_available,
    misaligned_copy,
    zero_padded,
)

import fastalign
from fastalign import linear_kl, linear_kl_reference


def _require(impl):
    if not impl_is_available(impl):
        pytest.skip(f"{impl} is not available here: {fastalign.available_implementations()}")


def make_kl_inputs(lead_shape, hidden_size, vocab_size, *, ref_hidden_size=None,
                   dtype=torch.float32, device="cpu", bias=False, ref_bias=False, logit_scale=3.0,
                   ref_shift=0.5, mask_fraction=0.0, seed=0):
    """A policy head and a reference head that differ by about ``ref_shift`` in logit scale."""
    gen = torch.Generator().manual_seed(seed)
    ref_hidden_size = ref_hidden_size or hidden_size
    n_tokens = math.prod(lead_shape)

    def head(h_size, with_bias):
        weight = torch.randn(vocab_size, h_size, generator=gen) * (logit_scale / math.sqrt(h_size))
        return weight, (torch.randn(vocab_size, generator=gen) if with_bias else None)

    hidden = torch.randn(*lead_shape, hidden_size, generator=gen)
    weight, bias_t = head(hidden_size, bias)
    if ref_hidden_size == hidden_size:  # a nearby reference, as after some training steps
        ref_hidden = hidden + ref_shift * torch.randn(hidden.shape, generator=gen)
        ref_weight = weight + ref_shift * torch.randn(weight.shape, generator=gen) * (
            logit_scale / math.sqrt(hidden_size))
    else:
        ref_hidden = torch.randn(*lead_shape, ref_hidden_size, generator=gen)
        ref_weight, _ = head(ref_hidden_size, False)
    ref_bias_t = torch.randn(vocab_size, generator=gen) if ref_bias else None
    mask = None
    if mask_fraction > 0:
        mask = (torch.rand(n_tokens, generator=gen) >= mask_fraction).view(lead_shape)
    upstream = torch.randn(lead_shape, generator=gen)

    def to(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    tensors = dict(hidden=to(hidden), weight=to(weight), bias=to(bias_t), ref_hidden=to(ref_hidden),
                   ref_weight=to(ref_weight), ref_bias=to(ref_bias_t))
    return tensors, (None if mask is None else mask.to(device)), upstream.to(device)


def run_kl(tensors, mask, upstream, *, impl=None, upcast=None, options=None, grad_ref=False,
           grad_policy=True, same_dtype_eager=False):
    """Forward + backward; ``impl=None`` runs the reference (in ``upcast`` when given)."""
    options = options or {}
    leaves = {}
    for name, t in tensors.items():
        if t is None:
            continue
        t = t.detach().to(upcast) if upcast else t.detach().clone()
        wants = grad_ref if name.startswith("ref_") else grad_policy
        leaves[name] = t.requires_grad_(wants)
    kwargs = dict(bias=leaves.get("bias"), ref_bias=leaves.get("ref_bias"), mask=mask, **options)
    args = (leaves["hidden"], leaves["weight"], leaves["ref_hidden"], leaves["ref_weight"])
    if same_dtype_eager:
        kl = _eager_same_dtype(*args, **kwargs)
    elif impl is None:
        kl = linear_kl_reference(*args, **kwargs, compute_dtype=upcast or torch.float32)
    else:
        kl = linear_kl(*args, impl=impl, **kwargs)
    (kl * upstream.to(kl.dtype)).sum().backward()
    grads = {k: v.grad for k, v in leaves.items() if v.requires_grad}
    return kl.detach(), grads


def _eager_same_dtype(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None,
                      mask=None, temperature=1.0, softcap=None, reverse=False):
    """What a PyTorch user gets at the inputs' dtype: matmuls there, softmax in float32."""
    def logits(h, w, b):
        a = h @ w.T
        a = (a + b if b is not None else a).float()
        if softcap is not None:
            a = softcap * torch.tanh(a / softcap)
        return a / temperature
    log_p = torch.log_softmax(logits(hidden, weight, bias), -1)
    log_q = torch.log_softmax(logits(ref_hidden, ref_weight, ref_bias), -1)
    if reverse:
        log_p, log_q = log_q, log_p
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl if mask is None else torch.where(mask, kl, 0.0)


# (id, leading shape, H, V, input options, op options)
CASES = [
    ("round", (32,), 32, 256, {}, {}),
    ("awkward-3d", (3, 7), 31, 123, {"bias": True}, {}),
    ("vocab-1", (5,), 16, 1, {}, {}),
    ("one-token", (1,), 24, 300, {}, {}),
    ("vocab-prime", (9,), 24, 997, {"bias": True, "ref_bias": True}, {}),
    ("ref-hidden-size", (7,), 16, 200, {"ref_hidden_size": 40}, {}),
    ("temperature", (11,), 40, 211, {}, {"temperature": 0.7}),
    ("softcap", (11,), 40, 211, {"logit_scale": 40.0}, {"softcap": 30.0}),
    ("softcap-temp-bias", (2, 5), 20, 130, {"bias": True, "logit_scale": 40.0},
     {"softcap": 30.0, "temperature": 0.7}),
    ("reverse", (13,), 24, 150, {"bias": True}, {"reverse": True}),
    ("masked", (4, 6), 24, 150, {"mask_fraction": 0.4}, {}),
    ("all-masked", (6,), 16, 100, {"mask_fraction": 1.0}, {}),
    ("peaked", (8,), 32, 120, {"logit_scale": 50.0}, {}),
    ("far-apart", (8,), 32, 120, {"ref_shift": 3.0}, {"reverse": True}),
]
CASE_IDS = [case[0] for case in CASES]


def _case_inputs(case, dtype, device):
    _, shape, hidden_size, vocab_size, input_options, options = case
    tensors, mask, upstream = make_kl_inputs(shape, hidden_size, vocab_size, dtype=dtype,
                                             device=device, **input_options)
    return tensors, mask, upstream, options


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_matches_reference(impl, case):
    _require(impl)
    tensors, mask, upstream, options = _case_inputs(case, torch.float32, impl_device(impl))
    kl, grads = run_kl(tensors, mask, upstream, impl=impl, options=options)
    truth, truth_grads = run_kl(tensors, mask, upstream, upcast=torch.float64, options=options)
    assert kl.dtype == torch.float32 and kl.shape == upstream.shape
    assert_close_fp32(kl, truth, "kl")
    assert set(grads) == set(truth_grads)
    for name, grad in truth_grads.items():
        assert grads[name].dtype == torch.float32
        assert_close_fp32(grads[name], grad, f"d{name}")


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("options", [{}, {"reverse": True, "softcap": 20.0, "temperature": 1.3}],
                         ids=["forward-kl", "reverse-softcap-temp"])
def test_gradients_to_both_heads(impl, options):
    _require(impl)
    tensors, mask, upstream = make_kl_inputs((3, 5), 24, 177, device=impl_device(impl), bias=True,
                                             ref_bias=True, mask_fraction=0.2, logit_scale=10.0)
    kl, grads = run_kl(tensors, mask, upstream, impl=impl, options=options, grad_ref=True)
    truth, truth_grads = run_kl(tensors, mask, upstream, upcast=torch.float64, options=options,
                                grad_ref=True)
    assert_close_fp32(kl, truth, "kl")
    assert set(grads) == {"hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias"}
    for name, grad in truth_grads.items():
        assert_close_fp32(grads[name], grad, f"d{name}")


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_gradients_to_the_reference_side_only(impl):
    _require(impl)
    tensors, mask, upstream = make_kl_inputs((10,), 16, 90, device=impl_device(impl))
    _, grads = run_kl(tensors, mask, upstream, impl=impl, grad_ref=True, grad_policy=False)
    _, truth_grads = run_kl(tensors, mask, upstream, upcast=torch.float64, grad_ref=True,
                            grad_policy=False)
    assert set(grads) == {"ref_hidden", "ref_weight"}
    for name, grad in truth_grads.items():
        assert_close_fp32(grads[name], grad, f"d{name}")


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_identical_heads_give_zero_kl_and_zero_gradient(impl):
    _require(impl)
    tensors, _, upstream = make_kl_inputs((12,), 32, 257, device=impl_device(impl), bias=True)
    tensors["ref_hidden"], tensors["ref_weight"] = tensors["hidden"], tensors["weight"]
    tensors["ref_bias"] = tensors["bias"]
    kl, grads = run_kl(tensors, None, upstream, impl=impl)
    assert kl.abs().max().item() <= 1e-6
    for name, grad in grads.items():
        assert grad.abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in
                                  ("round", "awkward-3d", "softcap-temp-bias", "masked")],
                         ids=["round", "awkward-3d", "softcap-temp-bias", "masked"])
def test_low_precision_within_pytorchs_own_error(impl, dtype, case):
    _require(impl)
    tensors, mask, upstream, options = _case_inputs(case, dtype, impl_device(impl))
    kl, grads = run_kl(tensors, mask, upstream, impl=impl, options=options)
    eager, eager_grads = run_kl(tensors, mask, upstream, options=options, same_dtype_eager=True)
    truth, truth_grads = run_kl(tensors, mask, upstream, upcast=torch.float64, options=options)
    assert kl.dtype == torch.float32
    assert_low_precision_ok(kl, eager, truth, "kl")
    for name, grad in truth_grads.items():
        assert grads[name].dtype == dtype
        assert_low_precision_ok(grads[name], eager_grads[name], grad, f"d{name}")


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@pytest.mark.parametrize("options", [{}, {"reverse": True, "softcap": 5.0, "temperature": 0.8}],
                         ids=["plain", "reverse-softcap-temp"])
def test_float64_gradcheck(impl, options):
    _require(impl)
    tensors, mask, _ = make_kl_inputs((2, 3), 5, 11, dtype=torch.float64, bias=True, ref_bias=True,
                                      mask_fraction=0.3, seed=3)
    names = ["hidden", "weight", "ref_hidden", "ref_weight", "bias", "ref_bias"]
    leaves = [tensors[n].clone().requires_grad_() for n in names]

    def fn(h, w, rh, rw, b, rb):
        return linear_kl(h, w, rh, rw, bias=b, ref_bias=rb, mask=mask, impl=impl, **options)

    assert fn(*leaves).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)


def test_auto_matches_reference_and_nonnegative():
    tensors, mask, upstream = make_kl_inputs((4, 9), 16, 333, mask_fraction=0.3,
                                             ref_shift=2.0)
    kl, _ = run_kl(tensors, mask, upstream, impl="auto")
    truth, _ = run_kl(tensors, mask, upstream, upcast=torch.float64)
    assert (kl >= 0).all()
    assert_close_fp32(kl, truth, "kl")
    assert (kl[~mask] == 0).all()


def test_empty_batch_gives_empty_result_and_zero_gradient():
    tensors, _, _ = make_kl_inputs((3,), 8, 20)
    hidden = tensors["hidden"][:0].clone().requires_grad_()
    weight = tensors["weight"].clone().requires_grad_()
    kl = linear_kl(hidden, weight, tensors["ref_hidden"][:0], tensors["ref_weight"])
    assert kl.shape == (0,)
    kl.sum().backward()
    assert weight.grad is not None and (weight.grad == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("impl", [*FUSED_IMPLS, "reference"])
def test_nan_or_inf_in_the_inputs_propagates_instead_of_reading_zero(impl):
    """A diverged head must show up as NaN, never as a KL of 0 that silently drops a penalty."""
    _require(impl)
    tensors, _, _ = make_kl_inputs((4,), 8, 37, device=impl_device(impl))
    tensors["hidden"][1, 3] = float("nan")
    tensors["ref_hidden"][2, 0] = float("inf")
    kl = linear_kl(tensors["hidden"], tensors["weight"], tensors["ref_hidden"],
                   tensors["ref_weight"], impl=impl)
    assert torch.isfinite(kl[[0, 3]]).all()
    assert torch.isnan(kl[1]) and torch.isnan(kl[2])


def test_references_accept_integer_masks():
    from fastalign import gae_reference

    tensors, _, _ = make_kl_inputs((2, 3), 8, 11)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    kl = linear_kl_reference(tensors["hidden"], tensors["weight"], tensors["ref_hidden"],
                             tensors["ref_weight"], mask=mask)
    assert (kl[mask == 0] == 0).all() and (kl[mask == 1] > 0).all()
    advantages, _ = gae_reference(torch.ones(2, 3), torch.zeros(2, 3), mask)
    assert advantages[0].tolist() == [pytest.approx(1.95), 0.0, 1.0]


@pytest.mark.parametrize("sizes, misaligned", [((37, 21), False), ((37, 21), True),
                                               ((32, 48), True)],
                         ids=["odd-H", "odd-H-misaligned", "misaligned"])
@pytest.mark.parametrize("strategy", ["chunked", "atomic"])
def test_triton_launchers_pad_and_align_without_changing_a_bit(sizes, misaligned, strategy,
                                                              monkeypatch):
    """Odd H (of either head) and misaligned inputs take the launchers' padded, aligned path
    (tests/bench/test_hopper.py checks its specialisation): the same bits as the kernels on
    explicitly zero-padded, aligned copies. The chunked backward's gradients come from matrix
    products of the kernel's ∂L/∂logits with the unpadded head, which may sum in another order
    than with the padded one: close to rounding there, bit for bit with the atomic kernel."""
    _require("triton")
    monkeypatch.setenv("FASTALIGN_TRITON_BACKWARD", strategy)
    from fastalign.kernels.linear_kl import linear_kl_backward, linear_kl_forward

    hidden_size, ref_hidden_size = sizes
    tensors, _, upstream = make_kl_inputs((9,), hidden_size, 130, ref_hidden_size=ref_hidden_size,
                                          bias=True, ref_bias=True, device=impl_device("triton"))
    heads = [tensors[name] for name in ("hidden", "weight", "bias", "ref_hidden", "ref_weight",
                                        "ref_bias")]
    place = misaligned_copy if misaligned else (lambda t: t)
    given = [place(t) for t in heads]
    padded = [t if t.dim() == 1 else zero_padded(t, -(-t.shape[1] // 16) * 16) for t in heads]
    options = (0.7, 20.0)
    ours, theirs = (linear_kl_forward(*inputs, *options) for inputs in (given, padded))
    for name, a, b in zip(("kl", "lse", "ref_lse"), ours, theirs):
        assert torch.equal(a, b), name
    grads, padded_grads = (
        linear_kl_backward(place(upstream), *inputs, *[place(t) for t in stats], *options,
                           *[True] * 6)
        for inputs, stats in ((given, ours), (padded, theirs)))
    names = ("dhidden", "dweight", "dbias", "dref_hidden", "dref_weight", "dref_bias")
    for name, grad, padded_grad, like in zip(names, grads, padded_grads, heads):
        assert grad.shape == like.shape, name
        if strategy == "atomic":
            assert torch.equal(grad, padded_grad[..., :like.shape[-1]]), name
        else:
            torch.testing.assert_close(grad, padded_grad[..., :like.shape[-1]], rtol=1e-5,
                                       atol=1e-6, msg=name)
