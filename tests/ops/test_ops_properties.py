"""Property-based tests of the ops: random shapes and options against the references.

``linear_logprobs`` and ``linear_kl`` against the materialising references in float64 (values and
gradients under random upstream gradients), ``gae`` against ``gae_reference`` (and that against
the textbook sum), and the sequence reductions against a masked sum written out here.

Every test runs ``EXAMPLES`` examples: the max_examples of the loaded hypothesis profile (2000 in
the "ci" profile that ``make test`` runs, 20000 with ``HYPOTHESIS_PROFILE=thorough``). The C++
kernels take tiny shapes (N ≤ 8, V ≤ 40, H ≤ 8) so that 2000 examples cost seconds, with random
vocabulary and token block sizes, schedules and thread counts (``FASTALIGN_CPU_*``, read on every
call) so that tiny vocabularies still stream over many blocks. The Triton kernels run through
the interpreter on CPU, at about 0.1 s an example, so there they get ``TRITON_EXAMPLES`` (a
tenth: 200 in "ci") rather than minutes of CI time; on a GPU they run compiled, at full count.
"""

from __future__ import annotations

import math

import torch
from helpers import (
    EXAMPLES,
    TRITON_EXAMPLES,
    cpu_tiling,
    impl_device,
    make_inputs,
    max_abs_error,
    requires_cpp,
    requires_triton,
    tiled,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign import (
    gae,
    gae_reference,
    linear_kl,
    linear_kl_reference,
    linear_logprobs,
    linear_logprobs_reference,
    sequence_logprobs,
    sequence_logprobs_from_labels,
)


def max_magnitude(tensor):
    return tensor.double().abs().max().item() if tensor is not None and tensor.numel() else 0.0


def assert_within_float32_error(actual, pytorch_fp32, truth, name, term_size, torch_factor=2.0):
    """1e-5 relative to the tensor's scale, or else within twice PyTorch's own float32 error or
    1e-6 of the size of the terms summed into it. Random cases include results that nearly cancel
    (with V = 2, dh = (∂L/∂a_0)·(W_0 − W_1); an entropy of 1e-6), which no float32 computation
    gets to 1e-5 of their own, tiny, scale."""
    assert actual.shape == truth.shape, f"{name}: shape {actual.shape} != {truth.shape}"
    scale = max(max_magnitude(truth), 1e-6)
    error = max_abs_error(actual, truth)
    allowed = max(1e-5 * scale, torch_factor * max_abs_error(pytorch_fp32, truth),
                  1e-6 * term_size)
    assert error <= allowed, f"{name}: error {error:.3g} > {allowed:.3g} (scale {scale:.3g})"


def assert_close_float64(actual, truth, name, term_size=1.0):
    """float64 against float64: 1e-10 of the tensor's scale, or 1e-12 of the size of the terms
    summed into it (a gradient that cancels to nearly nothing keeps the rounding of its terms)."""
    assert actual.shape == truth.shape, f"{name}: shape {actual.shape} != {truth.shape}"
    assert actual.dtype == torch.float64, f"{name}: dtype {actual.dtype}"
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    error = max_abs_error(actual, truth)
    allowed = max(1e-10 * max_magnitude(truth), 1e-12 * term_size, 1e-300)
    assert error <= allowed, f"{name}: error {error:.3g} > {allowed:.3g}"


# ---------------------------------------------------------------------------------------------
# linear_logprobs
# ---------------------------------------------------------------------------------------------

def logprob_cases(max_tokens, max_hidden, max_vocab, dtypes):
    return st.fixed_dictionaries({
        "lead_shape": st.one_of(st.tuples(st.integers(0, max_tokens)),
                                st.tuples(st.integers(1, 2), st.integers(1, max_tokens // 2))),
        "hidden_size": st.integers(1, max_hidden),
        "vocab_size": st.integers(1, max_vocab),
        "dtype": st.sampled_from(dtypes),
        "bias": st.booleans(),
        "ignore_fraction": st.sampled_from([0.0, 0.3, 1.0]),
        "ignore_index": st.sampled_from([-100, -1, 0, 1000]),
        "targets_int32": st.booleans(),
        "logit_scale": st.sampled_from([0.5, 3.0, 20.0]),
        "temperature": st.sampled_from([1.0, 0.7, 2.5]),
        "softcap": st.sampled_from([None, 1.0, 5.0, 30.0]),
        "return_entropy": st.booleans(),
        "non_contiguous": st.booleans(),
        "seed": st.integers(0, 2**16),
    })


def run_logprobs(inputs, return_entropy, *, impl=None, upcast=None):
    """Forward, then the gradients of Σ g·logp (+ Σ e·entropy) by torch.autograd.grad."""
    leaves = {"hidden": inputs.hidden, "weight": inputs.weight}
    if inputs.bias is not None:
        leaves["bias"] = inputs.bias
    leaves = {name: (t.detach().to(upcast) if upcast else t.detach()).requires_grad_()
              for name, t in leaves.items()}
    kwargs = dict(bias=leaves.get("bias"), return_entropy=return_entropy, **inputs.options)
    args = (leaves["hidden"], leaves["weight"], inputs.targets)
    if impl is None:
        out = linear_logprobs_reference(*args, **kwargs, compute_dtype=upcast or torch.float32)
    else:
        out = linear_logprobs(*args, impl=impl, **kwargs)
    logp, entropy = out if return_entropy else (out, None)
    loss = (logp * inputs.grad_logp.to(logp.dtype)).sum()
    if entropy is not None:
        loss = loss + (entropy * inputs.grad_entropy.to(entropy.dtype)).sum()
    names = list(leaves)
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names],
                                                allow_unused=True)))
    return logp.detach(), None if entropy is None else entropy.detach(), grads


