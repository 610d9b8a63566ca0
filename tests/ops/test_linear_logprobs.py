"""Values and gradients of every linear_logprobs implementation against the reference.

Ground truth: the materialising reference in float64 on the same inputs. float32 must agree to
1e-5 relative to each tensor's scale; bfloat16 / float16 are judged relative to PyTorch's own
error at that dtype (head matmul at that dtype, softmax in float32).
"""

import pytest
import torch
from helpers import (
    FUSED_IMPLS,
    assert_close_fp32,
    assert_low_precision_ok,
    eager_same_dtype,
    impl_device,
    impl_is_available,
    make_inputs,
    misaligned_copy,
    run,
    zero_padded,
)

import fastalign
from fastalign import linear_logprobs, linear_logprobs_reference

# (id, leading shape, H, V, input options, option overrides)
CASES = [
    ("round", (64,), 32, 256, {}, {}),
    ("awkward-3d", (3, 7), 31, 123, {}, {}),
    ("vocab-1", (5,), 16, 1, {}, {}),
    ("one-token", (1,), 32, 300, {}, {}),
    ("vocab-prime", (17,), 24, 997, {"bias": True}, {}),
    ("gpt2-vocab", (4,), 16, 50257, {}, {}),
    ("temperature", (13,), 40, 211, {}, {"temperature": 0.7}),
    ("softcap", (13,), 40, 211, {"logit_scale": 40.0}, {"softcap": 30.0}),
    ("softcap-temp-bias", (2, 5), 20, 130, {"bias": True, "logit_scale": 40.0},
     {"softcap": 30.0, "temperature": 0.7}),
    ("all-ignored", (9,), 16, 100, {"ignore_fraction": 1.0}, {}),
    ("ignore-index-0", (9,), 16, 100, {}, {"ignore_index": 0}),
    ("non-contiguous", (6, 5), 24, 150, {"non_contiguous": True, "bias": True}, {}),
    ("misaligned-odd-H", (3, 5), 37, 140, {"misaligned": True, "bias": True}, {}),
]
CASE_IDS = [case[0] for case in CASES]
LOW_PRECISION_CASES = [c for c in CASES if c[0] in ("round", "awkward-3d", "softcap-temp-bias",
                                                    "vocab-prime", "non-contiguous")]


def _inputs(case, dtype, device):
    _, shape, hidden_size, vocab_size, input_options, options = case
    inputs = make_inputs(shape, hidden_size, vocab_size, dtype=dtype, device=device,
                         options=options, **input_options)
    if case[0] == "all-ignored":  # make_inputs keeps two valid tokens; ignore those too
        inputs.targets.fill_(-100)
    return inputs


def _require(impl):
    if not impl_is_available(impl):
        pytest.skip(f"{impl} is not available here: {fastalign.available_implementations()}")


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_matches_reference(impl, case):
    _require(impl)
    inputs = _inputs(case, torch.float32, impl_device(impl))
    ours = run(inputs, impl=impl)
    truth = run(inputs, upcast=torch.float64)
    assert ours.logp.dtype == torch.float32 and ours.entropy.dtype == torch.float32
    assert ours.logp.shape == inputs.targets.shape
    assert_close_fp32(ours.logp, truth.logp, "logp")
    assert_close_fp32(ours.entropy, truth.entropy, "entropy")
    for name, grad in truth.grads.items():
        assert ours.grads[name].dtype == torch.float32
        assert_close_fp32(ours.grads[name], grad, f"d{name}")


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_entropy_only_upstream_gradient(impl):
    _require(impl)
    inputs = make_inputs((11,), 24, 190, bias=True, device=impl_device(impl),
                         options={"temperature": 1.3})
    ours = run(inputs, impl=impl, entropy_only=True)
    truth = run(inputs, upcast=torch.float64, entropy_only=True)
    for name, grad in truth.grads.items():
        assert_close_fp32(ours.grads[name], grad, f"d{name}")


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=[c[0] for c in LOW_PRECISION_CASES])
def test_low_precision_against_float32_truth(impl, dtype, case):
    _require(impl)
    inputs = _inputs(case, dtype, impl_device(impl))
    ours = run(inputs, impl=impl)
    truth = run(inputs, upcast=torch.float64)
    theirs = eager_same_dtype(inputs)
    assert ours.logp.dtype == torch.float32
    assert_low_precision_ok(ours.logp, theirs.logp, truth.logp, "logp")
    assert_low_precision_ok(ours.entropy, theirs.entropy, truth.entropy, "entropy")
    for name, grad in truth.grads.items():
        assert ours.grads[name].dtype == dtype, f"d{name} must come back in the input dtype"
        assert_low_precision_ok(ours.grads[name], theirs.grads[name], grad, f"d{name}")


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_ignored_tokens_get_exactly_zero(impl):
    _require(impl)
    inputs = make_inputs((20,), 16, 77, ignore_fraction=0.5, device=impl_device(impl))
    ours = run(inputs, impl=impl)
    ignored = inputs.targets == -100
    assert ignored.any() and (~ignored).any()
    assert torch.all(ours.logp[ignored] == 0) and torch.all(ours.entropy[ignored] == 0)
    assert torch.all(ours.grads["hidden"][ignored] == 0)
    assert torch.all(ours.logp <= 0)


