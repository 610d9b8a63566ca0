"""Memory is a feature: the fused op never materialises [N x V], measured rather than claimed."""

import pytest
import torch
from helpers import impl_is_available

from fastalign import linear_logprobs
from fastalign.bench.memory import cpu_peak_supported, measure_peak_memory

N, H, V = 4096, 64, 131072
FULL_LOGITS_BYTES = N * V * 4  # 2 GiB in float32


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")
@pytest.mark.skipif(not impl_is_available("cpp"), reason="C++ extension not built")
def test_forward_backward_at_128k_vocab_stays_far_below_the_logits():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen)

    def step():
        logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True)
        ((logp * upstream).sum() + entropy.sum()).backward()
        return logp.detach()

    logp, peak = measure_peak_memory(step, "cpu")
    assert torch.isfinite(logp).all() and weight.grad is not None
    # The weight gradient alone (32 MiB) is part of the peak; the logits (2 GiB) must never be.
    assert peak < FULL_LOGITS_BYTES / 8, (
        f"peak rose by {peak / 2**20:.0f} MiB; full fp32 logits would be "
        f"{FULL_LOGITS_BYTES / 2**20:.0f} MiB"
    )


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")
def test_the_measurement_sees_a_materialised_tensor():
    """Guards the guard: a function that holds 256 MiB must be measured as holding it."""
    _, peak = measure_peak_memory(lambda: torch.ones(64 * 2**20).sum(), "cpu")
    assert 250 * 2**20 < peak < 400 * 2**20


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")
def test_the_measurement_sees_reused_heap_memory():
    """Blocks below glibc's mmap threshold (pinned at 1 MiB by conftest) stay resident after
    free; a function that reuses them must still be measured as holding them (a tiled kernel's
    workspace is such blocks)."""
    for _ in range(3):
        chunks = [torch.randn(2**17) for _ in range(128)]  # 512 KiB each
        del chunks
    _, peak = measure_peak_memory(lambda: [torch.ones(2**17) for _ in range(128)], "cpu")
    assert peak > 60 * 2**20


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")
@pytest.mark.skipif(not impl_is_available("cpp"), reason="C++ extension not built")
def test_linear_kl_forward_backward_at_128k_vocab_stays_far_below_the_logits():
    """Two heads: eager would hold policy and reference logits and their softmaxes (8 GiB)."""
    from fastalign import linear_kl

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).requires_grad_()
    ref_hidden = hidden.detach() + 0.1 * torch.randn(N, H, generator=gen)
    ref_weight = weight.detach() + 0.01 * torch.randn(V, H, generator=gen)
    upstream = torch.randn(N, generator=gen)

    def step():
        kl = linear_kl(hidden, weight, ref_hidden, ref_weight)
        (kl * upstream).sum().backward()
        return kl.detach()

    kl, peak = measure_peak_memory(step, "cpu")
    assert torch.isfinite(kl).all() and (kl >= 0).all() and weight.grad is not None
    assert peak < FULL_LOGITS_BYTES / 8, (
        f"peak rose by {peak / 2**20:.0f} MiB; one head's fp32 logits would be "
        f"{FULL_LOGITS_BYTES / 2**20:.0f} MiB"
    )


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")
@pytest.mark.skipif(not impl_is_available("cpp"), reason="C++ extension not built")
def test_fused_dpo_step_at_128k_vocab_stays_far_below_the_logits():
    """A DPO step (policy and reference head) at 2048 tokens: one head's logits are 1 GiB.
    The streamed path (gradients_in_forward=False); with the gradients formed in forward the
    step holds one pair's logits instead (test_gradients_in_forward.py measures that bound)."""
    from fastalign import FusedDPOLoss

    pairs, length = 2, 512
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, length, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).requires_grad_()
    ref_hidden = hidden.detach() + 0.1 * torch.randn(hidden.shape, generator=gen)
    ref_weight = weight.detach() + 0.01 * torch.randn(V, H, generator=gen)
    labels = torch.randint(0, V, (2 * pairs, length), generator=gen)
    labels[:, :128] = -100
    loss_fn = FusedDPOLoss(beta=0.1, gradients_in_forward=False)

    def step():
        loss, _ = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
        loss.backward()
        return loss.detach()

    loss, peak = measure_peak_memory(step, "cpu")
    logits_bytes = 2 * pairs * length * V * 4
    assert torch.isfinite(loss) and weight.grad is not None
    assert peak < logits_bytes / 8, (
        f"peak rose by {peak / 2**20:.0f} MiB; one head's fp32 logits would be "
        f"{logits_bytes / 2**20:.0f} MiB"
    )


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")
def test_linear_argmax_at_128k_vocab_stays_far_below_the_logits():
    """SFT's token accuracy: the arg-max over 128k logits per token, holding one tile of them."""
    from fastalign import linear_argmax, linear_argmax_reference

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    linear_argmax(hidden[:1024], weight)  # warm-up: MKL's packing buffers for these shapes
    predicted, peak = measure_peak_memory(lambda: linear_argmax(hidden, weight), "cpu")
    assert predicted.shape == (N,)
    assert torch.equal(predicted[:32], linear_argmax_reference(hidden[:32], weight))
    assert peak < FULL_LOGITS_BYTES / 16, (
        f"peak rose by {peak / 2**20:.0f} MiB; full fp32 logits would be "
        f"{FULL_LOGITS_BYTES / 2**20:.0f} MiB"
    )
