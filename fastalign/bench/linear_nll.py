"""The ``linear_nll`` benchmark: the mean negative log-likelihood of an LM head and its gradients,
the loss of supervised fine-tuning, where a fused op may compute the gradients inside forward.

Every provider returns ``mean_n −log softmax(softcap(hidden[N, H] @ weight[V, H]ᵀ))[targets_n]``
(a float32 scalar) and is differentiated once with respect to ``hidden`` and ``weight`` for a
fixed upstream gradient ``UPSTREAM`` (not 1, so that a provider that ignores it is caught).
Inputs are ``linear_logprobs``' (all targets valid). Providers:

* ``fastalign-nll``: ``fastalign.linear_nll(hidden, weight, targets)`` (gradients in forward),
  whenever fastalign has it; ``fastalign-nll-mkl`` (CPU): the same with its float32 products
  through ``torch.mm`` (MKL) instead of oneDNN (``FASTALIGN_CPU_MATMUL=torch``);
* ``fastalign-<impl>`` / ``fastalign-triton-atomic``: −mean of ``fastalign.linear_logprobs``
  (per-token log-probs, backward recomputes the logits);
* ``eager``: ``torch.nn.functional.cross_entropy`` of the float32 logits; ``compile`` of it;
* ``torch-lce``, ``liger``, ``cce``, ``cce-exact``, ``cce-compile``: the peers of
  ``linear_logprobs`` with ``reduction="mean"``, their natural use (Liger computes its
  gradients inside forward).

One mode, ``full`` (loss + gradients): with gradients computed in forward there is no separate
backward worth timing. Credited 6·N·H·V, the least matrix work of an exact gradient (logits,
dh, dW, no recompute), the same for every provider.
"""

from __future__ import annotations

import torch

import fastalign
from fastalign.bench import heads, linear_logprobs
from fastalign.bench.harness import (
    Outputs,
    Provider,
    ProviderMismatchError,
    ProviderUnavailable,
    Tolerance,
    eager_provider,
)
from fastalign.bench.linear_logprobs import LogprobInputs
from fastalign.bench.measure import ModeFn
from fastalign.ops.linear_logprobs import linear_logprobs_reference

UPSTREAM = 0.75  # d(training loss)/d(mean NLL): a loss weight, as under gradient accumulation


def eager_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              softcap: float | None = None) -> torch.Tensor:
    """Plain PyTorch: logits in the input dtype, upcast to float32, softcap, cross entropy."""
    return torch.nn.functional.cross_entropy(heads.float_logits(hidden, weight, softcap), targets)


def _linear_nll_provider(name: str, device: torch.device) -> Provider:
    linear_nll = getattr(fastalign, "linear_nll", None)
    if linear_nll is None:
        raise ProviderUnavailable(f"fastalign {fastalign.__version__} has no linear_nll")

    def fn(hidden, weight, targets, softcap):
        kwargs = {} if softcap is None else {"softcap": softcap}
        loss = linear_nll(hidden, weight, targets, **kwargs)
        return (loss if loss.dim() == 0 else loss.mean()).float()

    if name == "fastalign-nll-mkl":
        if device.type != "cpu":
            raise ProviderUnavailable("FASTALIGN_CPU_MATMUL chooses the products on CPU only")
        return Provider(name, fn, "fastalign.linear_nll with FASTALIGN_CPU_MATMUL=torch: "
                        "torch.mm (MKL) instead of oneDNN",
                        env=(("FASTALIGN_CPU_MATMUL", "torch"),))
    return Provider(name, fn, "fastalign.linear_nll: gradients computed in forward")


def _mean_of_logprobs(provider: Provider) -> Provider:
    def fn(hidden, weight, targets, softcap):
        return -provider.fn(hidden, weight, targets, softcap).mean()

    note = "−mean of linear_logprobs" + (f", {provider.note}" if provider.note else "")
    return Provider(provider.name, fn, note, env=provider.env)


