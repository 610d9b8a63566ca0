"""The Triton backward's two strategies, chunked (the default) and atomic, against float64.

``FASTALIGN_TRITON_BACKWARD=chunked`` writes ∂L/∂logits of a chunk of tokens into a workspace
and takes dh and dW from matrix products of it; ``atomic`` adds every tile's share with float32
atomics. Both must give the float64 reference's gradients. The chunked one is run with a
workspace of a few tokens (``FASTALIGN_BACKWARD_WORKSPACE_MIB``), so that the tests cross many
chunk boundaries; the other op tests run it at its default workspace.
"""

import math

import pytest
import torch
from helpers import (
    assert_close_fp32,
    assert_low_precision_ok,
    eager_same_dtype,
    impl_is_available,
    make_inputs,
    run,
)
from test_linear_kl import make_kl_inputs, run_kl

from fastalign.kernels import _launch

pytestmark = pytest.mark.skipif(not impl_is_available("triton"),
                                reason="Triton is not available here")

STRATEGIES = ("chunked", "atomic")


def _use(monkeypatch, strategy: str, rows_per_chunk: int, vocab_size: int, itemsize: int,
         heads: int = 1):
    monkeypatch.setenv("FASTALIGN_TRITON_BACKWARD", strategy)
    mib = rows_per_chunk * vocab_size * itemsize * heads / 2**20
    monkeypatch.setenv("FASTALIGN_BACKWARD_WORKSPACE_MIB", repr(mib))
    assert _launch.chunk_rows(10**6, vocab_size, vocab_size * itemsize * heads) == rows_per_chunk


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("options", [
    {},
    {"softcap": 30.0, "temperature": 0.7},
    {"ignore_index": 0},
], ids=["plain", "softcap-temperature", "ignore-index-0"])
def test_linear_logprobs_float32(monkeypatch, strategy, options):
    _use(monkeypatch, strategy, rows_per_chunk=7, vocab_size=133, itemsize=4)
    inputs = make_inputs((3, 11), 24, 133, bias=True, options=options,
                         logit_scale=40.0 if "softcap" in options else 3.0)
    ours = run(inputs, impl="triton")
    truth = run(inputs, upcast=torch.float64)
    assert_close_fp32(ours.logp, truth.logp, "logp")
    for name, grad in truth.grads.items():
        assert_close_fp32(ours.grads[name], grad, f"d{name}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_linear_logprobs_bfloat16_against_float32_truth(monkeypatch, strategy):
    _use(monkeypatch, strategy, rows_per_chunk=5, vocab_size=150, itemsize=2)
    inputs = make_inputs((23,), 32, 150, bias=True, dtype=torch.bfloat16)
    ours = run(inputs, impl="triton")
    truth = run(inputs, upcast=torch.float64)
    theirs = eager_same_dtype(inputs)
    for name, grad in truth.grads.items():
        assert ours.grads[name].dtype == torch.bfloat16
        assert_low_precision_ok(ours.grads[name], theirs.grads[name], grad, f"d{name}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_in_an_ignored_row_stays_out_of_the_gradients(monkeypatch, strategy):
    """A padding row's hidden state may be anything (NaN): its target is ignored, so it must
    reach no gradient, not even as 0 · NaN in dW's matrix product."""
    _use(monkeypatch, strategy, rows_per_chunk=4, vocab_size=60, itemsize=4)
    inputs = make_inputs((10,), 16, 60, ignore_fraction=0.0)
    inputs.targets[[3, 8]] = -100
    inputs.hidden[[3, 8]] = float("nan")
    ours = run(inputs, impl="triton")
    clean = inputs.hidden.clone()
    clean[[3, 8]] = 0.0
    inputs.hidden = clean
    truth = run(inputs, upcast=torch.float64)
    assert torch.isfinite(ours.grads["weight"]).all()
    assert_close_fp32(ours.grads["weight"], truth.grads["weight"], "dweight")
    assert torch.all(ours.grads["hidden"][[3, 8]] == 0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("grads", ["policy", "both"])
def test_linear_kl_float32(monkeypatch, strategy, grads):
    grad_ref = grads == "both"
    _use(monkeypatch, strategy, rows_per_chunk=6, vocab_size=97, itemsize=4,
         heads=2 if grad_ref else 1)
    tensors, mask, upstream = make_kl_inputs((3, 9), 20, 97, ref_hidden_size=12, bias=True,
                                             ref_bias=True, mask_fraction=0.3)
    ours = run_kl(tensors, mask, upstream, impl="triton", grad_ref=grad_ref,
                  options={"softcap": 30.0, "temperature": 0.9})
    truth = run_kl(tensors, mask, upstream, upcast=torch.float64, grad_ref=grad_ref,
                   options={"softcap": 30.0, "temperature": 0.9})
    for name, grad in truth[1].items():
        assert_close_fp32(ours[1][name], grad, f"d{name}")


def test_the_default_workspace_is_at_most_5_percent_of_eagers_logits(monkeypatch):
    monkeypatch.delenv("FASTALIGN_BACKWARD_WORKSPACE_MIB", raising=False)
    monkeypatch.delenv("FASTALIGN_TRITON_BACKWARD", raising=False)
    assert _launch.backward_strategy() == "chunked"
    for n_tokens, vocab_size, itemsize in ((16384, 128256, 2), (4096, 32000, 4), (700, 50257, 2)):
        rows = _launch.chunk_rows(n_tokens, vocab_size, vocab_size * itemsize)
        assert rows * vocab_size * itemsize <= 0.05 * n_tokens * vocab_size * 4
        assert rows >= _launch.MIN_CHUNK_ROWS
    # Below MIN_CHUNK_ROWS / 5 % the floor holds: one small chunk rather than many tiny ones.
    assert _launch.chunk_rows(100, 1000, 2000) == _launch.MIN_CHUNK_ROWS
    assert _launch.chunk_rows(10, 1000, 2000) == 10


@pytest.mark.parametrize("name, value", [("FASTALIGN_TRITON_BACKWARD", "fast"),
                                         ("FASTALIGN_BACKWARD_WORKSPACE_MIB", "-1"),
                                         ("FASTALIGN_BACKWARD_WORKSPACE_MIB", "lots")])
def test_bad_settings_are_refused_by_name(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    inputs = make_inputs((4,), 8, 20)
    with pytest.raises(ValueError, match=name):
        run(inputs, impl="triton")


def test_a_chunk_holds_what_its_budget_allows(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKWARD_WORKSPACE_MIB", "1")
    assert _launch.chunk_rows(10**6, 1024, 1024 * 2) == 512
    assert _launch.chunk_rows(100, 1024, 1024 * 2) == 100
    assert math.isclose(_launch.WORKSPACE_FRACTION, 0.05)
