"""The chunked products on CPU (``fastalign.kernels._chunked``): float32 products through oneDNN
where torch has it, ``torch.mm`` otherwise or when ``FASTALIGN_CPU_MATMUL=torch`` asks; both must
give the float64 truth's values and gradients, and each chunk's tile must be freed before the
next one is made (the tiles are new tensors under oneDNN)."""

import pytest
import torch
from helpers import assert_close_fp32, impl_is_available
from test_linear_nll import CASE
from test_linear_nll import _inputs as nll_inputs
from test_linear_nll import _run as run_nll

from fastalign import FusedDPOLoss
from fastalign.bench.memory import cpu_peak_supported, measure_peak_memory
from fastalign.kernels import _chunked

MATMULS = ["onednn", "torch"]


def _dpo_batch(pairs=3, length=9, hidden_size=12, vocab=29):
    """float64 hidden, weight, bias and labels of a chosen-on-rejected stack: a prompt of 1..3
    tokens (-100), a response, right padding."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64)
    bias = 0.1 * torch.randn(vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    for row in labels:
        prompt = int(torch.randint(1, 4, (1,), generator=gen))
        end = int(torch.randint(prompt + 1, length + 1, (1,), generator=gen))
        row[:prompt] = -100
        row[end:] = -100
    return hidden, weight / hidden_size**0.5 * 2, bias, labels


@pytest.fixture(params=MATMULS)
def cpu_matmul(request, monkeypatch):
    if request.param == "onednn" and not _chunked._onednn_linear_available():
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setenv(_chunked.CPU_MATMUL_ENV, request.param)
    assert _chunked.cpu_matmul() == request.param
    return request.param


def _require_cpp():
    if not impl_is_available("cpp"):
        pytest.skip("C++ extension not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_product_nt_is_a_times_b_transposed_for_any_strides(cpu_matmul, dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 70, generator=gen, dtype=torch.float64)
    b = torch.randn(130, 70, generator=gen, dtype=torch.float64)
    for left, right in [(a, b), (a[3:17], b), (a, b.T.contiguous().T),  # column-major b
                        (a[:, :33], b[:, :33]), (b[5:9], a.T.contiguous().T)]:
        got = _chunked.product_nt(left.to(dtype), right.to(dtype))
        assert got.dtype == dtype and got.shape == (left.shape[0], right.shape[0])
        assert_close_fp32(got.double(), left @ right.T, "a @ bᵀ")
    assert _chunked.product_nt(a[:0].to(dtype), b.to(dtype)).shape == (0, 130)


def test_only_float32_on_cpu_gets_new_tiles(cpu_matmul):
    allocates = cpu_matmul == "onednn"
    assert _chunked.fill_allocates_tiles("cpu", torch.float32) is allocates
    assert not _chunked.fill_allocates_tiles("cpu", torch.float64)
    assert not _chunked.fill_allocates_tiles("cuda", torch.float32)


def test_a_bad_choice_of_cpu_matmul_names_the_variable(monkeypatch):
    monkeypatch.setenv(_chunked.CPU_MATMUL_ENV, "blas")
    with pytest.raises(ValueError, match="FASTALIGN_CPU_MATMUL must be one of auto, onednn, "
                                         "torch, got 'blas'"):
        _chunked.cpu_matmul()
    monkeypatch.setattr(_chunked, "_onednn_linear_available", lambda: False)
    monkeypatch.setenv(_chunked.CPU_MATMUL_ENV, "onednn")
    with pytest.raises(ValueError, match="FASTALIGN_CPU_MATMUL=onednn, but this torch"):
        _chunked.cpu_matmul()
    monkeypatch.setenv(_chunked.CPU_MATMUL_ENV, "auto")
    assert _chunked.cpu_matmul() == "torch"


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("name", ["round", "softcap-temp-bias", "misaligned-odd-H",
                                  "one-token-odd-H"])
@pytest.mark.parametrize("budget", [None, "0.05"], ids=["one-chunk", "many-chunks"])
def test_linear_nll_float32_matches_float64_truth(cpu_matmul, impl, name, budget, monkeypatch):
    if impl == "cpp":
        _require_cpp()
    if budget is not None:
        monkeypatch.setenv("FASTALIGN_BACKWARD_WORKSPACE_MIB", budget)
    inputs = nll_inputs(CASE[name], torch.float32, "cpu")
    loss, grads = run_nll(inputs, impl=impl)
    truth, true_grads = run_nll(inputs, upcast=torch.float64)
    assert_close_fp32(loss, truth, "loss")
    for key, grad in true_grads.items():
        assert grads[key].dtype == torch.float32
        assert_close_fp32(grads[key], grad, f"d{key}")


@pytest.mark.parametrize("budget", [None, "1e-6"], ids=["one-chunk", "pair-per-chunk"])
def test_fused_dpo_float32_matches_float64_truth(cpu_matmul, budget, monkeypatch):
    """The sequence-loss engine (gradients in forward) in float32 against its float64 run."""
    _require_cpp()
    if budget is not None:
        monkeypatch.setenv("FASTALIGN_BACKWARD_WORKSPACE_MIB", budget)
    hidden, weight, bias, labels = _dpo_batch()
    gen = torch.Generator().manual_seed(5)
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=gen, dtype=hidden.dtype)
    ref_weight = weight * 1.05

    def run(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias)]
        loss_fn = FusedDPOLoss(beta=0.2, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                               softcap=6.0, temperature=0.8, impl="cpp")
        loss, metrics = loss_fn(leaves[0], leaves[1], labels, bias=leaves[2],
                                ref_hidden=ref_hidden.to(dtype), ref_weight=ref_weight.to(dtype),
                                ref_bias=bias.to(dtype))
        (1.7 * loss).backward()
        return loss.detach(), metrics, [leaf.grad for leaf in leaves]

    (loss, metrics, grads), (truth, true_metrics, true_grads) = run(torch.float32), run(
        torch.float64)
    assert_close_fp32(loss.double(), truth, "loss")
    assert set(metrics) == set(true_metrics)
    for key, value in true_metrics.items():
        assert_close_fp32(metrics[key].double(), value, key)
    for key, grad, true_grad in zip(("hidden", "weight", "bias"), grads, true_grads):
        assert grad.dtype == torch.float32
        assert_close_fp32(grad.double(), true_grad, f"d{key}")


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")
def test_each_new_tile_is_freed_before_the_next(cpu_matmul, monkeypatch):
    """N = 8192 tokens, V = 4096 at a 2 MiB budget: 64 chunks of 2 MiB tiles (eager's logits:
    128 MiB). Kept alive, the tiles would add 2 MiB a chunk; freed, the peak is one or two of
    them and the gradients (measured 3.8-6.2 MiB on 2026-12-03). The bound leaves room for the
    allocator: freed tiles may stay resident for a while on a fragmented heap."""
    _require_cpp()
    from fastalign import linear_nll

    monkeypatch.setenv("FASTALIGN_BACKWARD_WORKSPACE_MIB", "2")
    gen = torch.Generator().manual_seed(0)
    n_tokens, hidden_size, vocab_size = 8192, 32, 4096
    hidden = torch.randn(n_tokens, hidden_size, generator=gen).requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size, generator=gen) / 6).requires_grad_()
    targets = torch.randint(0, vocab_size, (n_tokens,), generator=gen)

    def step():
        linear_nll(hidden, weight, targets, impl="cpp").backward()

    step()  # warm-up: allocator pools, oneDNN's primitives
    hidden.grad = weight.grad = None
    _, peak = measure_peak_memory(step, "cpu")
    gradients = (n_tokens + vocab_size) * hidden_size * 4 * 3  # dh, dW, dW's float32 sum, .grad
    tile = 2 * 2**20
    assert peak < 8 * tile + gradients, f"peak {peak / 2**20:.1f} MiB, 64 tiles of 2 MiB"
