"""linear_argmax against torch.argmax of the materialised logits, and linear_logit_stats' mean
and log Σ p² against the same logits in float64.

Ground truth: ``torch.argmax`` of the reference's logits (softcap and temperature applied).
Where the two largest logits of a row are nearly equal, the order of the float32 sums decides
the arg-max and neither answer is wrong, so rows are compared where the float64 logits of the
same inputs have a clear winner; ties are tested separately with exactly equal integer logits.
"""

import pytest
import torch

from fastalign import (
    linear_argmax,
    linear_argmax_reference,
    linear_logit_stats,
    linear_logit_stats_reference,
    sequence_logprobs_from_labels,
)
from fastalign.ops.linear_logprobs import reference_logits

# (id, leading shape, H, V, bias, options, block_rows, block_vocab): small blocks give many
# tiles of rows and vocabulary, the last of each ragged.
CASES = [
    ("round", (64,), 32, 256, False, {}, 16, 64),
    ("awkward-3d", (3, 47), 31, 123, True, {}, 40, 16),
    ("vocab-1", (5,), 16, 1, False, {}, 2, 7),
    ("one-row", (1,), 24, 997, True, {}, 1024, 100),
    ("softcap-temperature", (2, 13), 20, 211, True, {"softcap": 5.0, "temperature": 0.7},
     8, 50),
    ("default-blocks", (7,), 8, 5000, True, {}, None, None),
]


def _inputs(shape, hidden_size, vocab_size, with_bias, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Logits of a few units: a softcap of 5 bends them, without saturating tanh in float32.
    hidden = torch.randn(*shape, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab_size, hidden_size, generator=gen) / hidden_size**0.5).to(dtype)
    bias = torch.randn(vocab_size, generator=gen).to(dtype) if with_bias else None
    return hidden, weight, bias


def _case_inputs(case, dtype):
    """(hidden, weight, bias, head options, tile sizes) of one of CASES."""
    _, shape, hidden_size, vocab_size, with_bias, options, block_rows, block_vocab = case
    hidden, weight, bias = _inputs(shape, hidden_size, vocab_size, with_bias, dtype)
    blocks = {} if block_rows is None else {"block_rows": block_rows, "block_vocab": block_vocab}
    return hidden, weight, bias, options, blocks


def _clear_winner(hidden, weight, bias, margin=1e-3):
    """bool [...]: rows whose largest float64 logit beats the second by more than ``margin``."""
    logits = reference_logits(hidden, weight, bias, 1.0, None, torch.float64)
    if logits.shape[-1] == 1:
        return torch.ones(logits.shape[:-1], dtype=torch.bool)
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1] > margin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_matches_torch_argmax_of_the_logits(case, dtype):
    hidden, weight, bias, options, blocks = _case_inputs(case, dtype)
    shape = hidden.shape[:-1]
    ours = linear_argmax(hidden, weight, bias=bias, **options, **blocks)
    logits = reference_logits(hidden, weight, bias, options.get("temperature", 1.0),
                              options.get("softcap"), torch.float32)
    expected = torch.argmax(logits, dim=-1)
    assert ours.dtype == torch.int64 and ours.shape == shape
    clear = _clear_winner(hidden, weight, bias)
    assert clear.float().mean() > 0.95  # the comparison covers nearly every row
    assert torch.equal(ours[clear], expected[clear])
    assert torch.equal(linear_argmax_reference(hidden, weight, bias=bias, **options)[clear],
                       expected[clear])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_mean_logits_match_the_materialised_mean(case, dtype):
    """TRL's mean_logits: the closed form without softcap, the tiled sum with one."""
    hidden, weight, bias, options, blocks = _case_inputs(case, dtype)
    shape = hidden.shape[:-1]
    ours = linear_logit_stats(hidden, weight, bias=bias, mean_logits=True, **options,
                              **blocks).mean_logits
    expected = reference_logits(hidden, weight, bias, options.get("temperature", 1.0),
                                options.get("softcap"), torch.float64).mean(-1)
    assert ours.shape == shape and not ours.requires_grad
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)
    if "softcap" in options:  # the softcap bends the logits: the linear shortcut would be wrong
        plain = reference_logits(hidden, weight, bias, options["temperature"], None,
                                 torch.float64).mean(-1)
        assert (plain - expected).abs().max() > 1e-3


