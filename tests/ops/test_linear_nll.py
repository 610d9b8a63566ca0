"""Values and gradients of every linear_nll implementation against the reference.

Ground truth: the materialising reference in float64 on the same inputs, back-propagated from a
random upstream scalar (the gradients are formed in forward and only scaled in backward, so a
scale other than 1 must reach them). float32 must agree to 1e-5 relative to each tensor's scale;
bfloat16 / float16 are judged relative to PyTorch's own error at that dtype.
"""

import importlib

import pytest
import torch
from helpers import (
    assert_close_fp32,
    assert_low_precision_ok,
    eager_log_probs,
    impl_device,
    impl_is_available,
    make_inputs,
    scalar_gradcheck,
)
from test_linear_logprobs import CASES as LOGPROB_CASES
from test_linear_logprobs import _inputs

import fastalign
from fastalign import linear_nll, linear_nll_reference
from fastalign.bench.memory import cpu_peak_supported, measure_peak_memory
from fastalign.ops._extension import EXTENSION

IMPLS = ("torch", "triton", "cpp")

# linear_logprobs' cases (round and awkward shapes, every option, ignored tokens, strided and
# misaligned inputs), and one token with an odd H and a vocabulary past one column tile
CASES = [case for case in LOGPROB_CASES if case[0] != "gpt2-vocab"] + [
    ("one-token-odd-H", (1,), 33, 1100, {}, {})]
CASE_IDS = [case[0] for case in CASES]
CASE = dict(zip(CASE_IDS, CASES))


def _available(impl: str) -> bool:
    if impl == "torch":
        return True
    if impl == "cpp" and not hasattr(EXTENSION, "sequence_rows_stats"):
        return False
    return impl_is_available(impl)


def _require(impl):
    if not _available(impl):
        pytest.skip(f"{impl} is not available here: {fastalign.available_implementations()}")


def _run(inputs, *, impl=None, upcast=None, upstream=-1.7, **kwargs):
    """(loss, grads) after backward(upstream · loss); impl None: the reference."""
    leaves = {"hidden": inputs.hidden, "weight": inputs.weight}
    if inputs.bias is not None:
        leaves["bias"] = inputs.bias
    leaves = {name: (t.detach().to(upcast) if upcast else t.detach()).requires_grad_()
              for name, t in leaves.items()}
    options = dict(bias=leaves.get("bias"), **inputs.options, **kwargs)
    if impl is None:
        loss = linear_nll_reference(leaves["hidden"], leaves["weight"], inputs.targets,
                                    compute_dtype=upcast or torch.float32, **options)
    else:
        loss = linear_nll(leaves["hidden"], leaves["weight"], inputs.targets, impl=impl,
                          **options)
    upstream = torch.as_tensor(upstream, dtype=loss.dtype)
    (loss * upstream).sum().backward()
    return loss.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def _eager_same_dtype(inputs, reduction, upstream=-1.7):
    """What a PyTorch user gets at the inputs' dtype: the head matmul in that dtype, then
    cross-entropy in float32."""
    leaves, log_probs = eager_log_probs(inputs)
    loss = torch.nn.functional.nll_loss(
        log_probs.reshape(-1, log_probs.shape[-1]), inputs.targets.reshape(-1),
        reduction=reduction, ignore_index=inputs.options.get("ignore_index", -100))
    (loss * upstream).backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_matches_reference(impl, reduction, case):
    _require(impl)
    inputs = _inputs(case, torch.float32, impl_device(impl))
    loss, grads = _run(inputs, impl=impl, reduction=reduction)
    truth, true_grads = _run(inputs, upcast=torch.float64, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_fp32(loss, truth, "loss")
    for name, grad in true_grads.items():
        assert grads[name].dtype == torch.float32
        assert_close_fp32(grads[name], grad, f"d{name}")
    if case[0] == "all-ignored":  # a mean over no token is 0, with zero gradients
        assert loss.item() == 0.0
        assert all(not grad.any() for grad in grads.values())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["round", "awkward-3d", "softcap-temp-bias"])