@pytest.mark.parametrize("impl", (*FUSED_IMPLS, "reference"))
@pytest.mark.parametrize("lead_shape", [(0,), (2, 0)], ids=["0", "2x0"])
def test_empty_input_gives_empty_outputs(impl, lead_shape):
    _require(impl)
    device = impl_device(impl)
    hidden = torch.randn(*lead_shape, 8, device=device, requires_grad=True)
    weight = torch.randn(10, 8, device=device, requires_grad=True)
    targets = torch.zeros(lead_shape, dtype=torch.long, device=device)
    logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
    assert logp.shape == lead_shape and entropy.shape == lead_shape
    assert logp.dtype == torch.float32
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad.shape == hidden.shape
    assert torch.all(weight.grad == 0)


@pytest.mark.parametrize("impl", ("cpp", "reference"))
def test_float64_gradcheck(impl):
    _require(impl)
    torch.manual_seed(1)
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 12, -100, 4, 7])

    def op(h, w, b):
        return linear_logprobs(h, w, targets, bias=b, temperature=0.8, softcap=3.0,
                               return_entropy=True, impl=impl)

    assert op(hidden, weight, bias)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(op, (hidden, weight, bias), eps=1e-6, atol=1e-7)


def test_reference_matches_textbook_formulas():
    """The reference itself, against torch.distributions on float64 logits."""
    torch.manual_seed(2)
    hidden = torch.randn(7, 9, dtype=torch.float64)
    weight = torch.randn(31, 9, dtype=torch.float64)
    targets = torch.randint(0, 31, (7,))
    logits = 25.0 * torch.tanh((hidden @ weight.T) / 25.0) / 0.9
    dist = torch.distributions.Categorical(logits=logits)
    logp, entropy = linear_logprobs_reference(hidden, weight, targets, softcap=25.0,
                                              temperature=0.9, return_entropy=True)
    torch.testing.assert_close(logp, dist.log_prob(targets))
    torch.testing.assert_close(entropy, dist.entropy())


def test_auto_dispatch_on_cpu_uses_the_cpp_kernel():
    from fastalign.ops._backends import resolve_impl

    expected = "cpp" if impl_is_available("cpp") else "reference"
    assert resolve_impl("auto", torch.device("cpu"), torch.float32) == expected
    assert resolve_impl("auto", torch.device("cpu"), torch.float64) == expected


def test_only_requested_gradients_are_computed():
    """weight frozen (a reference model): only hidden gets a gradient, and it is right."""
    inputs = make_inputs((12,), 16, 90)
    for impl in [i for i in FUSED_IMPLS if impl_is_available(i) and impl_device(i).type == "cpu"]:
        hidden = inputs.hidden.clone().requires_grad_()
        logp = linear_logprobs(hidden, inputs.weight, inputs.targets, impl=impl)
        (logp * inputs.grad_logp).sum().backward()
        reference_hidden = inputs.hidden.double().requires_grad_()
        expected = linear_logprobs_reference(reference_hidden, inputs.weight.double(),
                                             inputs.targets)
        (expected * inputs.grad_logp.double()).sum().backward()
        assert_close_fp32(hidden.grad, reference_hidden.grad, f"{impl} dhidden")


