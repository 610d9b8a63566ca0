// CPU kernels of linear_kl: the exact per-token KL divergence between the softmax of two LM heads
// (policy and reference), streamed over vocabulary blocks so that neither [tokens x vocab] logit
// tensor is ever allocated. The math is ALGORITHMS.md §2; the kernels compute KL(p‖q) with p from
// the first head (hidden, weight, bias) and q from the second (ref_*). The Python layer gets the
// other direction by swapping the two heads.
#pragma once

#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace fastalign {

// Returns {kl[N], lse[N], ref_lse[N]}, all float64: KL(p‖q) per row (≥ 0), and the log-sum-exp of
// each head's scaled logits (what backward needs besides kl).
// hidden [N, H], weight [V, H], bias [V], ref_hidden [N, H_ref], ref_weight [V, H_ref] and
// ref_bias [V] share one dtype (float32, bfloat16, float16, float64); H_ref may differ from H.
// Both heads use the same temperature and softcap (softcap == 0 means none).
// With the policy's targets ([N] int64, each in [0, V) or ignore_index) the same pass also returns
// {..., logp[N], entropy[N], sum_pz[N]}: the policy's log-prob of each target and its entropy (0
// where the target is ignore_index; float32, float64 for float64 inputs) and Σ p z (float64, for
// backward).
std::vector<at::Tensor> linear_kl_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias,
                                          const at::Tensor& ref_hidden,
                                          const at::Tensor& ref_weight,
                                          const c10::optional<at::Tensor>& ref_bias,
                                          double temperature, double softcap,
                                          const c10::optional<at::Tensor>& targets,
                                          int64_t ignore_index);

// Returns {dhidden, dweight, dbias, dref_hidden, dref_weight, dref_bias}, each in the dtype of its
// input, or undefined (None in Python) when not asked for. grad_kl is [N] float32 (float64 for
// float64 inputs); kl, lse and ref_lse are forward's float64 [N] tensors. Rows whose grad_kl is 0
// are skipped (their gradients are exact zeros); work on a head none of whose gradients is asked
// for is limited to recomputing its logits. With targets (as given to forward), sum_pz (forward's)
// and grad_logp (grad_entropy optional, in grad_kl's dtype): the gradients of all three outputs.
std::vector<at::Tensor> linear_kl_backward(
    const at::Tensor& grad_kl, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& ref_hidden,
    const at::Tensor& ref_weight, const c10::optional<at::Tensor>& ref_bias, const at::Tensor& kl,
    const at::Tensor& lse, const at::Tensor& ref_lse, double temperature, double softcap,
    bool compute_dhidden, bool compute_dweight, bool compute_dbias, bool compute_dref_hidden,
    bool compute_dref_weight, bool compute_dref_bias, const c10::optional<at::Tensor>& grad_logp,
    const c10::optional<at::Tensor>& grad_entropy, const c10::optional<at::Tensor>& targets,
    const c10::optional<at::Tensor>& sum_pz, int64_t ignore_index);

}  // namespace fastalign