def check_logprobs(impl, case):
    options = {"temperature": case["temperature"], "ignore_index": case["ignore_index"]}
    if case["softcap"] is not None:
        options["softcap"] = case["softcap"]
    lead_shape = case["lead_shape"]
    inputs = make_inputs(lead_shape, case["hidden_size"], case["vocab_size"],
                         dtype=case["dtype"], bias=case["bias"],
                         ignore_fraction=case["ignore_fraction"],
                         logit_scale=case["logit_scale"], options=options,
                         non_contiguous=case["non_contiguous"] and math.prod(lead_shape) > 0,
                         seed=case["seed"], device=impl_device(impl))
    if case["targets_int32"]:
        inputs.targets = inputs.targets.to(torch.int32)
    with_entropy = case["return_entropy"]
    logp, entropy, grads = run_logprobs(inputs, with_entropy, impl=impl)
    truth_logp, truth_entropy, truth_grads = run_logprobs(inputs, with_entropy,
                                                          upcast=torch.float64)

    out_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    assert logp.dtype == out_dtype and logp.shape == inputs.targets.shape
    ignored = inputs.targets == case["ignore_index"]
    assert torch.all(logp[ignored] == 0) and torch.all(logp <= 0)
    if with_entropy:
        assert entropy.dtype == out_dtype and torch.all(entropy[ignored] == 0)
        assert torch.all(entropy >= -1e-5)
        assert torch.all(entropy <= math.log(case["vocab_size"]) + 1e-4)
    # Size of the terms that each gradient sums: dh = Σ_v (∂L/∂a)·W_v, dW = Σ_n (∂L/∂a)·h_n, ...
    upstream = max_magnitude(inputs.grad_logp) + with_entropy * max_magnitude(inputs.grad_entropy)
    term_size = {"hidden": upstream * max_magnitude(inputs.weight),
                 "weight": upstream * max_magnitude(inputs.hidden), "bias": upstream}
    for name, grad in grads.items():
        assert grad.dtype == case["dtype"], f"d{name}: {grad.dtype}"
        if ignored.all():  # nothing scored: no gradient anywhere
            assert torch.all(grad == 0), f"d{name} with every token ignored"
    if case["dtype"] == torch.float64:
        assert_close_float64(logp, truth_logp, "logp", 1.0)
        if with_entropy:
            assert_close_float64(entropy, truth_entropy, "entropy", 1.0)
        for name, grad in truth_grads.items():
            assert_close_float64(grads[name], grad, f"d{name}", term_size[name])
        return
    fp32_logp, fp32_entropy, fp32_grads = run_logprobs(inputs, with_entropy)
    assert_within_float32_error(logp, fp32_logp, truth_logp, "logp", 1.0)
    if with_entropy:
        assert_within_float32_error(entropy, fp32_entropy, truth_entropy, "entropy", 1.0)
    for name, grad in truth_grads.items():
        assert_within_float32_error(grads[name], fp32_grads[name], grad, f"d{name}",
                                    term_size[name])