CPU_PATHS = [
    pytest.param({"FASTALIGN_CPU_ISA": isa, "FASTALIGN_CPU_SCHEDULE": schedule, **blocks},
                 id=f"{isa}-{schedule}{'-odd-blocks' if blocks else ''}")
    for isa in ("avx512", "avx2", "baseline")
    for schedule in ("owned", "shared")
    for blocks in ({}, {"FASTALIGN_CPU_BLOCK_N": "7", "FASTALIGN_CPU_BLOCK_V": "13"})
]


@pytest.mark.parametrize("env", CPU_PATHS)
def test_cpp_every_code_path(env, monkeypatch):
    """Each instruction set, threading schedule and tile shape of the C++ kernel gives the same
    answer (the CPU picks the widest instruction set by default; the others are forced here)."""
    _require("cpp")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    inputs = make_inputs((3, 11), 20, 301, bias=True, options={"softcap": 30.0,
                                                               "temperature": 0.7},
                         logit_scale=40.0)
    try:
        ours = run(inputs, impl="cpp")
    except ValueError as exc:
        if "not supported by this CPU" in str(exc):
            pytest.skip(str(exc))
        raise
    truth = run(inputs, upcast=torch.float64)
    assert_close_fp32(ours.logp, truth.logp, "logp")
    assert_close_fp32(ours.entropy, truth.entropy, "entropy")
    for name, grad in truth.grads.items():
        assert_close_fp32(ours.grads[name], grad, f"d{name}")


def test_cpp_rejects_bad_tuning_variables(monkeypatch):
    _require("cpp")
    monkeypatch.setenv("FASTALIGN_CPU_SCHEDULE", "fastest")
    inputs = make_inputs((4,), 8, 30)
    with pytest.raises(ValueError, match="FASTALIGN_CPU_SCHEDULE"):
        run(inputs, impl="cpp")


@pytest.mark.parametrize("hidden_size, misaligned", [(37, False), (37, True), (48, True)],
                         ids=["odd-H", "odd-H-misaligned", "misaligned"])
@pytest.mark.parametrize("strategy", ["chunked", "atomic"])
def test_triton_launchers_pad_and_align_without_changing_a_bit(hidden_size, misaligned, strategy,
                                                              monkeypatch):
    """Odd H and misaligned inputs take the launchers' padded, aligned path (what keeps the GPU
    build pipelined; tests/bench/test_hopper.py checks the specialisation): the same bits as the
    kernels on explicitly zero-padded, aligned copies. The chunked backward's gradients come from
    matrix products of the kernel's ∂L/∂logits with the unpadded head, which may sum in another
    order than with the padded one: close to rounding there, bit for bit with the atomic kernel."""
    _require("triton")
    monkeypatch.setenv("FASTALIGN_TRITON_BACKWARD", strategy)
    from fastalign.kernels.linear_logprobs import linear_logprobs_backward, linear_logprobs_forward

    x = make_inputs((11,), hidden_size, 140, bias=True, device=impl_device("triton"))
    padded_size = -(-hidden_size // 16) * 16
    place = misaligned_copy if misaligned else (lambda t: t)
    given = [place(t) for t in (x.hidden, x.weight, x.bias, x.targets)]
    padded = [zero_padded(x.hidden, padded_size), zero_padded(x.weight, padded_size), x.bias,
              x.targets]
    options = (0.7, 20.0, -100)
    ours, theirs = (linear_logprobs_forward(*tensors, *options) for tensors in (given, padded))
    for name, a, b in zip(("logp", "entropy", "lse", "sum_pz"), ours, theirs):
        assert torch.equal(a, b), name
    upstream = [place(x.grad_logp), place(x.grad_entropy)]
    grads, padded_grads = (
        linear_logprobs_backward(*upstream, *tensors, *[place(t) for t in stats], *options,
                                 True, True, True)
        for tensors, stats in ((given, ours[2:]), (padded, theirs[2:])))
    for name, grad, padded_grad, like in zip(("dhidden", "dweight", "dbias"), grads,
                                             padded_grads, (x.hidden, x.weight, x.bias)):
        assert grad.shape == like.shape, name
        if strategy == "atomic":
            assert torch.equal(grad, padded_grad[..., :like.shape[-1]]), name
        else:
            torch.testing.assert_close(grad, padded_grad[..., :like.shape[-1]], rtol=1e-5,
                                       atol=1e-6, msg=name)