class LinearNllBenchmark(linear_logprobs.LinearLogprobsBenchmark):
    """``linear_logprobs``' shapes and inputs; its own providers, mode, FLOPs and ground truth."""

    name = "linear_nll"
    summary = ("mean NLL of an LM head with its gradients: fastalign.linear_nll (when fastalign "
               "has it) and −mean(fastalign.linear_logprobs) vs eager cross_entropy, "
               "torch.compile, torch.nn.functional.linear_cross_entropy and (on CUDA, when "
               "installed) Liger-Kernel and Cut Cross-Entropy, all with reduction='mean'")
    modes = ("full",)
    modes_note = "(loss and gradients: some providers compute the gradients inside forward)"
    providers = ("fastalign-nll", "fastalign-nll-mkl", *(f"fastalign-{impl}" for impl in
                                    linear_logprobs.FASTALIGN_IMPLS),
                 "fastalign-triton-atomic", *linear_logprobs.PEER_PROVIDERS)
    flops_per_nhv = {"full": 6}
    flops_remark = "(logits, dh and dW once each: no recompute)"
    flops_note = ("FLOPs credited: full 6·N·H·V (logits, dh, dW; a provider that recomputes the "
                  "logits does 8·N·H·V of matrix work).")
    value_key = "loss"
    tolerances = {
        torch.float32: Tolerance(1e-4, 2e-3),  # the loss ≈ log V ≈ 11, a mean of N terms
        torch.float16: Tolerance(5e-3, 1e-2),
        torch.bfloat16: Tolerance(2e-2, 3e-2),
    }

    def make_provider(self, name: str, device: torch.device | str, dtype: torch.dtype,
                      softcap: float | None = None) -> Provider:
        device = torch.device(device)
        if name in ("fastalign-nll", "fastalign-nll-mkl"):
            return _linear_nll_provider(name, device)
        ours = linear_logprobs.fastalign_provider(name, device)
        if ours is not None:
            return _mean_of_logprobs(ours)
        peer = eager_provider(name, self.name, eager_nll,
                              "matmul in input dtype, cross_entropy in float32")
        if peer is not None:
            return peer
        if name == "torch-lce":
            return linear_logprobs.torch_lce_provider(device, dtype, softcap, reduction="mean")
        if name == "liger":
            return linear_logprobs.liger_provider(device, reduction="mean")
        if name in ("cce", "cce-exact", "cce-compile"):
            return linear_logprobs.cce_provider(device, exact=name == "cce-exact",
                                                reduction="mean", compiled=name == "cce-compile")
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(self.providers)}")

    def reference(self, inputs: LogprobInputs,
                  chunk_bytes: int = heads.GROUND_TRUTH_CHUNK_BYTES) -> Outputs:
        """Ground truth: per-token NLL from ``linear_logprobs_reference`` in float32, chunked
        (``heads.token_chunked_ground_truth``) with upstream UPSTREAM / N on each token."""
        n = inputs.shape.n

        def nll(h, weight, part):
            return -linear_logprobs_reference(h, weight, inputs.targets[part],
                                              softcap=inputs.softcap)

        upstream = torch.full((n,), UPSTREAM / n, device=inputs.device)
        truth = heads.token_chunked_ground_truth(inputs, upstream, torch.float32, nll, "nll",
                                                 chunk_bytes)
        return {"loss": truth.pop("nll").mean(), **truth}

    def run_outputs(self, provider: Provider, inputs: LogprobInputs) -> Outputs:
        loss = provider.fn(inputs.hidden, inputs.weight, inputs.targets, inputs.softcap)
        if loss.dtype != torch.float32 or loss.dim() != 0:
            raise ProviderMismatchError(f"{provider.name} returned {loss.dtype} "
                                        f"{tuple(loss.shape)}, expected a float32 scalar")
        dhidden, dweight = torch.autograd.grad(loss, (inputs.hidden, inputs.weight),
                                               loss.new_tensor(UPSTREAM))
        return {"loss": loss.detach(), "dhidden": dhidden.float(), "dweight": dweight.float()}

    def make_mode_fn(self, provider: Provider, inputs: LogprobInputs, mode: str) -> ModeFn:
        if mode != "full":
            raise ValueError(f"{self.name} modes are {self.modes}, got {mode!r}")
        h, w, t, sc = inputs.hidden, inputs.weight, inputs.targets, inputs.softcap
        upstream = torch.tensor(UPSTREAM, device=inputs.device)
        return ModeFn(lambda _: torch.autograd.grad(provider.fn(h, w, t, sc), (h, w), upstream))


BENCHMARK = LinearNllBenchmark()
