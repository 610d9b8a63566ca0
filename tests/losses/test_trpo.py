"""TRPO's step: Fisher-vector products of the exact fused KL against an explicit Fisher matrix,
conjugate gradient against a direct solve, and the trust region kept by every accepted step.

The reference at the top materialises everything: the logits of a tiny two-layer policy, their
Jacobian (``torch.autograd.functional.jacobian``) and the Fisher matrix
F = mean_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastalign import linear_kl, linear_logprobs
from fastalign.losses.trpo import (
    FisherVectorProduct,
    TRPOOptions,
    conjugate_gradient,
    kl_line_search,
    trpo_step,
)
from fastalign.ops.linear_kl import linear_kl_reference

N, D, H, V = 20, 6, 16, 50
TEMPERATURE = 0.7

# ----------------------------------------------------------------------------------------------
# A tiny policy: h = tanh(x·Aᵀ), logits = (h·Wᵀ + b) / T; and its materialised Fisher matrix
# ----------------------------------------------------------------------------------------------


class TinyPolicy:
    def __init__(self, seed=0, n=N, d=D, h=H, v=V, dtype=torch.float64):
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(n, d, generator=generator, dtype=dtype)
        self.params = [(torch.randn(h, d, generator=generator, dtype=dtype) / math.sqrt(d)),
                       torch.randn(v, h, generator=generator, dtype=dtype),
                       0.5 * torch.randn(v, generator=generator, dtype=dtype)]
        for p in self.params:
            p.requires_grad_()
        self.old = [p.detach().clone() for p in self.params]
        self.targets = torch.randint(0, v, (n,), generator=generator)
        self.advantages = torch.randn(n, generator=generator, dtype=dtype)
        self.old_logps = self.logps().detach()

    def hidden(self, params=None):
        return torch.tanh(self.inputs @ (params or self.params)[0].T)

    def logits(self, params):
        return (self.hidden(params) @ params[1].T + params[2]) / TEMPERATURE

    def logps(self):
        return linear_logprobs(self.hidden(), self.params[1], self.targets, bias=self.params[2],
                               temperature=TEMPERATURE)

    def kl(self):
        """The mean exact KL(π_old ‖ π_θ), fused."""
        return linear_kl(self.hidden(), self.params[1], self.hidden(self.old), self.old[1],
                         bias=self.params[2], ref_bias=self.old[2], reverse=True,
                         temperature=TEMPERATURE).mean()

    def kl_parts(self):
        """The same KL as two parts (micro-batches) summing to it."""
        half = len(self.inputs) // 2
        for rows in (slice(None, half), slice(half, None)):
            hidden = torch.tanh(self.inputs[rows] @ self.params[0].T)
            old_hidden = torch.tanh(self.inputs[rows] @ self.old[0].T)
            kl = linear_kl(hidden, self.params[1], old_hidden, self.old[1], bias=self.params[2],
                           ref_bias=self.old[2], reverse=True, temperature=TEMPERATURE)
            yield kl.sum() / len(self.inputs)

    def materialised_kl(self):
        with torch.no_grad():
            return float(linear_kl_reference(
                self.hidden(), self.params[1], self.hidden(self.old), self.old[1],
                bias=self.params[2], ref_bias=self.old[2], reverse=True,
                temperature=TEMPERATURE).mean())

    def surrogate(self):
        return (torch.exp(self.logps() - self.old_logps) * self.advantages).mean()

    def fisher(self):
        """F = mean_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t at θ_old, [P, P]."""
        shapes = [p.shape for p in self.old]
        sizes = [p.numel() for p in self.old]

        def flat_logits(theta):
            params = [piece.view(shape) for piece, shape in zip(theta.split(sizes), shapes)]
            return self.logits(params)

        theta = torch.cat([p.reshape(-1) for p in self.old])
        # [N, V, P]
        jacobian = torch.autograd.functional.jacobian(flat_logits, theta, vectorize=True)
        p = torch.softmax(flat_logits(theta), -1)
        covariance = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return torch.einsum("nvp,nvw,nwq->pq", jacobian, covariance, jacobian) / len(p)


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


# ----------------------------------------------------------------------------------------------
# Fisher-vector products
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("difference, rtol", [("central", 1e-7), ("forward", 1e-5)])
@pytest.mark.parametrize("parts", [False, True])
def test_fisher_vector_product_equals_the_explicit_fisher(difference, rtol, parts):
    policy = TinyPolicy()
    fisher = policy.fisher()
    fvp = FisherVectorProduct(policy.params, policy.kl_parts if parts else policy.kl,
                              damping=0.0, difference=difference)
    generator = torch.Generator().manual_seed(1)
    for scale in (1.0, 1e-3, 1e3):  # the perturbation adapts to the vector's size
        vector = scale * torch.randn(fisher.shape[0], generator=generator, dtype=torch.float64)
        expected = fisher @ vector
        torch.testing.assert_close(fvp(vector), expected, rtol=rtol,
                                   atol=rtol * float(expected.abs().max()))
    # The parameters are back where they were, bit for bit.
    for p, p0 in zip(policy.params, policy.old):
        assert torch.equal(p.detach(), p0)
    assert fvp.gradient_passes >= 3 * (2 if difference == "central" else 1)


def test_fisher_vector_product_is_damped_and_float32_is_close():
    policy = TinyPolicy()
    fisher = policy.fisher()
    vector = torch.randn(fisher.shape[0], generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64)
    damped = FisherVectorProduct(policy.params, policy.kl, damping=0.1)(vector)
    torch.testing.assert_close(damped, fisher @ vector + 0.1 * vector, rtol=1e-7, atol=1e-9)

    single = TinyPolicy(dtype=torch.float32)
    fisher32 = single.fisher().double()
    product = FisherVectorProduct(single.params, single.kl, damping=0.0)(vector.float())
    assert product.dtype == torch.float32
    error = float((product.double() - fisher32 @ vector).norm() / (fisher32 @ vector).norm())
    assert error < 1e-3  # float32's ε^(2/3) ≈ 2.4e-5, times the problem's constants


def test_a_vector_the_kl_ignores_gives_zero_curvature():
    policy = TinyPolicy()
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    fvp = FisherVectorProduct([*policy.params, unused], policy.kl, damping=0.5)
    vector = torch.zeros(sum(p.numel() for p in policy.params) + 3, dtype=torch.float64)
    vector[-3:] = 1.0
    torch.testing.assert_close(fvp(vector), 0.5 * vector)


# ----------------------------------------------------------------------------------------------
# Conjugate gradient
# ----------------------------------------------------------------------------------------------


def test_conjugate_gradient_matches_a_direct_solve_of_the_damped_fisher():
    policy = TinyPolicy(n=6, d=3, h=4, v=5)
    fvp = FisherVectorProduct(policy.params, policy.kl, damping=0.1)
    size = sum(p.numel() for p in policy.params)
    damped = policy.fisher() + 0.1 * torch.eye(size, dtype=torch.float64)
    b = torch.randn(size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = conjugate_gradient(fvp, b, iters=3 * size, residual_tol=1e-20)
    expected = torch.linalg.solve(damped, b)
    torch.testing.assert_close(result.solution, expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(result.product, damped @ result.solution, rtol=1e-6, atol=1e-8)
    assert result.residual < 1e-12 and result.iterations <= 3 * size


def test_conjugate_gradient_stops_at_the_tolerance_and_the_iteration_limit():
    matrix = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    b = torch.ones(10, dtype=torch.float64)
    calls = []

    def product(v):
        calls.append(1)
        return matrix @ v

    result = conjugate_gradient(product, b, iters=3, residual_tol=0.0)
    assert result.iterations == len(calls) == 3
    assert result.residual == pytest.approx(float((b - matrix @ result.solution).square().sum()))
    exact = conjugate_gradient(product, b, iters=50, residual_tol=1e-16)
    assert exact.iterations == 10  # n distinct eigenvalues: exact after n steps
    torch.testing.assert_close(exact.solution, b / torch.arange(1.0, 11.0, dtype=torch.float64))
    # A direction without positive curvature stops CG where it is.
    assert conjugate_gradient(lambda v: -v, b).iterations == 0


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_kl", [1e-4, 1e-2, 0.5])
def test_every_accepted_step_keeps_the_exact_kl_within_the_bound(seed, max_kl):
    policy = TinyPolicy(seed=seed)
    before = policy.surrogate().item()
    result = trpo_step(policy.params, policy.surrogate, policy.kl,
                       TRPOOptions(max_kl=max_kl, cg_iters=10))
    assert result.accepted
    assert policy.materialised_kl() <= max_kl
    assert policy.materialised_kl() == pytest.approx(result.kl, rel=1e-9)
    assert policy.surrogate().item() - before == pytest.approx(result.surrogate_improvement,
                                                               rel=1e-9)
    assert result.surrogate_improvement > 0.1 * result.step_fraction * \
        result.expected_improvement > 0
    assert result.cg_iterations == 10 and result.gradient_passes >= 1 + 2 * 10
    assert result.grad_norm > 0 and result.surrogate == pytest.approx(before)


def test_the_step_is_scaled_to_the_trust_region():
    """For a small δ the quadratic model is accurate: the full step is accepted and its KL is δ
    up to damping (which shortens the step) and the model's error."""
    policy = TinyPolicy()
    result = trpo_step(policy.params, policy.surrogate, policy.kl,
                       TRPOOptions(max_kl=1e-5, cg_iters=40, cg_damping=1e-4))
    assert result.accepted and result.step_fraction == 1.0 and result.n_backtracks == 0
    assert 0.5e-5 < policy.materialised_kl() <= 1e-5


