"""The ``dpo`` benchmark: one DPO step's loss work, fused against TRL-style eager PyTorch.

B pairs, 2B sequences of T tokens (the chosen ones stacked on the rejected ones, as TRL's
concatenated forward): policy hidden [2B, T, H] and head [V, H] requiring grad, reference hidden
and head without grad, Hugging Face labels [2B, T] (-100 on the prompt, the first quarter of each
sequence, and on a few padding positions at the end). One step's loss work is sigmoid DPO with
β = 0.1 on summed sequence log-probs, then backward to hidden and weight. Providers:

* ``fastalign``: ``FusedDPOLoss(beta=0.1)(hidden, weight, labels, ref_hidden=..., ref_weight=...)``
  (impl "triton" on CUDA, "cpp" on CPU): the head's gradients formed in forward, one chunk of
  whole pairs at a time (``fastalign.ops.sequence_loss``).
* ``fastalign-streamed``: the same with ``gradients_in_forward=False``: ``linear_logprobs``
  streams the head, its backward recomputes the logits.
* ``eager``: what TRL's DPOTrainer does with the logits: full [2B, T, V] logits for the policy and,
  under ``no_grad``, for the reference; float32 ``log_softmax``, gather of the next-token labels,
  masked sums, ``fastalign.losses.dpo.dpo_loss``.
* ``compile``: ``torch.compile`` of ``eager``'s step function (when it compiles).

Modes: ``forward`` (the loss, graph built) and ``full`` (loss, then gradients of hidden, weight).

The reference head is the policy's perturbed by ``heads.REF_NOISE``, so DPO's implicit rewards
are O(1), as early in fine-tuning. The ground truth materialises the logits a few sequences at a
time in float64 (CPU) or float32 (CUDA); see ``DPOBenchmark.reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.bench import heads
from fastalign.bench.harness import (
    Benchmark,
    Outputs,
    Provider,
    ProviderMismatchError,
    eager_provider,
    fused_impl,
    parse_dims,
)
from fastalign.bench.measure import ModeFn
from fastalign.losses.dpo import dpo_loss

DPO_BETA = 0.1
IGNORE_INDEX = -100


@dataclass(frozen=True)
class DPOShape:
    """B pairs of sequences of T tokens (N = 2·B·T hidden states), hidden size H, vocabulary V."""

    b: int
    t: int
    h: int
    v: int
    softcap: float | None = None
    label: str = ""

    @property
    def n(self) -> int:
        return 2 * self.b * self.t

    def __str__(self) -> str:
        return heads.shape_title(f"B={self.b} T={self.t} (N={self.n}) H={self.h} V={self.v}",
                                 self.softcap, self.label)


def parse_dpo_shape(text: str) -> DPOShape:
    """Parse ``"B,T,H,V"`` or ``"B,T,H,V,SOFTCAP"`` (softcap 0 means none)."""
    (b, t, h, v), softcap = parse_dims(text, "B,T,H,V", what="DPO shape")
    if min(b, h, v) < 1 or t < 8:
        raise ValueError(f"B, H and V must be positive and T at least 8, got {text!r}")
    return DPOShape(b, t, h, v, softcap)


@dataclass
class DPOInputs(heads.HeadInputs):
    """hidden [2B, T, H], weight [V, H] (requires_grad), ref_hidden, ref_weight (no grad), in the
    benchmark dtype; labels [2B, T] int64 (-100 on prompts and padding), chosen rows first."""

    shape: DPOShape
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor


def make_dpo_labels(shape: DPOShape, device: torch.device | str) -> torch.Tensor:
    """[2B, T] random token ids; -100 on the prompt (the first quarter of every sequence) and on
    0 to T/32 padding positions at the end of each sequence."""
    labels = torch.randint(0, shape.v, (2 * shape.b, shape.t), device=device)
    labels[:, : shape.t // 4] = IGNORE_INDEX
    max_pad = max(1, shape.t // 32)
    pads = torch.randint(0, max_pad + 1, (2 * shape.b,)).tolist()
    for row, pad in enumerate(pads):
        if pad:
            labels[row, shape.t - pad:] = IGNORE_INDEX
    return labels


def _eager_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's way: [2B, T, V] logits, shift, float32 log_softmax, gather, masked sum per sequence.
    Returns (summed log-probs [2B], float32 or float64 for float64 inputs; number of scored
    tokens [2B])."""
    logits = heads.float_logits(hidden, weight, softcap)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logps = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1)


