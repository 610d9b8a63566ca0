"""Vocabulary-parallel ``linear_logprobs`` and ``linear_kl`` over 2 and 4 gloo CPU processes.

Every rank holds one (uneven) slice of the head's rows and the same hidden states and targets;
the sharded op must give every rank the single-process result: values, ``dhidden`` (summed over
the group) and the rank's rows of ``dweight`` / ``dbias``, for random upstream gradients, with
targets on every shard and ignored tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import impl_is_available

import fastalign

IMPLS = [impl for impl in ("cpp", "triton") if impl_is_available(impl)]


def _shard_bounds(vocab: int, world: int) -> list[tuple[int, int]]:
    """Uneven contiguous shards, as a tensor-parallel head with V % world != 0 has."""
    sizes = [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(start, start + size) for start, size in zip(starts, sizes)]


def _logprob_cases():
    # (impl, dtype, N, H, V, bias, softcap, temperature, ignore_index)
    for impl in IMPLS:
        yield impl, torch.float32, 9, 8, 37, True, None, 1.0, -100
        yield impl, torch.float32, 6, 16, 21, False, 5.0, 0.7, 3  # ignore_index is a real id
        yield impl, torch.float32, 1, 4, 13, False, None, 1.3, -100
    if "cpp" in IMPLS:
        yield "cpp", torch.float64, 12, 8, 41, True, 30.0, 2.0, -100


def _check_logprobs(rank: int, world: int, case) -> None:
    impl, dtype, n, hidden_size, vocab, with_bias, softcap, temperature, ignore = case
    generator = torch.Generator().manual_seed(1234 + n + vocab)  # the same on every rank
    hidden = torch.randn(n, hidden_size, generator=generator, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64)
              * 0.5).to(dtype)
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64).to(dtype) \
        if with_bias else None
    bounds = _shard_bounds(vocab, world)
    # Targets on every shard (the first and the last row of each), plus ignored tokens.
    targets = torch.tensor([b for bound in bounds for b in (bound[0], bound[1] - 1)])
    targets = torch.cat([targets, torch.randint(0, vocab, (n,), generator=generator)])[:n]
    if n > 2:
        targets[2] = ignore
    grad_logp = torch.randn(n, generator=generator, dtype=torch.float64)
    grad_entropy = torch.randn(n, generator=generator, dtype=torch.float64)
    options = dict(temperature=temperature, softcap=softcap, ignore_index=ignore,
                   return_entropy=True, impl=impl)

    def run(h, w, b, **extra):
        h = h.clone().requires_grad_(True)
        w = w.clone().requires_grad_(True)
        b = None if b is None else b.clone().requires_grad_(True)
        logp, entropy = fastalign.linear_logprobs(h, w, targets, bias=b, **options, **extra)
        torch.autograd.backward([logp, entropy], [grad_logp.to(logp.dtype),
                                                  grad_entropy.to(entropy.dtype)])
        return logp, entropy, h.grad, w.grad, None if b is None else b.grad

    expected = run(hidden, weight, bias)
    start, stop = bounds[rank]
    got = run(hidden, weight[start:stop], None if bias is None else bias[start:stop],
              process_group=dist.group.WORLD, vocab_start_index=start)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    names = ("logp", "entropy", "dhidden")
    for name, a, b in zip(names, got[:3], expected[:3]):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{case}: {name}: {m}")
    torch.testing.assert_close(got[3], expected[3][start:stop], **tol)
    if with_bias:
        torch.testing.assert_close(got[4], expected[4][start:stop], **tol)
    if n > 2:
        assert float(got[0][2].detach()) == 0.0 and float(got[2][2].abs().sum()) == 0.0


def _check_kl(rank: int, world: int, impl: str, reverse: bool) -> None:
    generator = torch.Generator().manual_seed(99)
    n, hidden_size, ref_hidden_size, vocab = 7, 8, 4, 29
    hidden = torch.randn(n, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) * 0.5
    bias = torch.randn(vocab, generator=generator)
    ref_hidden = torch.randn(n, ref_hidden_size, generator=generator)
    ref_weight = torch.randn(vocab, ref_hidden_size, generator=generator) * 0.5
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    grad = torch.randn(n, generator=generator)

    def run(w, b, rw, **extra):
        leaves = [hidden.clone(), w.clone(), b.clone(), ref_hidden.clone(), rw.clone()]
        for leaf in leaves:
            leaf.requires_grad_(True)
        kl = fastalign.linear_kl(leaves[0], leaves[1], leaves[3], leaves[4], bias=leaves[2],
                                 mask=mask, softcap=8.0, temperature=0.9, reverse=reverse,
                                 impl=impl, **extra)
        kl.backward(grad)
        return [kl.detach()] + [leaf.grad for leaf in leaves]

    expected = run(weight, bias, ref_weight)
    start, stop = _shard_bounds(vocab, world)[rank]
    got = run(weight[start:stop], bias[start:stop], ref_weight[start:stop],
              process_group=dist.group.WORLD, vocab_start_index=start)
    tol = dict(rtol=2e-5, atol=2e-5)
    for index in (0, 1, 4):  # kl, dhidden, dref_hidden: replicated
        torch.testing.assert_close(got[index], expected[index], **tol)
    for index in (2, 3, 5):  # dweight, dbias, dref_weight: this rank's rows
        torch.testing.assert_close(got[index], expected[index][start:stop], **tol)


def _check_bad_shards(rank: int, world: int) -> None:
    weight = torch.randn(4, 3)
    with pytest.raises(ValueError, match="tile"):  # every rank claims rows [0, 4)
        fastalign.linear_logprobs(torch.randn(2, 3), weight, torch.tensor([0, 1]),
                                  process_group=dist.group.WORLD, vocab_start_index=0)
    bounds = _shard_bounds(8, world)
    start, stop = bounds[rank]
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V\) = \[0, 8\)"):
        fastalign.linear_logprobs(torch.randn(2, 3), torch.randn(stop - start, 3),
                                  torch.tensor([0, 8]), process_group=dist.group.WORLD,
                                  vocab_start_index=start)
    with pytest.raises(ValueError, match="fused implementation"):
        fastalign.linear_logprobs(torch.randn(2, 3), torch.randn(stop - start, 3),
                                  torch.tensor([0, 7]), process_group=dist.group.WORLD,
                                  vocab_start_index=start, impl="reference")


def _check_fsdp_sharded_head_is_refused(world: int) -> None:
    """Outside FSDP's forward, a sharded head is a DTensor: refused, never computed with."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    head = torch.nn.Linear(3, 8, bias=False)
    fully_shard(head, mesh=init_device_mesh("cpu", (world,)))
    with pytest.raises(TypeError, match="weight is a DTensor"):
        fastalign.linear_logprobs(torch.randn(2, 3), head.weight, torch.tensor([0, 7]))