@requires_cpp
@settings(max_examples=EXAMPLES)
@given(case=logprob_cases(8, 8, 40, [torch.float64, torch.float32]), tiling=cpu_tiling)
def test_linear_logprobs_cpp_property(case, tiling):
    with tiled(tiling):
        check_logprobs("cpp", case)


@requires_triton
@settings(max_examples=TRITON_EXAMPLES)  # the interpreter: ~0.1 s an example
@given(case=logprob_cases(24, 40, 400, [torch.float32]))
def test_linear_logprobs_triton_property(case):
    check_logprobs("triton", case)


# ---------------------------------------------------------------------------------------------
# linear_kl
# ---------------------------------------------------------------------------------------------

def kl_cases(max_tokens, max_hidden, max_vocab, dtypes):
    return st.fixed_dictionaries({
        "lead_shape": st.one_of(st.tuples(st.integers(0, max_tokens)),
                                st.tuples(st.integers(1, 2), st.integers(1, max_tokens // 2))),
        "hidden_size": st.integers(1, max_hidden),
        "ref_hidden_size": st.one_of(st.none(), st.integers(1, max_hidden)),
        "vocab_size": st.integers(1, max_vocab),
        "dtype": st.sampled_from(dtypes),
        "bias": st.booleans(),
        "ref_bias": st.booleans(),
        "mask_fraction": st.sampled_from([0.0, 0.3, 1.0]),
        "mask_int": st.booleans(),
        "logit_scale": st.sampled_from([0.5, 3.0, 20.0]),
        "ref_shift": st.sampled_from([0.0, 0.1, 1.0, 3.0]),
        "temperature": st.sampled_from([1.0, 0.7, 2.5]),
        "softcap": st.sampled_from([None, 1.0, 5.0, 30.0]),
        "reverse": st.booleans(),
        "grad_ref": st.booleans(),
        "seed": st.integers(0, 2**16),
    })


def run_kl(tensors, mask, upstream, *, impl=None, upcast=None, options, grad_ref):
    """Forward, then the gradients of Σ g·KL w.r.t. the policy head (and the reference head)."""
    leaves = {}
    for name, t in tensors.items():
        if t is not None:
            t = t.detach().to(upcast) if upcast else t.detach().clone()
            leaves[name] = t.requires_grad_(grad_ref or not name.startswith("ref_"))
    kwargs = dict(bias=leaves.get("bias"), ref_bias=leaves.get("ref_bias"), mask=mask, **options)
    args = (leaves["hidden"], leaves["weight"], leaves["ref_hidden"], leaves["ref_weight"])
    if impl is None:
        kl = linear_kl_reference(*args, **kwargs, compute_dtype=upcast or torch.float32)
    else:
        kl = linear_kl(*args, impl=impl, **kwargs)
    names = [name for name, t in leaves.items() if t.requires_grad]
    grads = torch.autograd.grad((kl * upstream.to(kl.dtype)).sum(), [leaves[n] for n in names],
                                allow_unused=True)
    return kl.detach(), dict(zip(names, grads))


def check_kl(impl, case):
    from test_linear_kl import make_kl_inputs

    options = {"temperature": case["temperature"], "softcap": case["softcap"],
               "reverse": case["reverse"]}
    tensors, mask, upstream = make_kl_inputs(
        case["lead_shape"], case["hidden_size"], case["vocab_size"], dtype=case["dtype"],
        ref_hidden_size=case["ref_hidden_size"], bias=case["bias"], ref_bias=case["ref_bias"],
        logit_scale=case["logit_scale"], ref_shift=case["ref_shift"],
        mask_fraction=case["mask_fraction"], seed=case["seed"], device=impl_device(impl))
    if mask is not None and case["mask_int"]:
        mask = mask.to(torch.int64)  # a 0/1 integer mask, as Hugging Face's attention masks
    run = dict(options=options, grad_ref=case["grad_ref"])
    kl, grads = run_kl(tensors, mask, upstream, impl=impl, **run)
    truth, truth_grads = run_kl(tensors, mask, upstream, upcast=torch.float64, **run)
    out_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    assert kl.dtype == out_dtype and kl.shape == upstream.shape
    assert torch.all(kl >= 0)
    if mask is not None:
        assert torch.all(kl[mask == 0] == 0)
    assert set(grads) == set(truth_grads)
    upstream_size = max_magnitude(upstream)
    partner = {"hidden": "weight", "weight": "hidden", "ref_hidden": "ref_weight",
               "ref_weight": "ref_hidden"}
    sizes = {name: upstream_size * (max_magnitude(tensors[partner[name]])
                                    if name in partner else 1.0) for name in grads}
    if case["dtype"] == torch.float64:
        # Both heads' logits are rounded, then log p − log q − KL is formed for every logit.
        assert_close_float64(kl, truth, "kl", 1.0)
        for name, grad in truth_grads.items():
            assert grads[name] is not None, f"d{name} missing"
            assert_close_float64(grads[name], grad, f"d{name}", sizes[name])
        return
    fp32, fp32_grads = run_kl(tensors, mask, upstream, **run)
    # KL gradients multiply the float32 rounding of two heads' logits by log p − log q, which is
    # large in peaked rows. The worst of 3000 thorough-profile cases (V=24, logit scale 20,
    # T=0.7, reverse) put both kernels, written independently, at 2.9x PyTorch's float32 error
    # and within 2% of each other (1.1e-5 of scale): the float32 limit of streaming, not a bug.
    factor = 4.0
    assert_within_float32_error(kl, fp32, truth, "kl", 1.0, factor)
    for name, grad in truth_grads.items():
        assert_within_float32_error(grads[name], fp32_grads[name], grad, f"d{name}", sizes[name],
                                    factor)


@requires_cpp
@settings(max_examples=EXAMPLES)
@given(case=kl_cases(8, 8, 40, [torch.float64, torch.float32]), tiling=cpu_tiling)
def test_linear_kl_cpp_property(case, tiling):
    with tiled(tiling):
        check_kl("cpp", case)


@requires_triton
@settings(max_examples=TRITON_EXAMPLES)  # the interpreter: ~0.1 s an example
@given(case=kl_cases(16, 32, 300, [torch.float32]))
def test_linear_kl_triton_property(case):
    check_kl("triton", case)


# ---------------------------------------------------------------------------------------------
# gae
# ---------------------------------------------------------------------------------------------

unit_interval = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))


def gae_cases(dtypes):
    return st.fixed_dictionaries({
        "batch": st.integers(0, 4),
        "length": st.integers(0, 12),
        "gamma": unit_interval,
        "lam": unit_interval,
        "dtype": st.sampled_from(dtypes),
        "mask_kind": st.sampled_from(["bool", "int"]),
        "mask_fraction": st.sampled_from([0.0, 0.2, 0.6, 1.0]),
        "scale": st.sampled_from([1e-3, 1.0, 100.0]),
        "seed": st.integers(0, 2**16),
    })


def _ref_gae(rewards, values, mask, gamma, lam):
    """ALGORITHMS.md §8 on each row's masked tokens, squeezed together: δ_t = r_t + γ·V_{t+1} − V_t
    (V past the end = 0), A_t = Σ_k (γλ)^k δ_{t+k}, R_t = A_t + V_t; 0 off the mask."""
    advantages = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        where = [t for t in range(rewards.shape[1]) if mask[b, t]]
        r = [float(rewards[b, t]) for t in where]
        v = [float(values[b, t]) for t in where] + [0.0]
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(r))]
        for i, t in enumerate(where):
            advantages[b, t] = sum((gamma * lam) ** k * deltas[i + k]
                                   for k in range(len(r) - i))
    returns = torch.where(mask.bool(), advantages + values.double(), 0.0)
    return advantages, returns


