// Argument checks shared by the entry points of fastalign's C++ extension. Each entry point checks
// everything it is given before it allocates anything; the messages name the function and the
// argument, as the Python layer shows them to the user.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace fastalign {
namespace cpu {

// Kernels compute in float32, or in float64 for float64 inputs.
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool has_tensor(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_cpu_contiguous(const char* fn, const char* name, const at::Tensor& t,
                                 int64_t dim) {
  TORCH_CHECK_VALUE(t.defined(), fn, ": ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ",
                    t.device());
  TORCH_CHECK_VALUE(t.dim() == dim, fn, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// A per-row tensor of n entries (an upstream gradient, a saved row statistic).
inline void check_row_stat(const char* fn, const char* name, const at::Tensor& t, int64_t n,
                           at::ScalarType dtype) {
  check_cpu_contiguous(fn, name, t, 1);
  TORCH_CHECK_VALUE(t.size(0) == n, fn, ": ", name, " must have shape [N] = [", n, "], got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, fn, ": ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
}

// The dtypes the LM-head ops take (they compute in compute_dtype of it).
inline void check_head_dtype(const char* fn, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                       dtype == at::kDouble,
                   fn, ": hidden must be float32, bfloat16, float16 or float64, got ", dtype);
}

// The logit transform of the LM-head ops: z = softcap · tanh(a / softcap) / temperature.
inline void check_logit_options(const char* fn, double temperature, double softcap) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, fn,
                    ": temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, fn,
                    ": softcap must be finite and >= 0 (0 = no softcap), got ", softcap);
}

// bias [V] contiguous CPU, in the dtype of the tensor it goes with (`owner`, for the message).
inline void check_bias(const char* fn, const at::Tensor& bias, const char* owner,
                       at::ScalarType dtype, int64_t vocab) {
  check_cpu_contiguous(fn, "bias [V]", bias, 1);
  TORCH_CHECK_TYPE(bias.scalar_type() == dtype, fn, ": bias must have ", owner, "'s dtype ",
                   dtype, ", got ", bias.scalar_type());
  TORCH_CHECK_VALUE(bias.size(0) == vocab, fn, ": bias must have shape [V] = [", vocab,
                    "], got ", bias.sizes());
}

// One LM head and its targets: hidden [N, H], weight [V, H] (V >= 1) and bias [V] contiguous CPU
// tensors of one dtype the head ops take, targets [N] int64.
inline void check_head_and_targets(const char* fn, const at::Tensor& hidden,
                                   const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& targets) {
  check_cpu_contiguous(fn, "hidden [N, H]", hidden, 2);
  check_cpu_contiguous(fn, "weight [V, H]", weight, 2);
  check_cpu_contiguous(fn, "targets [N]", targets, 1);
  const auto dtype = hidden.scalar_type();
  check_head_dtype(fn, dtype);
  TORCH_CHECK_TYPE(weight.scalar_type() == dtype, fn,
                   ": hidden and weight must have the same dtype, got ", dtype, " and ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), fn, ": hidden is [N, H] with H = ",
                    hidden.size(1), " but weight is [V, H] with H = ", weight.size(1));
  TORCH_CHECK_VALUE(weight.size(0) >= 1, fn, ": weight must have at least one row (V >= 1)");
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, fn, ": targets must be int64, got ",
                   targets.scalar_type());
  TORCH_CHECK_VALUE(targets.size(0) == hidden.size(0), fn, ": targets must have shape [N] = [",
                    hidden.size(0), "], got ", targets.sizes());
  if (has_tensor(bias)) {
    check_bias(fn, *bias, "weight", dtype, weight.size(0));
  }
}

// targets [N] int64, each in [0, V) or, when ignore_index is given, equal to it.
inline void check_targets(const char* fn, const at::Tensor& targets, int64_t n,
                          int64_t vocab, c10::optional<int64_t> ignore_index) {
  check_cpu_contiguous(fn, "targets [N]", targets, 1);
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, fn, ": targets must be int64, got ",
                   targets.scalar_type());
  TORCH_CHECK_VALUE(targets.size(0) == n, fn, ": targets must have shape [N] = [", n, "], got ",
                    targets.sizes());
  const int64_t* y = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (ignore_index.has_value()) {
      TORCH_CHECK_VALUE(y[i] == *ignore_index || (y[i] >= 0 && y[i] < vocab), fn,
                        ": targets must lie in [0, V) = [0, ", vocab,
                        ") or equal ignore_index (", *ignore_index, "); found ", y[i],
                        " at position ", i);
    } else {
      TORCH_CHECK_VALUE(y[i] >= 0 && y[i] < vocab, fn, ": targets must lie in [0, V) = [0, ",
                        vocab, "); found ", y[i], " at position ", i);
    }
  }
}

}  // namespace cpu
}  // namespace fastalign
