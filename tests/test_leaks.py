"""No leaks: 1,000 forward + backward iterations of each op leave process memory where it was.

After a warm-up (allocator pools, lazy initialisation, the first autograd graphs), each op runs
1,000 iterations with the garbage collector switched off. Three measurements, in this order:

* the resident set size (``/proc/self/statm``) and malloc's heap in use (``mallinfo2``) grow
  by less than ``RSS_BOUND``, which a leak of one [N, H] float32 tensor per iteration (16 KiB,
  16 MiB over 1,000 iterations) exceeds 4 times over: memory held by the C++ extension or by the
  Triton launcher counts too;
* the collector then finds no unreachable objects: every iteration's autograd graph was freed by
  reference counting alone (a graph kept alive by a cycle waits for the collector: on a GPU, a
  memory spike of a whole step);
* the number of live ``torch.Tensor`` objects is unchanged, exactly.

``test_the_measurement_catches_a_deliberate_leak`` runs the same measurement on a step that keeps
one [N, H] tensor per iteration and checks that all of it is seen: the bound is not vacuous.

The C++ loops run on one intra-op thread: on a loaded machine each OpenMP region of the C++
kernels can cost milliseconds of scheduling (100x the work at these sizes); the memory they use
is the same. One shorter run per C++ head op keeps the default thread count (the parallel path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from dataclasses import dataclass

import pytest
import torch
from helpers import impl_is_available

import fastalign
from fastalign import FusedDPOLoss, dpo_loss, gae, linear_kl, linear_logprobs, sequence_logprobs

N_ITERATIONS, WARMUP = 1000, 100
BATCH, SEQ, HIDDEN, VOCAB = 4, 16, 64, 512
N_TOKENS = BATCH * SEQ  # a leaked [N, H] float32 tensor: 16 KiB
RSS_BOUND = 4 * 2**20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="reads the resident set size from /proc/self/statm")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


_MALLINFO2 = getattr(_libc(), "mallinfo2", None)
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _MallInfo2


def heap_bytes() -> int:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2), 0 where unknown.

    The RSS alone can miss a leak: a process that has just freed hundreds of MiB (an earlier test
    in the same run) serves new allocations from pages it still holds (partly even after
    glibc's malloc_trim), and the RSS hardly moves. Tensors' memory comes from malloc, so this
    counts it whatever the pages' state."""
    if _MALLINFO2 is None:
        return 0
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def live_tensors() -> int:
    # type(), not isinstance(): isinstance consults __class__, which some modules' lazy
    # attributes turn into deprecation warnings.
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


@dataclass
class Growth:
    rss: int                # bytes
    heap: int               # bytes malloc handed out during the loop and did not get back
    cycles: int             # unreachable objects the collector found after the loop
    tensors_in_cycles: int  # of which torch.Tensor objects
    tensors: int            # live torch.Tensor objects after the collection

    @property
    def kept(self) -> int:
        """Memory the loop kept: the larger of the RSS and the heap's growth."""
        return max(self.rss, self.heap)

    def __str__(self):
        return (f"RSS +{self.rss / 2**20:.2f} MiB, heap +{self.heap / 2**20:.2f} MiB, "
                f"{self.cycles} objects in cycles "
                f"({self.tensors_in_cycles} tensors), {self.tensors:+d} live tensors")


def measure(step, iterations: int = N_ITERATIONS, warmup: int = WARMUP) -> Growth:
    for _ in range(warmup):
        step()
    gc.collect()
    tensors_before = live_tensors()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        rss_before, heap_before = rss_bytes(), heap_bytes()
        for _ in range(iterations):
            step()
        rss_after, heap_after = rss_bytes(), heap_bytes()
        uncollected = live_tensors()  # get_objects still lists garbage awaiting the collector
        cycles = gc.collect()
    finally:
        if was_enabled:
            gc.enable()
    tensors_after = live_tensors()
    return Growth(rss_after - rss_before, heap_after - heap_before, cycles,
                  uncollected - tensors_after, tensors_after - tensors_before)


def assert_no_leak(growth: Growth, rss_bound: int = RSS_BOUND, *, cycles_ok=False) -> None:
    assert growth.kept < rss_bound, f"resident memory grew: {growth}"
    assert growth.tensors_in_cycles == 0, f"tensors were kept alive by reference cycles: {growth}"
    if not cycles_ok:
        assert growth.cycles == 0, f"the iterations left reference cycles behind: {growth}"
    assert growth.tensors == 0, f"tensors stayed alive: {growth}"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _require(impl):
    if not impl_is_available(impl):
        pytest.skip(f"{impl} is not available here: {fastalign.available_implementations()}")


def _head(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N_TOKENS, HIDDEN, generator=gen).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5).requires_grad_()
    targets = torch.randint(0, VOCAB, (N_TOKENS,), generator=gen)
    targets[::5] = -100
    return hidden, weight, targets


def _clear(*leaves):
    for leaf in leaves:
        leaf.grad = None


def _logprobs_step(impl):
    hidden, weight, targets = _head()
    upstream = torch.randn(N_TOKENS)

    def step():
        logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
        ((logp * upstream).sum() + entropy.sum()).backward()
        _clear(hidden, weight)
    return step