def check_gae(impl, case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["length"])
    rewards = case["scale"] * torch.randn(shape, generator=gen, dtype=torch.float64)
    values = case["scale"] * torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(shape, generator=gen) >= case["mask_fraction"]
    mask_arg = mask if case["mask_kind"] == "bool" else mask.to(torch.int64)
    device, dtype = impl_device(impl), case["dtype"]
    rewards, values = rewards.to(dtype), values.to(dtype)
    options = dict(gamma=case["gamma"], lam=case["lam"])
    advantages, returns = gae(rewards.to(device), values.to(device), mask_arg.to(device),
                              impl=impl, **options)
    advantages, returns = advantages.cpu(), returns.cpu()
    assert advantages.dtype == dtype and returns.dtype == dtype
    assert not advantages.requires_grad and not returns.requires_grad
    assert torch.all(advantages[~mask] == 0) and torch.all(returns[~mask] == 0)
    truth_advantages, truth_returns = gae_reference(rewards.double(), values.double(), mask,
                                                    **options)
    # The scan sums at most T terms of size |r| + 2|V| each, each rounded once.
    term_size = (1 + case["length"]) * (max_magnitude(rewards) + 2 * max_magnitude(values))
    check = (assert_close_float64 if dtype == torch.float64 else
             lambda a, t, name, size: _assert_float32_scan(a, t, name, size))
    check(advantages, truth_advantages, "advantages", term_size)
    check(returns, truth_returns, "returns", term_size)
    if dtype == torch.float64 and impl == "cpp":  # the reference against the textbook sum
        textbook_advantages, textbook_returns = _ref_gae(rewards, values, mask, **options)
        assert_close_float64(truth_advantages, textbook_advantages, "reference", term_size)
        assert_close_float64(truth_returns, textbook_returns, "reference returns", term_size)


