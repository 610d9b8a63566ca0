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


def assert_within_float32_error(actual, pytorch_fp32, truth, name, term_size):
    """1e-5 relative to the tensor's scale, or else within twice PyTorch's own float32 error or
    1e-6 of the size of the terms summed into it. Random cases include results that nearly cancel
    (with V = 2, dh = (∂L/∂a_0)·(W_0 − W_1); an entropy of 1e-6), which no float32 computation
    gets to 1e-5 of their own, tiny, scale."""
    scale = max(max_magnitude(truth), 1e-6)
    error = max_abs_error(actual, truth)
    allowed = max(1e-5 * scale, 2 * max_abs_error(pytorch_fp32, truth), 1e-6 * term_size)
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