def test_a_rejected_step_leaves_the_parameters_unchanged():
    policy = TinyPolicy()
    gradient_direction = [torch.randn_like(p) for p in policy.old]

    def surrogate():  # slope g at θ_old, but any step of trust-region size loses
        shift = [p - p0 for p, p0 in zip(policy.params, policy.old)]
        slope = sum((s * g).sum() for s, g in zip(shift, gradient_direction))
        return slope - 1e9 * sum(s.square().sum() for s in shift)

    result = trpo_step(policy.params, surrogate, policy.kl, TRPOOptions(max_backtracks=3))
    assert not result.accepted and result.step_fraction == 0.0 and result.n_backtracks == 3
    assert result.surrogate_improvement == 0.0
    for p, p0 in zip(policy.params, policy.old):
        assert torch.equal(p.detach(), p0)

    flat = trpo_step(policy.params, lambda: sum(p.sum() * 0.0 for p in policy.params),
                     policy.kl)
    assert not flat.accepted and flat.grad_norm == 0.0 and flat.cg_iterations == 0
    assert (flat.kl, flat.cg_residual, flat.gradient_passes) == (0.0, 0.0, 1)
    for p, p0 in zip(policy.params, policy.old):
        assert torch.equal(p.detach(), p0)


def test_line_search_requires_the_acceptance_ratio_of_the_predicted_gain():
    weight = torch.zeros(3, dtype=torch.float64)
    step = [torch.ones(3, dtype=torch.float64)]

    def surrogate():  # linear: the actual gain of α·step is exactly 3α
        return weight.sum()

    kept = kl_line_search([weight], step, lambda: 0.0, 0.1, surrogate_fn=surrogate,
                          expected_improvement=3.0, accept_ratio=0.9)
    assert kept.accepted and kept.step_fraction == 1.0
    weight.zero_()
    overpromised = kl_line_search([weight], step, lambda: 0.0, 0.1, surrogate_fn=surrogate,
                                  expected_improvement=10.0, accept_ratio=0.5, max_backtracks=2)
    assert not overpromised.accepted and torch.equal(weight, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("options, message", [
    (dict(max_kl=0.0), "max_kl"),
    (dict(cg_iters=0), "cg_iters"),
    (dict(cg_damping=-0.1), "cg_damping"),
    (dict(cg_residual_tol=math.nan), "cg_residual_tol"),
    (dict(max_backtracks=-1), "max_backtracks"),
    (dict(backtrack_ratio=1.0), "backtrack_ratio"),
    (dict(accept_ratio=1.0), "accept_ratio"),
    (dict(fvp_difference="backward"), "fvp_difference"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        TRPOOptions(**options)


def test_bad_arguments():
    policy = TinyPolicy()
    half = [torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)]
    with pytest.raises(TypeError, match="float32 or float64"):
        trpo_step(half, lambda: half[0].sum(), lambda: half[0].sum())
    with pytest.raises(TypeError, match="kl_fn"):
        trpo_step(policy.params, policy.surrogate, None)
    with pytest.raises(TypeError, match="options"):
        trpo_step(policy.params, policy.surrogate, policy.kl, options=dict(max_kl=0.1))
    with pytest.raises(TypeError, match="surrogate_fn must return"):
        trpo_step(policy.params, lambda: torch.zeros(2), policy.kl)
    with pytest.raises(FloatingPointError, match="surrogate"):
        trpo_step(policy.params, lambda: policy.surrogate() * math.inf, policy.kl)
    with pytest.raises(TypeError, match="b must be"):
        conjugate_gradient(lambda v: v, torch.ones(2, 2))
    with pytest.raises(ValueError, match="iters"):
        conjugate_gradient(lambda v: v, torch.ones(2), iters=0)
    with pytest.raises(ValueError, match="surrogate_fn"):
        kl_line_search([torch.zeros(1)], [torch.ones(1)], lambda: 0.0, 0.1,
                       expected_improvement=1.0)