def _assert_float32_scan(actual, truth, name, term_size):
    """float32 against the float64 scan of the same inputs: 1e-6 of the result's scale plus a
    few float32 roundings (6e-8) of every term summed (R = (r − V) + V loses the low bits of V)."""
    assert actual.shape == truth.shape and actual.dtype == torch.float32
    error = max_abs_error(actual, truth)
    allowed = 1e-6 * max_magnitude(truth) + 2e-7 * term_size
    assert error <= allowed, f"{name}: error {error:.3g} > {allowed:.3g}"


@requires_cpp
@settings(max_examples=EXAMPLES)
@given(case=gae_cases([torch.float64, torch.float32]))
def test_gae_cpp_property(case):
    check_gae("cpp", case)


@requires_triton
@settings(max_examples=TRITON_EXAMPLES)  # the interpreter: ~0.1 s an example
@given(case=gae_cases([torch.float32]))
def test_gae_triton_property(case):
    check_gae("triton", case)


# ---------------------------------------------------------------------------------------------
# sequence_logprobs / sequence_logprobs_from_labels
# ---------------------------------------------------------------------------------------------

sequence_cases = st.fixed_dictionaries({
    "packed": st.booleans(),
    "batch": st.integers(1, 4),
    "length": st.integers(1, 6),
    "packed_lengths": st.lists(st.integers(0, 5), min_size=1, max_size=4),
    "packed_with_batch_dim": st.booleans(),
    "api": st.sampled_from(["labels", "response_mask", "no_mask"]),
    "ignore_index": st.sampled_from([-100, -1]),
    "hidden_size": st.integers(1, 8),
    "vocab_size": st.integers(1, 40),
    "bias": st.booleans(),
    "temperature": st.sampled_from([1.0, 0.7, 2.5]),
    "softcap": st.sampled_from([None, 5.0]),
    "return_entropy": st.booleans(),
    "scored_fraction": st.sampled_from([0.0, 0.5, 1.0]),
    "seed": st.integers(0, 2**16),
})