def test_reduction_none_is_minus_logprobs(impl, name):
    _require(impl)
    inputs = _inputs(CASE[name], torch.float32, impl_device(impl))
    upstream = torch.randn(inputs.targets.shape, generator=torch.Generator().manual_seed(1))
    loss, grads = _run(inputs, impl=impl, reduction="none", upstream=upstream)
    truth, true_grads = _run(inputs, upcast=torch.float64, reduction="none", upstream=upstream)
    assert loss.shape == inputs.targets.shape
    assert_close_fp32(loss, truth, "nll")
    assert_close_fp32(-fastalign.linear_logprobs(inputs.hidden, inputs.weight, inputs.targets,
                                                 bias=inputs.bias, **inputs.options), truth,
                      "-logp")
    for name, grad in true_grads.items():
        assert_close_fp32(grads[name], grad, f"d{name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
def test_num_items_in_batch_divides_the_sum(impl, as_tensor):
    _require(impl)
    inputs = _inputs(CASE["vocab-prime"], torch.float32, impl_device(impl))
    num_items = torch.tensor(40) if as_tensor else 40
    loss, grads = _run(inputs, impl=impl, num_items_in_batch=num_items)
    total, total_grads = _run(inputs, upcast=torch.float64, reduction="sum")
    assert_close_fp32(loss, total / 40, "loss")
    for name, grad in total_grads.items():
        assert_close_fp32(grads[name], grad / 40, f"d{name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_accumulation_over_two_calls_equals_one_call(impl):
    """transformers' gradient accumulation: each micro-batch divided by the step's token count."""
    _require(impl)
    device = impl_device(impl)
    first = make_inputs((7,), 24, 190, bias=True, device=device, seed=1)
    second = make_inputs((11,), 24, 190, bias=True, device=device, seed=2)
    targets = torch.cat([first.targets, second.targets])
    count = int((targets != -100).sum())
    leaves = [first.hidden.clone().requires_grad_(), second.hidden.clone().requires_grad_(),
              first.weight.clone().requires_grad_(), first.bias.clone().requires_grad_()]
    h1, h2, weight, bias = leaves
    for hidden, part in ((h1, first), (h2, second)):
        linear_nll(hidden, weight, part.targets, bias=bias, num_items_in_batch=count,
                   impl=impl).backward()
    joint = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    whole = linear_nll(torch.cat(joint[:2]), joint[2], targets, bias=joint[3], impl=impl)
    whole.backward()
    for name, ours, theirs in zip(("h1", "h2", "weight", "bias"), leaves, joint):
        assert_close_fp32(ours.grad, theirs.grad, f"d{name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["round", "vocab-prime", "softcap-temp-bias"])
def test_low_precision_against_float64_truth(impl, dtype, name):
    _require(impl)
    inputs = _inputs(CASE[name], dtype, impl_device(impl))
    loss, grads = _run(inputs, impl=impl, reduction="mean")
    truth, true_grads = _run(inputs, upcast=torch.float64, reduction="mean")
    theirs, their_grads = _eager_same_dtype(inputs, "mean")
    assert loss.dtype == torch.float32
    assert_low_precision_ok(loss, theirs, truth, "loss")
    for name, grad in true_grads.items():
        assert grads[name].dtype == dtype, f"d{name} must come back in the input dtype"
        assert_low_precision_ok(grads[name], their_grads[name], grad, f"d{name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mib", ["0.000001", "0.002"], ids=["one-row", "few-rows"])
def test_small_workspace_budgets_cross_chunk_boundaries(impl, mib, monkeypatch):
    _require(impl)
    inputs = _inputs(CASE["softcap-temp-bias"], torch.float32, impl_device(impl))
    default_loss, default_grads = _run(inputs, impl=impl)
    monkeypatch.setenv("FASTALIGN_BACKWARD_WORKSPACE_MIB", mib)
    loss, grads = _run(inputs, impl=impl)
    assert_close_fp32(loss, default_loss, "loss")
    for name, grad in default_grads.items():
        assert_close_fp32(grads[name], grad, f"d{name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_only_requested_gradients_and_none_without_grad(impl):
    _require(impl)
    inputs = _inputs(CASE["vocab-prime"], torch.float32, impl_device(impl))
    truth = linear_nll_reference(inputs.hidden, inputs.weight, inputs.targets, bias=inputs.bias)
    with torch.no_grad():
        loss = linear_nll(inputs.hidden.requires_grad_(), inputs.weight, inputs.targets,
                          bias=inputs.bias, impl=impl)
    assert not loss.requires_grad
    assert_close_fp32(loss, truth, "loss without grad")
    hidden = inputs.hidden.detach().requires_grad_()
    weight = inputs.weight.detach()
    linear_nll(hidden, weight, inputs.targets, bias=inputs.bias, impl=impl).backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("name", ["awkward-3d", "softcap-temp-bias", "misaligned-odd-H"])
def test_metrics_are_the_entropy_and_the_argmax(impl, with_grad, name):
    """return_metrics: the entropy and arg-max SFT logs, from the loss's own pass (with
    gradients) or from linear_logprobs' and linear_argmax's (without); 0 at ignored tokens."""
    _require(impl)
    inputs = _inputs(CASE[name], torch.float32, impl_device(impl))
    hidden = inputs.hidden.detach().requires_grad_(with_grad)
    loss, entropy, argmax = linear_nll(hidden, inputs.weight, inputs.targets, bias=inputs.bias,
                                       impl=impl, return_metrics=True, **inputs.options)
    assert loss.requires_grad == with_grad
    assert not entropy.requires_grad and argmax.dtype == torch.int64
    _, truth = fastalign.linear_logprobs_reference(
        inputs.hidden.double(), inputs.weight.double(), inputs.targets, return_entropy=True,
        bias=None if inputs.bias is None else inputs.bias.double(), **inputs.options)
    assert entropy.shape == argmax.shape == inputs.targets.shape
    assert_close_fp32(entropy, truth, "entropy")
    scored = inputs.targets != inputs.options.get("ignore_index", -100)
    want = fastalign.linear_argmax_reference(inputs.hidden, inputs.weight, bias=inputs.bias)
    assert torch.equal(argmax[scored], want[scored])
    assert not argmax[~scored].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_the_loss_can_be_scaled_in_place(impl):
    """transformers.Trainer multiplies the loss in place under gradient accumulation."""
    _require(impl)
    inputs = _inputs(CASE["round"], torch.float32, impl_device(impl))
    hidden = inputs.hidden.requires_grad_()
    loss = linear_nll(hidden, inputs.weight, inputs.targets, impl=impl)
    loss *= 2.0
    loss.backward()
    truth = inputs.hidden.detach().requires_grad_()
    (2.0 * linear_nll_reference(truth, inputs.weight, inputs.targets)).backward()
    assert_close_fp32(hidden.grad, truth.grad, "dhidden")


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_float64_gradcheck(impl):
    _require(impl)
    inputs = make_inputs((5,), 7, 23, bias=True, options={"softcap": 4.0, "temperature": 0.8})
    hidden, weight, bias = (x.double().requires_grad_() for x in
                            (inputs.hidden, inputs.weight, inputs.bias))

    def op(h, w, b):
        return linear_nll(h, w, inputs.targets, bias=b, softcap=4.0, temperature=0.8, impl=impl)

    # Not torch.autograd.gradcheck: it runs backward twice through one graph (its reentrancy
    # check), which the handed-over gradients refuse (test_a_second_backward_is_refused...).
    scalar_gradcheck(op, (hidden, weight, bias), eps=1e-6, atol=1e-7)


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_memory_stays_within_the_chunk_workspace(impl, monkeypatch):
    """N = 4096 tokens, V = 4096: eager's float32 logits are 64 MiB; with a 2 MiB workspace the
    op's peak is that, a few float32 temporaries of the chunk and the gradients (2 MiB)."""
    _require(impl)
    monkeypatch.setenv("FASTALIGN_BACKWARD_WORKSPACE_MIB", "2")
    n_tokens, hidden_size, vocab_size = 4096, 64, 4096
    inputs = make_inputs((n_tokens,), hidden_size, vocab_size, ignore_fraction=0.0)
    hidden = inputs.hidden.requires_grad_()
    weight = inputs.weight.requires_grad_()
    logits_bytes = n_tokens * vocab_size * 4

    def step():
        loss = linear_nll(hidden, weight, inputs.targets, impl=impl)
        loss.backward()
        return loss.detach()

    step()  # warm-up: allocator pools, thread pools
    hidden.grad = weight.grad = None
    _, peak = measure_peak_memory(step, "cpu")
    gradients = (n_tokens + vocab_size) * hidden_size * 4 * 3  # dh, dW, dW's float32 sum, .grad
    assert peak < 5 * 2**20 + gradients, (
        f"peak {peak / 2**20:.1f} MiB, eager logits {logits_bytes / 2**20:.0f} MiB")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"reduction": "avg"}, "reduction"),
    ({"num_items_in_batch": 0}, "num_items_in_batch"),
    ({"num_items_in_batch": 3, "reduction": "sum"}, "num_items_in_batch"),
    ({"num_items_in_batch": torch.ones(2)}, "num_items_in_batch"),
    ({"impl": "fast"}, "impl"),
    ({"temperature": 0.0}, "temperature"),
    ({"softcap": -1.0}, "softcap"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    inputs = make_inputs((4,), 8, 16)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_nll(inputs.hidden, inputs.weight, inputs.targets, **kwargs)


def test_bad_tensors_name_the_tensor():
    inputs = make_inputs((4,), 8, 16)
    with pytest.raises(ValueError, match="targets"):
        linear_nll(inputs.hidden, inputs.weight, inputs.targets.clamp(min=0) + 16)
    with pytest.raises(ValueError, match="targets"):
        linear_nll(inputs.hidden, inputs.weight, inputs.targets[:3])
    with pytest.raises((ValueError, TypeError), match="weight"):
        linear_nll(inputs.hidden, inputs.weight[:, :5], inputs.targets)


def test_auto_without_the_extension_runs_the_chunked_torch_implementation(monkeypatch):
    """FASTALIGN_BUILD_EXT=0 on CPU: "auto" falls back to the chunked plain-PyTorch algorithm
    (gradients in forward), not to the materialising reference."""
    from fastalign.ops import _backends

    module = importlib.import_module("fastalign.ops.linear_nll")
    monkeypatch.setattr(_backends, "EXTENSION", None)
    calls = []
    chunked = module.torch_linear_nll_forward
    monkeypatch.setattr(module, "torch_linear_nll_forward",
                        lambda *args: calls.append(args) or chunked(*args))
    inputs = make_inputs((6,), 8, 40)
    hidden = inputs.hidden.requires_grad_()
    linear_nll(hidden, inputs.weight, inputs.targets).backward()
    assert len(calls) == 1 and hidden.grad is not None
