// CPU kernel of GAE (generalised advantage estimation, ALGORITHMS.md §8): one reverse scan per row
// over the masked positions. Must agree exactly with fastalign.reference.gae_reference.
#pragma once

#include <vector>

#include <ATen/ATen.h>

namespace fastalign {

// Returns {advantages [B, T], returns [B, T]} in the dtype of rewards. rewards and values are
// [B, T] contiguous CPU tensors of one dtype (float32 or float64); mask is [B, T] bool. Per row,
// only the positions where mask is true take part, walked from the last to the first: the next
// value of a position is the value at the next masked position of its row (0 after the last),
//   δ_t = r_t + γ·V_next − V_t,   A_t = δ_t + γλ·A_next,   R_t = A_t + V_t,
// and positions outside the mask get A = R = 0.
std::vector<at::Tensor> gae_forward(const at::Tensor& rewards, const at::Tensor& values,
                                    const at::Tensor& mask, double gamma, double lam);

}  // namespace fastalign