def test_non_contiguous_and_empty_inputs():
    hidden, weight, bias = _inputs((6, 10), 24, 150, True, torch.float32)
    hidden_t = hidden.transpose(0, 1)  # [10, 6, 24], not contiguous
    ours = linear_argmax(hidden_t, weight[::2], bias=bias[::2], block_rows=7, block_vocab=11)
    torch.testing.assert_close(ours, linear_argmax(hidden_t.contiguous(),
                                                   weight[::2].contiguous(),
                                                   bias=bias[::2].contiguous()))
    clear = _clear_winner(hidden_t, weight[::2], bias[::2])
    assert torch.equal(ours[clear],
                       linear_argmax_reference(hidden_t, weight[::2], bias=bias[::2])[clear])
    assert linear_argmax(hidden[:0], weight).shape == (0, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ties_go_to_the_lowest_index_across_and_within_tiles(dtype):
    """Integer-valued inputs give exact logits: rows 5, 6 (same tile) and 100 (another tile) of
    the head are equal and beat every other row for every hidden state."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(-2, 3, (123, 31), generator=gen).float()
    winner = torch.randint(6, 9, (31,), generator=gen).float()
    weight[[5, 6, 100]] = winner
    hidden = winner + torch.randint(-1, 2, (9, 31), generator=gen).float()
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    logits = hidden.double() @ weight.double().T
    assert (logits[:, 5] == logits[:, 100]).all()
    assert (logits[:, 5:6] > logits[:, [i for i in range(123) if i not in (5, 6, 100)]]).all()
    expected = torch.full((9,), 5)
    assert torch.equal(torch.argmax(logits, dim=-1), expected)  # torch's rule, which we follow
    assert torch.equal(linear_argmax(hidden, weight, block_rows=4, block_vocab=16), expected)
    assert torch.equal(linear_argmax(hidden, weight), expected)
    # A tie between the last row of one tile and the first of the next.
    weight[[15, 16]] = weight[5] + 1
    expected.fill_(15)
    assert torch.equal(linear_argmax(hidden, weight, block_rows=4, block_vocab=16), expected)


def test_bad_arguments_name_the_argument():
    hidden, weight, _ = _inputs((4,), 8, 10, False, torch.float32)
    with pytest.raises(ValueError, match="hidden's last dimension"):
        linear_argmax(hidden[:, :7], weight)
    with pytest.raises(ValueError, match="temperature"):
        linear_argmax(hidden, weight, temperature=0.0)
    with pytest.raises(ValueError, match="block_vocab"):
        linear_argmax(hidden, weight, block_vocab=0)
    with pytest.raises((TypeError, ValueError), match="dtype"):
        linear_argmax(hidden.double(), weight)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sequence_logprobs_predictions_are_the_argmax_at_scored_positions(packed):
    hidden, weight, bias = _inputs((2, 9), 16, 70, True, torch.float32)
    labels = torch.randint(0, 70, (2, 9), generator=torch.Generator().manual_seed(1))
    labels[0, :4] = -100  # a prompt
    cu_seqlens = None
    if packed:
        hidden, labels, cu_seqlens = hidden.reshape(18, 16), labels.reshape(18), torch.tensor(
            [0, 9, 18])
    out = sequence_logprobs_from_labels(hidden, weight, labels, cu_seqlens=cu_seqlens, bias=bias,
                                        softcap=3.0, return_predictions=True)
    expected = linear_argmax_reference(hidden, weight, bias=bias, softcap=3.0)
    expected = expected if packed else expected[:, :-1]  # position T - 1 predicts nothing
    clear = _clear_winner(hidden, weight, bias)
    clear = clear if packed else clear[:, :-1]
    mask = out.token_mask
    assert mask.sum() > 8 and (~mask).sum() >= 3
    assert torch.equal(out.token_predictions[mask & clear], expected[mask & clear])
    assert (out.token_predictions[~mask] == -100).all()
    assert sequence_logprobs_from_labels(hidden, weight, labels, cu_seqlens=cu_seqlens,
                                         bias=bias).token_predictions is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_mean_logits_and_log_sum_sq_probs_match_the_materialised_logits(case, dtype):
    _, shape, hidden_size, vocab_size, with_bias, options, block_rows, block_vocab = case
    hidden, weight, bias = _inputs(shape, hidden_size, vocab_size, with_bias, dtype)
    blocks = {} if block_rows is None else {"block_rows": block_rows, "block_vocab": block_vocab}
    ours = linear_logit_stats(hidden, weight, bias=bias, mean_logits=True, log_sum_sq_probs=True,
                              **options, **blocks)
    # Ground truth in float64 from the same (rounded) inputs: only our float32 sums differ.
    logits = reference_logits(hidden, weight, bias, options.get("temperature", 1.0),
                              options.get("softcap"), torch.float64)
    assert ours.argmax is None
    torch.testing.assert_close(ours.mean_logits, logits.mean(-1).float(), rtol=1e-5, atol=1e-5)
    want = torch.logsumexp(2 * torch.log_softmax(logits, dim=-1), dim=-1).float()
    torch.testing.assert_close(ours.log_sum_sq_probs, want, rtol=1e-5, atol=1e-5)
    assert (ours.log_sum_sq_probs <= 0).all()  # Σ p² ≤ 1
    reference = linear_logit_stats_reference(hidden.double(), weight.double(),
                                             bias=None if bias is None else bias.double(),
                                             **options)
    torch.testing.assert_close(reference.log_sum_sq_probs, want.double(), rtol=1e-5, atol=1e-5)


def test_log_sum_sq_probs_of_a_peaked_and_a_flat_distribution():
    """One row puts all its mass on one token (Σ p² → 1), another is uniform (Σ p² = 1/V): the
    online rescaling must survive logits far from 0 in both directions."""
    vocab = 50
    weight = torch.eye(vocab, 4).mul(400.0) - 200.0
    hidden = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    stats = linear_logit_stats(hidden, weight, log_sum_sq_probs=True, mean_logits=True,
                               block_vocab=7)
    assert stats.log_sum_sq_probs[0].abs() < 1e-6
    torch.testing.assert_close(stats.log_sum_sq_probs[1], torch.tensor(-float(torch.log(
        torch.tensor(float(vocab))))))
    torch.testing.assert_close(stats.mean_logits, (hidden @ weight.T).mean(-1))