def test_a_cpu_step_imports_neither_triton_nor_dtensor():
    """On CPU (no Triton interpreter) the ops' first calls must not import what they do not
    run: choosing an implementation imported triton (~150 MiB resident, a second), and asking
    whether an input is a DTensor imported torch.distributed.tensor and sympy (~50 MiB); a DPO
    step's memory test measured them as tiles of logits."""
    script = (
        "import sys, torch, fastalign\n"
        "h = torch.randn(2, 6, 8, requires_grad=True)\n"
        "w = torch.randn(11, 8, requires_grad=True)\n"
        "labels = torch.randint(0, 11, (2, 6))\n"
        "fastalign.linear_nll(h.reshape(-1, 8), w, labels.reshape(-1)).backward()\n"
        "fastalign.linear_logprobs(h.reshape(-1, 8), w, labels.reshape(-1)).sum().backward()\n"
        "zero = torch.zeros(1)\n"
        "loss, _ = fastalign.FusedDPOLoss()(h, w, labels, ref_chosen_logps=zero,\n"
        "                                   ref_rejected_logps=zero)\n"
        "loss.backward()\n"
        "print(sorted(m for m in ('triton', 'torch.distributed.tensor', 'sympy')\n"
        "             if m in sys.modules))\n")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env=env)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        for case in _logprob_cases():
            _check_logprobs(rank, world, case)
        for impl in IMPLS:
            for reverse in (False, True):
                _check_kl(rank, world, impl, reverse)
        _check_bad_shards(rank, world)
        _check_fsdp_sharded_head_is_refused(world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_single_process(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init")), nprocs=world, join=True)


def test_vocab_start_index_needs_a_process_group():
    with pytest.raises(ValueError, match="vocab_start_index=4 needs a process_group"):
        fastalign.linear_logprobs(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]),
                                  vocab_start_index=4)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        fastalign.linear_kl(torch.randn(2, 3), torch.randn(4, 3), torch.randn(2, 3),
                            torch.randn(4, 3), process_group=object())


def test_check_finite_names_the_tensor():
    hidden = torch.randn(3, 4)
    hidden[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"hidden contains NaN \(1 of 12 values, first at "
                                         r"index \(1, 2\)\)"):
        fastalign.linear_logprobs(hidden, torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                  check_finite=True)
    weight = torch.randn(5, 4)
    weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="ref_weight contains inf"):
        fastalign.linear_kl(torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 4), weight,
                            check_finite=True)
