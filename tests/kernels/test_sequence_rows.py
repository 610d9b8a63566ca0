"""The sequence-loss engine's row kernels (``fastalign.kernels.sequence_rows``) against float64.

Ground truth: the materialised softmax of the same tile in float64, the gradient by autograd of
Σ g·logp + Σ e·entropy. Statistics are float32 whatever the tile's dtype, so they must agree to
float32 precision (the tile's values are exact in float64); the gradient is written in the tile's
dtype, so a 16-bit one is judged against the float32 truth relative to that dtype's rounding.
"""

import pytest
import torch
from helpers import impl_device

from fastalign.kernels.sequence_rows import sequence_rows_grad, sequence_rows_stats

DEVICE = impl_device("triton")  # CUDA if present, else the CPU interpreter

# (id, n, V, bias, softcap, temperature, entropy gradient, dtype, row stride > V)
CASES = [
    ("V=1000", 7, 1000, False, 0.0, 1.0, True, torch.float32, False),
    ("V=4001 bias softcap=30 T=0.7 strided", 5, 4001, True, 30.0, 0.7, True, torch.float32, True),
    ("V=33 softcap=2 T=1.3 no-entropy-grad", 9, 33, False, 2.0, 1.3, False, torch.float32, False),
    ("V=1000 bias softcap=2 strided", 4, 1000, True, 2.0, 0.7, True, torch.float32, True),
    ("V=4001 bias no-entropy-grad strided", 3, 4001, True, 0.0, 1.0, False, torch.float32, True),
    ("V=2048 even", 3, 2048, False, 0.0, 1.0, True, torch.float32, True),
    ("bf16 V=1000 bias softcap=30 T=0.7 strided", 6, 1000, True, 30.0, 0.7, True,
     torch.bfloat16, True),
    ("bf16 V=4001 softcap=2", 3, 4001, False, 2.0, 1.0, True, torch.bfloat16, False),
    ("bf16 V=33 no-entropy-grad", 5, 33, True, 0.0, 1.3, False, torch.bfloat16, False),
    ("fp16 V=1000 bias", 4, 1000, True, 0.0, 0.7, True, torch.float16, True),
]

# A 16-bit gradient is the float32 one rounded once: within one ulp of its dtype (relative eps;
# the GPU rounds to nearest, half an ulp, but the interpreter's float32 → bfloat16 cast
# truncates), plus the float32 error before the rounding.
ROUNDING = {torch.float32: 0.0, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
            torch.float16: torch.finfo(torch.float16).eps}


def reference(tile, bias, targets, temperature, softcap, grad_logp=None, grad_entropy=None):
    """(logp, entropy, lse, log_sum_sq) in float64 and, given upstream gradients, ∂L/∂a."""
    a = tile.double().requires_grad_()
    x = a + bias.double() if bias is not None else a
    z = (softcap * torch.tanh(x / softcap) if softcap else x) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    logp = log_p.gather(1, targets[:, None])[:, 0]
    entropy = -(p * log_p).sum(-1)
    stats = (logp, entropy, torch.logsumexp(z, dim=-1), (p * p).sum(-1).log())
    if grad_logp is None:
        return [s.detach() for s in stats], None
    loss = (grad_logp.double() * logp).sum()
    if grad_entropy is not None:
        loss = loss + (grad_entropy.double() * entropy).sum()
    (grad,) = torch.autograd.grad(loss, a)
    return [s.detach() for s in stats], grad


