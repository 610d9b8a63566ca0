"""The row passes over a chunk's logits, for the ops that form their gradients in forward
(``fastalign.ops.sequence_loss``, ``linear_nll``): a tile of raw logits a [n, V] (whole
vocabulary rows) → per-row statistics (log p of the target, entropy, log Σp²); then, given the
upstream gradients of log p and of the entropy, the tile → ∂L/∂a in place.

Three implementations of one interface: the C++ extension (``csrc/sequence_rows_cpu.cpp``),
Triton (``fastalign.kernels.sequence_rows``) and plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ROW_PASSES", "RowStats", "TorchRows", "CppRows", "TritonRows"]


@dataclass
class RowStats:
    """One chunk's per-row results: float32 (float64) [n] each; ``state`` is what the
    implementation's gradient pass needs back (its own layout)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    log_sum_sq: torch.Tensor
    state: tuple


class TorchRows:
    """The row passes in plain PyTorch (several passes over the tile, temporaries of its size)."""

    bytes_per_logit = 12  # z, p and one more temporary of the tile's size (float32)

    @staticmethod
    def _z(tile, bias, temperature, softcap):
        a = tile if bias is None else tile + bias
        if softcap:
            th = torch.tanh(a / softcap)
            return th * (softcap / temperature), (1.0 - th * th) / temperature
        return a / temperature, 1.0 / temperature

    def stats(self, tile, bias, targets, temperature, softcap) -> RowStats:
        z, _ = self._z(tile, bias, temperature, softcap)
        lse = torch.logsumexp(z, dim=1)
        log_p = z - lse[:, None]
        logp = log_p.gather(1, targets[:, None]).squeeze(1).clamp(max=0.0)
        p = log_p.exp()
        entropy = -(p * log_p).sum(1)
        log_sum_sq = torch.logsumexp(2.0 * log_p, dim=1)
        return RowStats(logp, entropy, log_sum_sq, (lse, entropy))

    def grad(self, tile, bias, targets, stats: RowStats, grad_logp, grad_entropy, temperature,
             softcap) -> None:
        lse, entropy = stats.state
        z, dz_da = self._z(tile, bias, temperature, softcap)
        log_p = z - lse[:, None]
        p = log_p.exp()
        dz = p * grad_logp[:, None]
        if grad_entropy is not None:
            dz += p * (log_p + entropy[:, None]) * grad_entropy[:, None]
        dz.neg_().scatter_add_(1, targets[:, None], grad_logp[:, None])
        tile.copy_(dz * dz_da)


class CppRows:
    """The row passes of the C++ extension (vectorised, rows over threads, one pass each)."""

    bytes_per_logit = 0

    def stats(self, tile, bias, targets, temperature, softcap) -> RowStats:
        from fastalign.ops._extension import EXTENSION

        # lse and Σ p z kept in float64: the gradient pass splits them into hi + lo, so that
        # p = e^{z − lse} of a confident target keeps its digits (as linear_logprobs' backward).
        logp, entropy, lse, sum_pz, log_sum_sq = EXTENSION.sequence_rows_stats(
            tile, bias, targets, temperature, softcap, float64_stats=True)
        return RowStats(logp, entropy, log_sum_sq, (lse, sum_pz))

    def grad(self, tile, bias, targets, stats, grad_logp, grad_entropy, temperature,
             softcap) -> None:
        from fastalign.ops._extension import EXTENSION

        lse, sum_pz = stats.state
        EXTENSION.sequence_rows_grad(tile, bias, targets, lse, sum_pz, grad_logp, grad_entropy,
                                     temperature, softcap)


class TritonRows:
    """The row passes as Triton kernels (``fastalign.kernels.sequence_rows``), on a tile in the
    input dtype."""

    bytes_per_logit = 0

    def stats(self, tile, bias, targets, temperature, softcap) -> RowStats:
        from fastalign.kernels.sequence_rows import sequence_rows_stats

        logp, entropy, lse, log_sum_sq = sequence_rows_stats(tile, bias, targets, temperature,
                                                             softcap)
        return RowStats(logp, entropy, log_sum_sq, (lse, entropy))

    def grad(self, tile, bias, targets, stats, grad_logp, grad_entropy, temperature,
             softcap) -> None:
        from fastalign.kernels.sequence_rows import sequence_rows_grad

        lse, entropy = stats.state
        sequence_rows_grad(tile, bias, targets, lse, entropy, grad_logp, grad_entropy,
                           temperature, softcap)


ROW_PASSES = {"torch": TorchRows(), "cpp": CppRows(), "triton": TritonRows()}
