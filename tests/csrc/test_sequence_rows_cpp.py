"""The sequence-loss engine's C++ row passes (fastalign._C.sequence_rows_stats and
sequence_rows_grad) against a float64 materialising formula with autograd's gradient.

A tile holds raw logits a of whole vocabulary rows; z = softcap·tanh((a + b)/softcap)/T. The
stats pass leaves the tile as it was; the gradient pass overwrites it with ∂L/∂a of
L = Σ grad_logp·logp + grad_entropy·entropy.
"""

import math

import pytest
import torch
from helpers import assert_close_fp32

from fastalign.ops._extension import EXTENSION

# Skipped only where the extension is not built at all: a built one must have the row passes.
pytestmark = pytest.mark.skipif(EXTENSION is None, reason="the C++ extension is not built here")

STAT_NAMES = ("logp", "entropy", "lse", "sum_pz", "log_sum_sq")


def _inputs(n, vocab, dtype, *, bias, logit_scale=6.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tile = (torch.randn(n, vocab, generator=generator, dtype=torch.float64) * logit_scale)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    # every third row's target dominates (p_y near 1)
    tile[::3].scatter_add_(1, targets[::3, None], torch.full((len(targets[::3]), 1), 25.0,
                                                             dtype=torch.float64))
    b = torch.randn(vocab, generator=generator, dtype=torch.float64) if bias else None
    grad_logp = torch.randn(n, generator=generator, dtype=torch.float64)
    grad_entropy = torch.randn(n, generator=generator, dtype=torch.float64)
    b = None if b is None else b.to(dtype)
    return tile.to(dtype), b, targets, grad_logp.to(dtype), grad_entropy.to(dtype)


def _truth(tile, bias, targets, grad_logp, grad_entropy, temperature, softcap):
    """The five statistics and ∂L/∂a in float64, materialised, the gradient from autograd."""
    a = tile.detach().double().requires_grad_()
    x = a if bias is None else a + bias.double()
    z = (softcap * torch.tanh(x / softcap) if softcap else x) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    stats = {
        "logp": log_p.gather(1, targets[:, None])[:, 0],
        "entropy": -(p * log_p).sum(-1),
        "lse": torch.logsumexp(z, dim=-1),
        "sum_pz": (p * z).sum(-1),
        "log_sum_sq": torch.log((p * p).sum(-1)),
    }
    loss = (grad_logp.double() * stats["logp"]).sum()
    if grad_entropy is not None:
        loss = loss + (grad_entropy.double() * stats["entropy"]).sum()
    (grad,) = torch.autograd.grad(loss, a)
    return {name: value.detach() for name, value in stats.items()}, grad


def _run(tile, bias, targets, grad_logp, grad_entropy, temperature, softcap,
         float64_stats=False):
    """(stats, gradient) from the two C++ passes; checks the stats pass leaves the tile alone."""
    before = tile.clone()
    stats = EXTENSION.sequence_rows_stats(tile, bias, targets, temperature, softcap,
                                          float64_stats=float64_stats)
    assert torch.equal(tile, before), "sequence_rows_stats modified the tile"
    stats = dict(zip(STAT_NAMES, stats))
    for name, stat in stats.items():
        wide = float64_stats and name in ("lse", "sum_pz")
        assert stat.dtype == (torch.float64 if wide else tile.dtype), name
        assert stat.shape == (tile.shape[0],), name
    EXTENSION.sequence_rows_grad(tile, bias, targets, stats["lse"], stats["sum_pz"], grad_logp,
                                 grad_entropy, temperature, softcap)
    return stats, tile


def _check(stats, grad, truth_stats, truth_grad, dtype):
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    for name in STAT_NAMES:
        assert_close_fp32(stats[name], truth_stats[name], name, rtol=rtol)
    assert_close_fp32(grad, truth_grad, "grad", rtol=rtol)


@pytest.mark.parametrize("float64_stats", [False, True], ids=["stats", "f64-stats"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_grad_entropy", [True, False], ids=["dH", "no-dH"])
@pytest.mark.parametrize("softcap", [0.0, 30.0, 2.0], ids=["no-cap", "cap30", "cap2"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("vocab", [33, 1000, 4001])
def test_rows_match_float64_autograd(vocab, bias, softcap, with_grad_entropy, dtype,
                                     float64_stats):
    tile, b, targets, grad_logp, grad_entropy = _inputs(7, vocab, dtype, bias=bias)
    grad_entropy = grad_entropy if with_grad_entropy else None
    truth_stats, truth_grad = _truth(tile, b, targets, grad_logp, grad_entropy, 0.7, softcap)
    stats, grad = _run(tile, b, targets, grad_logp, grad_entropy, 0.7, softcap, float64_stats)
    _check(stats, grad, truth_stats, truth_grad, dtype)


def test_float64_stats_keep_the_gradient_of_a_dominant_target():
    """Σ_v ∂logp/∂a_v = (1 − Σ_v p_v)/T = 0 (no softcap). With lse rounded to float32 at
    |lse| ≈ 100, every p is off by up to 3e-6 relative, so the row sums to that much of g: a
    twentieth of the whole gradient of a target with 1 − p_y ≈ 1e-4. float64 stats (split into
    hi + lo parts by the gradient pass) leave only the rounding of each entry."""
    generator = torch.Generator().manual_seed(1)
    n, vocab = 16, 1000
    tile = torch.randn(n, vocab, generator=generator, dtype=torch.float64) * 0.3 + 60.0
    targets = torch.randint(0, vocab, (n,), generator=generator)
    # the target 100·V times as likely as the other tokens together
    tile[torch.arange(n), targets] = 60.0 + 0.7 * math.log(100.0 * vocab)
    tile = tile.float()
    row_sums = {}
    for float64_stats in (False, True):
        _, grad = _run(tile.clone(), None, targets, torch.ones(n), None, 0.7, 0.0, float64_stats)
        grad = grad.double()
        row_sums[float64_stats] = (grad.sum(1).abs() / grad.abs().amax(1)).max().item()
    assert row_sums[True] < 1e-4, row_sums
    assert row_sums[False] > 5 * row_sums[True], row_sums


@pytest.mark.parametrize("softcap", [0.0, 30.0], ids=["no-cap", "cap30"])
@pytest.mark.parametrize("vocab", [33, 1000])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_every_instruction_set(isa, vocab, softcap, monkeypatch):
    """Each instruction set's kernels (the CPU picks the widest by default; the others are forced
    here), with a vocabulary that is not a multiple of any vector width."""
    monkeypatch.setenv("FASTALIGN_CPU_ISA", isa)
    tile, b, targets, grad_logp, grad_entropy = _inputs(5, vocab, torch.float32, bias=True)
    truth_stats, truth_grad = _truth(tile, b, targets, grad_logp, grad_entropy, 0.7, softcap)
    try:
        stats, grad = _run(tile, b, targets, grad_logp, grad_entropy, 0.7, softcap)
    except ValueError as exc:
        if "not supported by this CPU" in str(exc):
            pytest.skip(str(exc))
        raise
    _check(stats, grad, truth_stats, truth_grad, torch.float32)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rows_over_several_threads_match_one_thread(temperature):
    """Enough rows for at::parallel_for to split them: every row gets its own answer."""
    tile, b, targets, grad_logp, grad_entropy = _inputs(64, 1000, torch.float32, bias=False)
    stats, grad = _run(tile.clone(), b, targets, grad_logp, grad_entropy, temperature, 30.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_stats, one_grad = _run(tile.clone(), b, targets, grad_logp, grad_entropy,
                                   temperature, 30.0)
    finally:
        torch.set_num_threads(threads)
    for name in STAT_NAMES:
        assert torch.equal(stats[name], one_stats[name]), name
    assert torch.equal(grad, one_grad)


def test_the_gradient_pass_tells_autograd_it_wrote_the_tile():
    tile, _, targets, grad_logp, _ = _inputs(2, 33, torch.float32, bias=False)
    version = tile._version
    _run(tile, None, targets, grad_logp, None, 1.0, 0.0)
    assert tile._version > version


def test_no_rows():
    tile = torch.empty(0, 11)
    targets = torch.empty(0, dtype=torch.long)
    stats = EXTENSION.sequence_rows_stats(tile, None, targets, 1.0, 0.0)
    assert [s.shape for s in stats] == [(0,)] * 5
    none = torch.empty(0)
    assert EXTENSION.sequence_rows_grad(tile, None, targets, none, none, none, None, 1.0,
                                        0.0) is None


def _bad(**change):
    """Valid arguments of the gradient pass, with `change` applied."""
    n, vocab = 3, 10
    args = dict(tile=torch.randn(n, vocab), bias=torch.randn(vocab),
                targets=torch.tensor([0, 9, 4]), lse=torch.zeros(n), sum_pz=torch.zeros(n),
                grad_logp=torch.zeros(n), grad_entropy=torch.zeros(n), temperature=1.0,
                softcap=0.0)
    args.update(change)
    return args


BAD = [
    (dict(tile=torch.randn(3, 10, dtype=torch.float16)), TypeError, "tile must be float32"),
    (dict(tile=torch.randn(10, 3).t()), ValueError, "tile .* must be contiguous"),
    (dict(tile=torch.randn(30)), ValueError, "tile .* must be 2-D"),
    (dict(bias=torch.randn(10, dtype=torch.float64)), TypeError, "bias must have tile's dtype"),
    (dict(bias=torch.randn(9)), ValueError, r"bias must have shape \[V\] = \[10\]"),
    (dict(targets=torch.tensor([0, 10, 4])), ValueError,
     r"targets must lie in \[0, V\) = \[0, 10\); found 10 at position 1"),
    (dict(targets=torch.tensor([0, -1, 4])), ValueError,
     "targets must lie .* found -1 at position 1"),
    (dict(targets=torch.tensor([0, 1, 4], dtype=torch.int32)), TypeError, "targets must be int64"),
    (dict(targets=torch.tensor([0, 1])), ValueError, r"targets must have shape \[N\] = \[3\]"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be finite and >= 0"),
]
GRAD_BAD = [
    (dict(lse=torch.zeros(4)), ValueError, r"lse must have shape \[N\] = \[3\]"),
    (dict(sum_pz=torch.zeros(3, dtype=torch.float16)), TypeError, "sum_pz must be"),
    (dict(grad_logp=torch.zeros(6)[::2]), ValueError, "grad_logp must be contiguous"),
    (dict(grad_entropy=torch.zeros(3, 1)), ValueError, "grad_entropy must be 1-D"),
    (dict(lse=torch.zeros(3, dtype=torch.float16)), TypeError,
     r"lse must be Float \(tile's dtype\) or float64"),
]


@pytest.mark.parametrize(("change", "error", "match", "stats_too"),
                         [(*bad, True) for bad in BAD] + [(*bad, False) for bad in GRAD_BAD])
def test_bad_arguments_name_the_argument(change, error, match, stats_too):
    args = _bad(**change)
    before = args["tile"].clone()
    with pytest.raises(error, match=f"sequence_rows_grad: {match}"):
        EXTENSION.sequence_rows_grad(**args)
    assert torch.equal(args["tile"], before), "a rejected call wrote to the tile"
    if stats_too:
        stats_args = {k: args[k] for k in ("tile", "bias", "targets", "temperature", "softcap")}
        with pytest.raises(error, match=f"sequence_rows_stats: {match}"):
            EXTENSION.sequence_rows_stats(**stats_args)