def make_tile(n, vocab, dtype, strided, scale=3.0):
    """Raw logits [n, V]; strided: a column slice of a wider buffer (as the engine's padded
    workspace), whose columns past V hold a sentinel the kernels must not touch."""
    logits = (torch.randn(n, vocab) * scale).to(DEVICE)
    if not strided:
        return logits.to(dtype)
    width = -(-vocab // 16) * 16 + 16
    buffer = torch.full((n, width), 1234.0, dtype=dtype, device=DEVICE)
    buffer[:, :vocab] = logits.to(dtype)
    return buffer[:, :vocab]


def _assert_close(actual, expected, name, rtol=1e-5):
    """Within ``rtol`` of the tensor's scale (max |expected|, at least 1)."""
    scale = max(expected.abs().max().item(), 1.0)
    error = (actual.double() - expected).abs().max().item()
    assert error <= rtol * scale, f"{name}: max error {error:.3g} > {rtol} x {scale:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_stats_and_gradient_match_float64(case):
    _, n, vocab, with_bias, softcap, temperature, with_entropy_grad, dtype, strided = case
    tile = make_tile(n, vocab, dtype, strided)
    bias = torch.randn(vocab).to(DEVICE, dtype) if with_bias else None
    targets = torch.randint(0, vocab, (n,)).to(DEVICE)
    grad_logp = torch.randn(n).to(DEVICE)
    grad_entropy = torch.randn(n).to(DEVICE) if with_entropy_grad else None
    truth, truth_grad = reference(tile, bias, targets, temperature, softcap, grad_logp,
                                  grad_entropy)
    original = tile.clone()

    stats = sequence_rows_stats(tile, bias, targets, temperature, softcap)
    assert torch.equal(tile, original), "the statistics pass must not modify the tile"
    for name, ours, expected in zip(("logp", "entropy", "lse", "log_sum_sq"), stats, truth):
        assert ours.dtype == torch.float32 and ours.shape == (n,), name
        _assert_close(ours, expected, name)
    assert (stats[0] <= 0).all()

    logp, entropy, lse, _ = stats
    sequence_rows_grad(tile, bias, targets, lse, entropy, grad_logp, grad_entropy,
                       temperature, softcap)
    assert tile.dtype == dtype
    error = (tile.double() - truth_grad).abs()
    bound = ROUNDING[dtype] * truth_grad.abs() + 1e-5 * truth_grad.abs().max()
    assert (error <= bound).all(), f"gradient: max excess {(error - bound).max().item():.3g}"
    if strided:  # the padding columns past V are the caller's, untouched
        padding = tile.as_strided((n, tile.stride(0) - vocab), tile.stride(), vocab)
        assert (padding == 1234.0).all()


def test_entropy_gradient_is_the_entropy_term():
    """grad_entropy None is e = 0; a nonzero e adds its own term (the two runs differ by it)."""
    n, vocab = 4, 500
    tile = make_tile(n, vocab, torch.float32, False)
    targets = torch.randint(0, vocab, (n,)).to(DEVICE)
    grad_logp, grad_entropy = torch.randn(n).to(DEVICE), torch.randn(n).to(DEVICE)
    _, entropy, lse, _ = sequence_rows_stats(tile, None, targets, 1.0, 0.0)
    grads = {}
    for name, e in (("none", None), ("zero", torch.zeros(n, device=DEVICE)), ("e", grad_entropy)):
        grads[name] = tile.clone()
        sequence_rows_grad(grads[name], None, targets, lse, entropy, grad_logp, e, 1.0, 0.0)
    assert torch.equal(grads["none"], grads["zero"])
    _, entropy_only = reference(tile, None, targets, 1.0, 0.0, torch.zeros_like(grad_logp),
                                grad_entropy)
    _assert_close(grads["e"] - grads["none"], entropy_only, "entropy term")


def test_peaked_rows_keep_their_tiny_log_prob_and_entropy():
    """A row whose target dominates (p_y = 1 − 2e-6): logp, entropy and log Σ p² are tiny and
    must keep their leading digits, which log(Σ e^{z−m}) rounded in float32 would lose."""
    vocab = 1000
    targets = torch.tensor([3, 999], device=DEVICE)
    tile = torch.zeros(2, vocab, device=DEVICE)
    tile[0, 3] = tile[1, 999] = 20.0
    truth, _ = reference(tile, None, targets, 1.0, 0.0)
    stats = sequence_rows_stats(tile, None, targets, 1.0, 0.0)
    for name, ours, expected in zip(("logp", "entropy", "lse", "log_sum_sq"), stats, truth):
        torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=0, msg=name)


