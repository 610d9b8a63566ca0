"""GAE: every implementation against the reference scan, and the reference against the formula."""

import pytest
import torch
from helpers import impl_device, impl_is_available

import fastalign
from fastalign import gae
from fastalign.ops.gae import gae_reference

IMPLS = ("triton", "cpp", "reference")


def _require(impl):
    if not impl_is_available(impl):
        pytest.skip(f"{impl} is not available here: {fastalign.available_implementations()}")


def _inputs(batch, length, *, seed=0, dtype=torch.float32, device="cpu", holes=True):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    # Left prompt, then a response, then right padding; with holes inside some responses.
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        start = int(torch.randint(0, length, (1,), generator=gen))
        end = int(torch.randint(start, length + 1, (1,), generator=gen))
        mask[b, start:end] = True
    if holes:
        mask &= torch.rand(batch, length, generator=gen) > 0.15
    if batch > 1:
        mask[1] = False  # an empty response
    return rewards.to(device, dtype), values.to(device, dtype), mask.to(device)


def test_reference_equals_the_textbook_recursion_on_a_contiguous_response():
    """On one full-length response the scan is A_t = Σ_k (γλ)^k δ_{t+k}, V past the end = 0."""
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.5, -1.0, 2.0, 0.25]], dtype=torch.float64)
    values = torch.tensor([[0.1, 0.4, -0.3, 0.7]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    advantages, returns = gae_reference(rewards, values, mask, gamma=gamma, lam=lam)
    r, v = rewards[0].tolist(), values[0].tolist() + [0.0]
    deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(4)]
    expected = [sum((gamma * lam) ** k * deltas[t + k] for k in range(4 - t)) for t in range(4)]
    assert torch.allclose(advantages[0], torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(returns, advantages + values)


def test_masked_out_positions_are_skipped_not_zeroed_into_the_chain():
    """A hole in the mask must behave as if the masked-out token did not exist."""
    rewards = torch.tensor([[1.0, 9.0, 2.0, 3.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 7.0, 0.25, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True]])
    advantages, returns = gae_reference(rewards, values, mask, gamma=0.95, lam=0.9)
    squeezed = gae_reference(rewards[:, [0, 2, 3]], values[:, [0, 2, 3]],
                             torch.ones(1, 3, dtype=torch.bool), gamma=0.95, lam=0.9)
    assert torch.allclose(advantages[:, [0, 2, 3]], squeezed[0])
    assert advantages[0, 1] == 0 and returns[0, 1] == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 17), (37, 64), (3, 1)], ids=str)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.5, 0.0)])
def test_matches_reference(impl, shape, gamma, lam):
    _require(impl)
    rewards, values, mask = _inputs(*shape, device=impl_device(impl))
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam, impl=impl)
    truth_a, truth_r = gae_reference(rewards.double().cpu(), values.double().cpu(), mask.cpu(),
                                     gamma=gamma, lam=lam)
    assert advantages.dtype == torch.float32 and advantages.shape == shape
    torch.testing.assert_close(advantages.double().cpu(), truth_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns.double().cpu(), truth_r, atol=1e-5, rtol=1e-5)
    assert (advantages.cpu()[~mask.cpu()] == 0).all() and (returns.cpu()[~mask.cpu()] == 0).all()


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_float64_stays_float64(impl):
    _require(impl)
    rewards, values, mask = _inputs(4, 9, dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, impl=impl)
    truth_a, truth_r = gae_reference(rewards, values, mask)
    assert advantages.dtype == torch.float64
    torch.testing.assert_close(advantages, truth_a, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(returns, truth_r, atol=1e-12, rtol=1e-12)


def test_bfloat16_inputs_and_integer_mask_are_accepted_and_results_are_detached():
    rewards, values, mask = _inputs(3, 8, dtype=torch.bfloat16)
    values.requires_grad_()
    advantages, returns = gae(rewards, values, mask.long())
    assert advantages.dtype == torch.float32 and not returns.requires_grad
    truth_a, _ = gae_reference(rewards.float(), values.detach().float(), mask)
    torch.testing.assert_close(advantages, truth_a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=1.5), "gamma must lie in"),
    (dict(lam=-0.1), "lam must lie in"),
    (dict(gamma=float("nan")), "gamma must lie in"),
    (dict(impl="cuda"), "impl must be one of"),
])
def test_bad_options_are_named(kwargs, match):
    rewards, values, mask = _inputs(2, 4)
    with pytest.raises(ValueError, match=match):
        gae(rewards, values, mask, **kwargs)


def test_bad_shapes_and_dtypes_are_named():
    rewards, values, mask = _inputs(2, 4)
    with pytest.raises(ValueError, match="same shape"):
        gae(rewards, values[:, :3], mask)
    with pytest.raises(ValueError, match=r"rewards must be 2-D"):
        gae(rewards[0], values[0], mask[0])
    with pytest.raises(TypeError, match="mask must be a bool"):
        gae(rewards, values, mask.float())
    with pytest.raises(TypeError, match="rewards must be float"):
        gae(rewards.long(), values, mask)
