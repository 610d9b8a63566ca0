// CPU kernel of linear_nll: the summed NLL of the targets under an LM head and its gradients in
// one pass, for a loss whose upstream gradient is known in forward (fastalign/ops/linear_nll.py
// holds the contract; ALGORITHMS.md §1 the math).
#pragma once

#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace fastalign {

// Returns {nll[N], entropy[N], argmax[N], dhidden, dweight, dbias}: nll and entropy float32
// (float64 for float64 inputs), argmax int64 (the first column of the largest logit), all three
// 0 on rows whose target is ignore_index; the entropy and arg-max come from the loss's pass over
// each row (metrics, no gradient). The gradients of scale · Σ_n nll_n, each in the dtype of
// its input, or undefined (None in Python) when not asked for. hidden [N, H], weight [V, H] and
// bias [V] share one dtype (float32, bfloat16, float16, float64); targets [N] int64; softcap 0
// means none. block_rows: tokens per block, whose [block_rows, V] logits are all the workspace.
std::vector<at::Tensor> linear_nll_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias,
                                           const at::Tensor& targets, double scale,
                                           double temperature, double softcap,
                                           int64_t ignore_index, bool compute_dhidden,
                                           bool compute_dweight, bool compute_dbias,
                                           int64_t block_rows);

}  // namespace fastalign
