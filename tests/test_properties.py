"""Property-based tests: random shapes and options against the float64 reference."""

import math

import pytest
import torch
from helpers import impl_device, impl_is_available, make_inputs, max_abs_error, run
from hypothesis import given, settings
from hypothesis import strategies as st

cases = st.fixed_dictionaries({
    "lead_shape": st.one_of(st.tuples(st.integers(1, 24)),
                            st.tuples(st.integers(1, 4), st.integers(1, 6))),
    "hidden_size": st.integers(1, 40),
    "vocab_size": st.integers(1, 400),
    "bias": st.booleans(),
    "ignore_fraction": st.sampled_from([0.0, 0.3, 1.0]),
    "logit_scale": st.sampled_from([0.5, 3.0, 20.0]),
    "temperature": st.sampled_from([1.0, 0.7, 2.5]),
    "softcap": st.sampled_from([None, 5.0, 30.0]),
    "seed": st.integers(0, 2**16),
})


def check_against_reference(impl, case):
    options = {"temperature": case["temperature"]}
    if case["softcap"] is not None:
        options["softcap"] = case["softcap"]
    inputs = make_inputs(case["lead_shape"], case["hidden_size"], case["vocab_size"],
                         bias=case["bias"], ignore_fraction=case["ignore_fraction"],
                         logit_scale=case["logit_scale"], options=options, seed=case["seed"],
                         device=impl_device(impl))
    ours = run(inputs, impl=impl)
    truth = run(inputs, upcast=torch.float64)
    pytorch_fp32 = run(inputs)  # the materialising reference in float32
    assert torch.all(ours.logp <= 0)
    assert torch.all(ours.entropy >= -1e-5)
    assert torch.all(ours.entropy <= math.log(case["vocab_size"]) + 1e-4)
    # Size of the terms that each gradient sums: dh = Σ_v (∂L/∂a)·W_v, dW = Σ_n (∂L/∂a)·h_n, ...
    upstream = max_magnitude(inputs.grad_logp) + max_magnitude(inputs.grad_entropy)
    term_size = {"hidden": upstream * max_magnitude(inputs.weight),
                 "weight": upstream * max_magnitude(inputs.hidden), "bias": upstream}
    assert_within_float32_error(ours.logp, pytorch_fp32.logp, truth.logp, "logp", 1.0)
    assert_within_float32_error(ours.entropy, pytorch_fp32.entropy, truth.entropy, "entropy", 1.0)
    for name, grad in truth.grads.items():
        assert_within_float32_error(ours.grads[name], pytorch_fp32.grads[name], grad, f"d{name}",
                                    term_size[name])


def max_magnitude(tensor):
    return tensor.double().abs().max().item() if tensor.numel() else 0.0


def assert_within_float32_error(actual, pytorch_fp32, truth, name, term_size, torch_factor=2.0):
    """1e-5 relative to the tensor's scale, or else within twice PyTorch's own float32 error or
    1e-6 of the size of the terms summed into it. Random cases include results that nearly cancel
    (with V = 2, dh = (∂L/∂a_0)·(W_0 − W_1); an entropy of 1e-6), which no float32 computation
    gets to 1e-5 of their own, tiny, scale."""
    scale = max(max_magnitude(truth), 1e-6)
    error = max_abs_error(actual, truth)
    allowed = max(1e-5 * scale, torch_factor * max_abs_error(pytorch_fp32, truth),
                  1e-6 * term_size)
    assert error <= allowed, f"{name}: error {error:.3g} > {allowed:.3g} (scale {scale:.3g})"


@pytest.mark.skipif(not impl_is_available("cpp"), reason="C++ extension not built")
@settings(max_examples=6 * settings.default.max_examples)
@given(case=cases)
def test_cpp_property(case):
    check_against_reference("cpp", case)