def _kl_step():
    hidden, weight, _ = _head()
    ref_hidden = hidden.detach() + 0.1 * torch.randn(hidden.shape)
    ref_weight = weight.detach().clone()
    mask = torch.rand(N_TOKENS) > 0.2

    def step():
        linear_kl(hidden, weight, ref_hidden, ref_weight, mask=mask, impl="cpp").sum().backward()
        _clear(hidden, weight)
    return step


# ----------------------------------------------------------------------------------------------
# The measurement itself
# ----------------------------------------------------------------------------------------------


def test_the_measurement_catches_a_deliberate_leak(one_thread):
    """A step that keeps one [N, H] tensor per iteration must fail every part of the check."""
    _require("cpp")
    step = _logprobs_step("cpp")
    kept = []
    hidden = torch.randn(N_TOKENS, HIDDEN)

    def leaky_step():
        step()
        kept.append(hidden.clone())

    growth = measure(leaky_step)
    leaked = N_ITERATIONS * hidden.numel() * hidden.element_size()
    assert growth.kept >= 0.8 * leaked, f"16 MiB kept, but measured {growth}"
    assert growth.kept >= RSS_BOUND
    assert growth.tensors == N_ITERATIONS
    with pytest.raises(AssertionError, match="resident memory grew"):
        assert_no_leak(growth)


def test_the_measurement_catches_a_cycle(one_thread):
    """A graph kept alive by a reference cycle is freed only by the collector: reported."""
    _require("cpp")
    hidden, weight, targets = _head()

    def cyclic_step():
        logp = linear_logprobs(hidden, weight, targets, impl="cpp")
        holder = {"logp": logp}
        holder["self"] = holder  # a cycle holding the output, hence the graph
        logp.sum().backward(retain_graph=True)
        _clear(hidden, weight)

    growth = measure(cyclic_step, iterations=100, warmup=10)
    assert growth.cycles >= 100 and growth.tensors_in_cycles >= 100, growth
    with pytest.raises(AssertionError, match="kept alive by reference cycles"):
        assert_no_leak(growth)


# ----------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------


def test_linear_logprobs_cpp(one_thread):
    _require("cpp")
    assert_no_leak(measure(_logprobs_step("cpp")))


def test_linear_kl_cpp(one_thread):
    _require("cpp")
    assert_no_leak(measure(_kl_step()))


@pytest.mark.parametrize("make_step", [lambda: _logprobs_step("cpp"), _kl_step],
                         ids=["linear_logprobs", "linear_kl"])
def test_cpp_parallel_path(make_step):
    """The default intra-op thread count: the OpenMP path of the same kernels. On a loaded
    machine an OpenMP region can take milliseconds to schedule, so 100 iterations: the live tensor
    count is exact; the RSS bound catches 40 KiB or more an iteration."""
    _require("cpp")
    assert_no_leak(measure(make_step(), iterations=100, warmup=10))


def test_linear_logprobs_triton_interpreter():
    """The Triton interpreter takes ~0.1 s a step on CPU: 30 iterations, not 1,000. The live
    tensor counts are exact whatever the number of iterations; the RSS bound only catches a leak
    of 140 KiB or more an iteration here. The interpreter itself leaves reference cycles (about
    60 objects a step, none of them tensors) for the collector: allowed."""
    _require("triton")
    hidden, weight, targets = _head()
    hidden = hidden.detach()[:16].clone().requires_grad_()
    targets = targets[:16]

    def step():
        logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True,
                                        impl="triton")
        (logp.sum() + entropy.sum()).backward()
        _clear(hidden, weight)

    assert_no_leak(measure(step, iterations=30, warmup=5), cycles_ok=True)


def test_gae(one_thread):
    """GAE returns detached advantages and returns (no backward): forward only."""
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(BATCH, SEQ, generator=gen), torch.randn(BATCH, SEQ, generator=gen)
    mask = torch.rand(BATCH, SEQ, generator=gen) > 0.3

    def step():
        advantages, returns = gae(rewards, values, mask, gamma=0.99, lam=0.95)
        assert advantages.shape == (BATCH, SEQ)

    assert_no_leak(measure(step))


def test_sequence_logprobs(one_thread):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=gen).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5).requires_grad_()
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    response_mask = torch.arange(SEQ).expand(BATCH, SEQ) >= 5

    def step():
        out = sequence_logprobs(hidden, weight, input_ids, response_mask, return_entropy=True)
        (out.sum_logps.sum() + out.mean_logps.sum()).backward()
        _clear(hidden, weight)

    assert_no_leak(measure(step))


def test_dpo_loss(one_thread):
    gen = torch.Generator().manual_seed(0)
    policy = torch.randn(2, BATCH, generator=gen).requires_grad_()
    reference = torch.randn(2, BATCH, generator=gen)

    def step():
        loss, metrics = dpo_loss(policy[0], policy[1], reference[0], reference[1], beta=0.1)
        loss.backward()
        _clear(policy)
        assert "rewards/accuracies" in metrics

    assert_no_leak(measure(step))


def test_fused_dpo_loss(one_thread):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * BATCH, SEQ, HIDDEN, generator=gen).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5).requires_grad_()
    ref_hidden = hidden.detach() + 0.1 * torch.randn(hidden.shape, generator=gen)
    ref_weight = weight.detach().clone()
    labels = torch.randint(0, VOCAB, (2 * BATCH, SEQ), generator=gen)
    labels[:, :5] = -100
    loss_fn = FusedDPOLoss(beta=0.1)

    def step():
        loss, _ = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
        loss.backward()
        _clear(hidden, weight)

    assert_no_leak(measure(step))