def test_columns_masked_by_a_minus_inf_bias_take_no_probability_and_no_gradient():
    n, vocab = 3, 300
    tile = make_tile(n, vocab, torch.float32, False)
    bias = torch.randn(vocab).to(DEVICE)
    masked = torch.zeros(vocab, dtype=torch.bool, device=DEVICE)
    masked[::7] = True
    bias[masked] = float("-inf")
    targets = torch.tensor([1, 2, 299], device=DEVICE)
    grad_logp, grad_entropy = torch.randn(n).to(DEVICE), torch.randn(n).to(DEVICE)
    # The truth: the same rows without the masked columns.
    kept_targets = torch.cumsum(~masked, 0)[targets] - 1
    truth, truth_grad = reference(tile[:, ~masked], bias[~masked], kept_targets, 0.8, 0.0,
                                  grad_logp, grad_entropy)
    stats = sequence_rows_stats(tile, bias, targets, 0.8, 0.0)
    for name, ours, expected in zip(("logp", "entropy", "lse", "log_sum_sq"), stats, truth):
        _assert_close(ours, expected, name)
    sequence_rows_grad(tile, bias, targets, stats[2], stats[1], grad_logp, grad_entropy, 0.8, 0.0)
    assert (tile[:, masked] == 0).all()
    _assert_close(tile[:, ~masked], truth_grad, "gradient")


def test_no_rows():
    tile = torch.empty(0, 33, dtype=torch.bfloat16, device=DEVICE)
    targets = torch.empty(0, dtype=torch.int64, device=DEVICE)
    stats = sequence_rows_stats(tile, None, targets, 1.0, 0.0)
    assert [(s.shape, s.dtype) for s in stats] == [((0,), torch.float32)] * 4
    empty = torch.empty(0, device=DEVICE)
    sequence_rows_grad(tile, None, targets, empty, empty, empty, None, 1.0, 0.0)
    sequence_rows_grad(tile, None, targets, empty, empty, empty, empty, 1.0, 0.0)


def _good(n=3, vocab=40):
    return dict(tile=torch.randn(n, vocab), bias=torch.randn(vocab),
                targets=torch.randint(0, vocab, (n,)), lse=torch.zeros(n),
                entropy=torch.zeros(n), grad_logp=torch.zeros(n), grad_entropy=torch.zeros(n))


BAD = [
    ("tile", dict(tile=torch.randn(3, 40, dtype=torch.float64)), TypeError),
    ("tile", dict(tile=torch.randn(120)), ValueError),
    ("tile", dict(tile=torch.randn(40, 3).T), ValueError),
    ("tile", dict(tile=torch.randn(3, 0)), ValueError),
    ("bias", dict(bias=torch.randn(41)), ValueError),
    ("bias", dict(bias=torch.randn(40, dtype=torch.bfloat16)), TypeError),
    ("targets", dict(targets=torch.zeros(3, dtype=torch.int32)), TypeError),
    ("targets", dict(targets=torch.zeros(4, dtype=torch.int64)), ValueError),
    ("targets", dict(targets=torch.zeros(3, 1, dtype=torch.int64)), ValueError),
]
BAD_GRAD = [
    ("lse", dict(lse=torch.zeros(3, dtype=torch.float64)), TypeError),
    ("entropy", dict(entropy=torch.zeros(2)), ValueError),
    ("grad_logp", dict(grad_logp=torch.zeros(6)[::2]), ValueError),
    ("grad_entropy", dict(grad_entropy=torch.zeros(3, dtype=torch.bfloat16)), TypeError),
]


@pytest.mark.parametrize("name, change, error", BAD + BAD_GRAD,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD + BAD_GRAD)])
def test_bad_inputs_raise_errors_that_name_the_argument(name, change, error):
    args = {**_good(), **change}
    with pytest.raises(error, match=f"^{name} "):
        sequence_rows_grad(args["tile"], args["bias"], args["targets"], args["lse"],
                           args["entropy"], args["grad_logp"], args["grad_entropy"], 1.0, 0.0)
    if name in ("tile", "bias", "targets"):
        with pytest.raises(error, match=f"^{name} "):
            sequence_rows_stats(args["tile"], args["bias"], args["targets"], 1.0, 0.0)