@pytest.mark.skipif(not impl_is_available("triton"), reason="triton not available")
@settings(max_examples=3 * settings.default.max_examples // 2)  # interpreter: ~0.1 s each
@given(case=cases)
def test_triton_property(case):
    check_against_reference("triton", case)


# ---------------------------------------------------------------------------------------------
# linear_kl
# ---------------------------------------------------------------------------------------------

kl_cases = st.fixed_dictionaries({
    "lead_shape": st.one_of(st.tuples(st.integers(1, 16)),
                            st.tuples(st.integers(1, 3), st.integers(1, 5))),
    "hidden_size": st.integers(1, 32),
    "ref_hidden_size": st.one_of(st.none(), st.integers(1, 32)),
    "vocab_size": st.integers(1, 300),
    "bias": st.booleans(),
    "ref_bias": st.booleans(),
    "mask_fraction": st.sampled_from([0.0, 0.3, 1.0]),
    "logit_scale": st.sampled_from([0.5, 3.0, 20.0]),
    "ref_shift": st.sampled_from([0.1, 1.0, 3.0]),
    "temperature": st.sampled_from([1.0, 0.7, 2.5]),
    "softcap": st.sampled_from([None, 5.0, 30.0]),
    "reverse": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def check_kl_against_reference(impl, case):
    from test_linear_kl import make_kl_inputs, run_kl

    options = {"temperature": case["temperature"], "softcap": case["softcap"],
               "reverse": case["reverse"]}
    tensors, mask, upstream = make_kl_inputs(
        case["lead_shape"], case["hidden_size"], case["vocab_size"],
        ref_hidden_size=case["ref_hidden_size"], bias=case["bias"], ref_bias=case["ref_bias"],
        logit_scale=case["logit_scale"], ref_shift=case["ref_shift"],
        mask_fraction=case["mask_fraction"], seed=case["seed"], device=impl_device(impl))
    kl, grads = run_kl(tensors, mask, upstream, impl=impl, options=options, grad_ref=True)
    truth, truth_grads = run_kl(tensors, mask, upstream, upcast=torch.float64, options=options,
                                grad_ref=True)
    fp32, fp32_grads = run_kl(tensors, mask, upstream, options=options, grad_ref=True)
    assert torch.all(kl >= 0)
    upstream_size = max_magnitude(upstream)
    # KL gradients multiply the float32 rounding of two heads' logits by log p − log q, which is
    # large in peaked rows. The worst of 3000 thorough-profile cases (V=24, logit scale 20,
    # T=0.7, reverse) put both kernels, written independently, at 2.9x PyTorch's float32 error
    # and within 2% of each other (1.1e-5 of scale): the float32 limit of streaming, not a bug.
    factor = 4.0
    assert_within_float32_error(kl, fp32, truth, "kl", 1.0, factor)
    for name, grad in truth_grads.items():
        # The terms of dh are (∂L/∂a)·W_v, those of dW are (∂L/∂a)·h_n, with |∂L/∂a| ≲ 2·|g|·T⁻¹
        # times the logit spread; bound them by the partner tensor's size.
        partner = {"hidden": "weight", "weight": "hidden", "ref_hidden": "ref_weight",
                   "ref_weight": "ref_hidden"}.get(name)
        size = upstream_size * (max_magnitude(tensors[partner]) if partner else 1.0)
        assert_within_float32_error(grads[name], fp32_grads[name], grad, f"d{name}", size,
                                    factor)


@pytest.mark.skipif(not impl_is_available("cpp"), reason="C++ extension not built")
@settings(max_examples=3 * settings.default.max_examples)
@given(case=kl_cases)
def test_linear_kl_cpp_property(case):
    check_kl_against_reference("cpp", case)


@pytest.mark.skipif(not impl_is_available("triton"), reason="triton not available")
@settings(max_examples=settings.default.max_examples)
@given(case=kl_cases)
def test_linear_kl_triton_property(case):
    check_kl_against_reference("triton", case)