def eager_dpo(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
              ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
              softcap: float | None = None) -> tuple[torch.Tensor, dict]:
    """One DPO step's loss as TRL computes it from materialised logits: ``(loss, metrics)``."""
    logps, _ = _eager_sequence_logps(hidden, weight, labels, softcap)
    with torch.no_grad():
        ref_logps, _ = _eager_sequence_logps(ref_hidden, ref_weight, labels, softcap)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    # Sigmoid DPO needs no lengths (passing them costs a device sync, and a graph break).
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=DPO_BETA)


class DPOBenchmark(Benchmark):
    name = "dpo"
    summary = ("one DPO step's loss work: FusedDPOLoss(beta=0.1) on 2B sequences (chosen "
               "stacked on rejected) vs TRL-style eager ([2B, T, V] logits for policy and "
               "reference, log_softmax, gather, masked sums, dpo_loss) and torch.compile")
    modes = ("forward", "full")
    modes_note = "(loss, then gradients of hidden and weight)"
    providers = ("fastalign", "fastalign-streamed", "eager", "compile")
    shape_syntax = "B,T,H,V[,SOFTCAP]"
    shape_meaning = "B pairs (2B sequences) of T tokens each"
    default_shapes_help = "CPU 2,512,1024,32000 float32; CUDA 4,1024,4096,128256 (Llama-3), bf16"
    example_shapes = "2,64,128,4000"
    # Forward: policy and reference logits, 2·N·H·V each. Full: the policy's streamed forward +
    # backward with recompute, 8·N·H·V (as linear_logprobs' "full"), plus the reference
    # forward, 2·N·H·V; with the gradients formed in forward (and by eager) the policy does
    # 6·N·H·V, but every provider is credited the same work.
    flops_per_nhv = {"forward": 4, "full": 10}
    flops_remark = "(policy 8, reference 2), N = 2*B*T"
    flops_note = ("N = 2·B·T. FLOPs credited: forward 4·N·H·V (policy 2 + reference 2), full "
                  "10·N·H·V (policy 8: forward 2, recompute 2, dh 2, dW 2; reference 2), for "
                  "every provider; all N tokens count, though the fused op skips tiles of "
                  "prompt and padding tokens.")
    shape_columns_names = ("B", "T", "N", "H", "V", "softcap")
    value_key = "loss"
    tolerances = heads.GROUND_TRUTH_TOLERANCES
    eager_half_precision_slack = heads.EAGER_HALF_PRECISION_SLACK
    truth = "ground truth"

    def parse_shape(self, text: str) -> DPOShape:
        return parse_dpo_shape(text)

    def default_shapes(self, device: torch.device | str) -> list[DPOShape]:
        """CPU: B=2 pairs of T=512 (2048 tokens), H=1024, V=32000. CUDA: the Llama-3 head,
        B=4, T=1024 (8192 tokens)."""
        if torch.device(device).type == "cuda":
            return [DPOShape(4, 1024, 4096, 128256, None, "llama3")]
        return [DPOShape(2, 512, 1024, 32000)]

    def small_shape(self, device: torch.device | str) -> DPOShape:
        if torch.device(device).type == "cuda":
            return DPOShape(2, 256, 1024, 32000)
        return DPOShape(2, 64, 128, 4000)

    def shape_columns(self, shape: DPOShape) -> dict:
        return {"B": shape.b, "T": shape.t, "N": shape.n, "H": shape.h, "V": shape.v,
                "softcap": "" if shape.softcap is None else shape.softcap}

    def make_inputs(self, shape: DPOShape, dtype: torch.dtype, device: torch.device | str,
                    seed: int = 0) -> DPOInputs:
        device = torch.device(device)
        torch.manual_seed(seed)
        hidden, weight = heads.random_head((2 * shape.b, shape.t), shape.h, shape.v, dtype,
                                           device)
        ref_hidden, ref_weight = heads.reference_head(hidden, weight)
        labels = make_dpo_labels(shape, device)
        return DPOInputs(shape, hidden, weight, labels, ref_hidden, ref_weight)

    def make_provider(self, name: str, device: torch.device | str, dtype: torch.dtype,
                      softcap: float | None = None) -> Provider:
        device = torch.device(device)
        if name in ("fastalign", "fastalign-streamed"):
            from fastalign.fused import FusedDPOLoss

            impl = fused_impl(device)
            in_forward = name == "fastalign"

            def fn(hidden, weight, labels, ref_hidden, ref_weight, softcap, _impl=impl):
                loss_fn = FusedDPOLoss(beta=DPO_BETA, softcap=softcap, impl=_impl,
                                       gradients_in_forward=in_forward)
                return loss_fn(hidden, weight, labels, ref_hidden=ref_hidden,
                               ref_weight=ref_weight)

            note = f"FusedDPOLoss(beta={DPO_BETA}), impl={impl!r}" + (
                "" if in_forward else ", gradients_in_forward=False")
            return Provider(name, fn, note)
        peer = eager_provider(name, self.name, eager_dpo, "TRL-style: [2B, T, V] logits, "
                              "float32 log_softmax, gather, masked sums, dpo_loss")
        if peer is not None:
            return peer
        raise ValueError(f"unknown dpo provider {name!r}; known: {', '.join(self.providers)}")

    def reference(self, inputs: DPOInputs,
                  chunk_bytes: int = heads.GROUND_TRUTH_CHUNK_BYTES) -> Outputs:
        """Ground truth in float64 (CPU) or float32 (CUDA), materialising the logits a few
        sequences at a time: (1) summed log-probs of every sequence, policy and reference,
        without grad; (2) the DPO loss and its gradient g [2B] with respect to the policy sums;
        (3) per chunk again, backward of Σ g·logps to hidden and weight."""
        dtype = heads.ground_truth_dtype(inputs.device)
        shape = inputs.shape
        seqs = max(1, min(2 * shape.b, chunk_bytes // (dtype.itemsize * shape.t * shape.v)))
        chunks = [slice(start, start + seqs) for start in range(0, 2 * shape.b, seqs)]
        weight = inputs.weight.detach().to(dtype).requires_grad_()
        ref_weight = inputs.ref_weight.to(dtype)
        hidden = inputs.hidden.detach()

        def seq_logps(h, w, part):
            return _eager_sequence_logps(h.to(dtype), w, inputs.labels[part], shape.softcap)

        with torch.no_grad():
            policy = [seq_logps(hidden[part], weight, part) for part in chunks]
            ref_sums = torch.cat([seq_logps(inputs.ref_hidden[part], ref_weight, part)[0]
                                  for part in chunks])
        sums = torch.cat([logps for logps, _ in policy]).requires_grad_()
        chosen, rejected = sums.chunk(2)
        ref_chosen, ref_rejected = ref_sums.chunk(2)
        loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=DPO_BETA)
        (grad_sums,) = torch.autograd.grad(loss, sums)
        dhiddens = []
        dweight = torch.zeros_like(weight)
        for part in chunks:
            h = hidden[part].to(dtype).requires_grad_()
            logps, _ = seq_logps(h, weight, part)
            dh, dw = torch.autograd.grad(logps, (h, weight), grad_sums[part])
            dhiddens.append(dh)
            dweight += dw
            del logps, dh, dw, h
        return {"loss": loss.detach(), "dhidden": torch.cat(dhiddens), "dweight": dweight}

    @staticmethod
    def _call(provider: Provider, inputs: DPOInputs):
        return provider.fn(inputs.hidden, inputs.weight, inputs.labels, inputs.ref_hidden,
                           inputs.ref_weight, inputs.shape.softcap)

    def run_outputs(self, provider: Provider, inputs: DPOInputs) -> Outputs:
        loss, _ = self._call(provider, inputs)
        if loss.dim() != 0 or not loss.dtype.is_floating_point:
            raise ProviderMismatchError(f"{provider.name} returned a loss of shape "
                                        f"{tuple(loss.shape)} {loss.dtype}, expected 0-d float")
        dhidden, dweight = torch.autograd.grad(loss, (inputs.hidden, inputs.weight))
        return {"loss": loss.detach(), "dhidden": dhidden, "dweight": dweight}

    def make_mode_fn(self, provider: Provider, inputs: DPOInputs, mode: str) -> ModeFn:
        h, w = inputs.hidden, inputs.weight
        if mode == "forward":
            return ModeFn(lambda _: self._call(provider, inputs))
        if mode == "full":
            return ModeFn(lambda _: torch.autograd.grad(self._call(provider, inputs)[0],
                                                        (h, w)))
        raise ValueError(f"{self.name} modes are {self.modes}, got {mode!r}")


BENCHMARK = DPOBenchmark()
