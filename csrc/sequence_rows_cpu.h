// CPU row passes of the sequence-loss engine (fastalign/ops/sequence_loss.py): for a tile of
// LM-head logits holding whole rows of the vocabulary, the per-row log-softmax statistics, and,
// once the loss's upstream gradients are known, dL/da in place (the engine turns it into the
// head's gradients with matrix products itself).
#pragma once

#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace fastalign {

// tile [N, V] float32 or float64, contiguous CPU: raw logits a (left unchanged); bias [V] of the
// tile's dtype or absent; targets [N] int64, each in [0, V). z = softcap·tanh((a + b)/softcap)/T
// (softcap 0: (a + b)/T). Returns {logp, entropy, lse, sum_pz, log_sum_sq}, each [N] in the
// tile's dtype: log p_y, −Σ p log p, logsumexp z, Σ p z and log Σ p²; with float64_stats, lse
// and sum_pz in float64 (for a gradient pass that keeps 1 − p_y of a dominant target exact).
std::vector<at::Tensor> sequence_rows_stats(const at::Tensor& tile,
                                            const c10::optional<at::Tensor>& bias,
                                            const at::Tensor& targets, double temperature,
                                            double softcap, bool float64_stats = false);

// Overwrites tile (raw logits a, as sequence_rows_stats took them) with dL/da for
// L = Σ_n grad_logp_n·logp_n + grad_entropy_n·entropy_n. lse and sum_pz are sequence_rows_stats'
// outputs (in the tile's dtype or float64); grad_logp and grad_entropy (absent: 0) are [N] in the
// tile's dtype.
void sequence_rows_grad(const at::Tensor& tile, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& targets, const at::Tensor& lse,
                        const at::Tensor& sum_pz, const at::Tensor& grad_logp,
                        const c10::optional<at::Tensor>& grad_entropy, double temperature,
                        double softcap);

}  // namespace fastalign
