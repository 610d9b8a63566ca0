// CPU kernels of linear_logprobs: per-token log-probabilities and entropies straight from the
// LM head, streamed over vocabulary blocks so that no [tokens x vocab] tensor is ever allocated.
// The contract (shapes, dtypes, what is saved for backward) is documented in
// fastalign/linear_logprobs.py; the math in ALGORITHMS.md §1.
#pragma once

#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace fastalign {

// Returns {logp[N], entropy[N], lse[N], sum_pz[N]}: logp and entropy float32 (float64 for float64
// inputs), lse and sum_pz float64 always (backward subtracts them from logits of their size).
// hidden [N, H], weight [V, H] and bias [V] share one dtype (float32, bfloat16, float16, float64);
// targets [N] int64. softcap == 0 means no softcap. Rows whose target is ignore_index get
// logp = entropy = 0 (their lse and sum_pz are 0). With off_shard_targets (weight is one shard of
// a vocabulary split across ranks), a target >= V belongs to another shard: the row is computed
// (lse, sum_pz and the entropy of this shard's columns) with no target logit (logp = -lse).
std::vector<at::Tensor> linear_logprobs_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& bias,
                                                const at::Tensor& targets, double temperature,
                                                double softcap, int64_t ignore_index,
                                                bool off_shard_targets = false);

// Returns {dhidden, dweight, dbias}, each in the dtype of its input, or undefined (None in
// Python) when not asked for. grad_logp and grad_entropy are [N] in the dtype of forward's logp
// (float32, or float64 for float64 inputs; grad_entropy may be absent = 0); lse and sum_pz are
// forward's float64 [N] tensors (or, for a vocabulary shard, the statistics of the whole
// vocabulary, which make these the exact gradients of the shard's columns).
std::vector<at::Tensor> linear_logprobs_backward(
    const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& sum_pz,
    double temperature, double softcap, int64_t ignore_index, bool compute_dhidden,
    bool compute_dweight, bool compute_dbias, bool off_shard_targets = false);

}  // namespace fastalign