def _ref_sequence(hidden, weight, bias, labels, starts_ends, *, ignore_index, temperature,
                  softcap):
    """The causal shift and masked sums written out: position t of a sequence scores its label
    t + 1 (nothing past the sequence's end), from log_softmax of the materialised logits."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    targets = [ignore_index] * labels.shape[0]
    membership = torch.zeros(len(starts_ends), labels.shape[0], dtype=torch.float64)
    for s, (start, end) in enumerate(starts_ends):
        membership[s, start:end] = 1.0
        for i in range(start, end - 1):
            targets[i] = int(labels[i + 1])
    targets = torch.tensor(targets, dtype=torch.int64)
    token_mask = targets != ignore_index
    picked = log_probs.gather(-1, torch.where(token_mask, targets, 0)[:, None])[:, 0]
    token_logps = torch.where(token_mask, picked, 0.0)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    token_entropy = torch.where(token_mask, entropy, 0.0)
    sums = membership @ token_logps
    lengths = (membership @ token_mask.double()).round().long()
    return token_logps, token_entropy, token_mask, sums, sums / lengths.clamp(min=1), lengths


def check_sequence(impl, case):
    gen = torch.Generator().manual_seed(case["seed"])
    V, H = case["vocab_size"], case["hidden_size"]
    if case["packed"]:
        seq_lengths = case["packed_lengths"]
        cu_seqlens = torch.tensor([0] + seq_lengths).cumsum(0)
        total = int(cu_seqlens[-1])
        flat_shape = (total,)
        starts_ends = [(int(cu_seqlens[i]), int(cu_seqlens[i + 1]))
                       for i in range(len(seq_lengths))]
    else:
        cu_seqlens = None
        B, T = case["batch"], case["length"]
        flat_shape = (B * T,)
        starts_ends = [(b * T, (b + 1) * T) for b in range(B)]
    hidden = torch.randn(*flat_shape, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * (3 / math.sqrt(H))
    bias = torch.randn(V, generator=gen, dtype=torch.float64) if case["bias"] else None
    input_ids = torch.randint(0, V, flat_shape, generator=gen)
    scored = torch.rand(flat_shape, generator=gen) < case["scored_fraction"]
    ignore_index = case["ignore_index"] if case["api"] == "labels" else -100
    if case["api"] == "no_mask":
        scored[:] = True
    labels = torch.where(scored, input_ids, ignore_index)

    def shaped(t):  # the caller's layout: [B, T(, H)] padded, [total(, H)] or [1, total(, H)]
        if case["packed"]:
            return t.unsqueeze(0) if case["packed_with_batch_dim"] else t
        return t.view(case["batch"], case["length"], *t.shape[1:])

    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    if bias is not None:
        leaves.append(bias.clone().requires_grad_())
    options = dict(cu_seqlens=cu_seqlens, bias=leaves[2] if bias is not None else None,
                   temperature=case["temperature"], softcap=case["softcap"],
                   return_entropy=case["return_entropy"], impl=impl)
    if case["api"] == "labels":
        out = sequence_logprobs_from_labels(shaped(leaves[0]), leaves[1], shaped(labels),
                                            ignore_index=ignore_index, **options)
    else:
        response_mask = None
        if case["api"] == "response_mask":
            response_mask = shaped(scored.to(torch.int64 if case["seed"] % 2 else torch.bool))
        out = sequence_logprobs(shaped(leaves[0]), leaves[1], shaped(input_ids), response_mask,
                                **options)

    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    if bias is not None:
        ref_leaves.append(bias.clone().requires_grad_())
    ref_bias = ref_leaves[2] if bias is not None else None
    token, entropy, mask, sums, means, lengths = _ref_sequence(
        ref_leaves[0], ref_leaves[1], ref_bias, labels, starts_ends, ignore_index=ignore_index,
        temperature=case["temperature"], softcap=case["softcap"])
    if not case["packed"]:  # [B, T − 1]: the last position of each row predicts nothing
        B, T = case["batch"], case["length"]
        token, entropy, mask = (t.view(B, T)[:, :-1] for t in (token, entropy, mask))
    assert torch.equal(out.token_mask.cpu(), mask)
    assert torch.equal(out.lengths.cpu(), lengths)
    assert_close_float64(out.token_logps, token, "token_logps")
    assert_close_float64(out.sum_logps, sums, "sum_logps", float(lengths.sum()) + 1)
    assert_close_float64(out.mean_logps, means, "mean_logps")
    if case["return_entropy"]:
        assert_close_float64(out.token_entropy, entropy, "token_entropy")
    else:
        assert out.token_entropy is None

    # Random upstream gradients on every output, through autograd on both sides.
    ups = [torch.randn(t.shape, generator=gen, dtype=torch.float64)
           for t in (token, sums, means, entropy)]
    outputs = [out.token_logps, out.sum_logps, out.mean_logps, out.token_entropy]
    expected = [token, sums, means, entropy if case["return_entropy"] else None]

    def total(tensors):
        return sum((t * u).sum() for t, u in zip(tensors, ups) if t is not None)

    loss, ref_loss = total(outputs), total(expected)
    grads = [None] * len(leaves)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    ref_grads = [None] * len(leaves)
    if ref_loss.requires_grad:  # nothing scored anywhere: no graph, zero gradients
        ref_grads = torch.autograd.grad(ref_loss, ref_leaves, allow_unused=True)
    size = sum(float(u.abs().sum()) for u in ups) * 3 * (1 + max_magnitude(hidden)) / min(
        case["temperature"], 1.0)
    for name, leaf, grad, ref in zip(("hidden", "weight", "bias"), leaves, grads, ref_grads):
        grad = torch.zeros_like(leaf) if grad is None else grad
        ref = torch.zeros_like(leaf) if ref is None else ref
        assert_close_float64(grad, ref, f"d{name}", size)


@requires_cpp
@settings(max_examples=EXAMPLES)
@given(case=sequence_cases, tiling=cpu_tiling)
def test_sequence_logprobs_cpp_property(case, tiling):
    with tiled(tiling):
        check_sequence("cpp", case)
