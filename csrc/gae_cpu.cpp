// GAE on CPU: rows in parallel (ATen/OpenMP), each one sequential reverse scan.
//
// The arithmetic mirrors gae_reference operation for operation, so that the results agree bit for
// bit: the reference computes on 0-d tensors of the row dtype, where a Python float operand (γ,
// and γ·λ, which Python multiplies in float64 first) is rounded to that dtype, and each product
// and sum is rounded separately (the build disables floating-point contraction, so no fused
// multiply-add changes a rounding).

#include "gae_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "checks.h"

namespace fastalign {
namespace {

using cpu::check_cpu_contiguous;

template <typename T>
void gae_rows(const T* rewards, const T* values, const bool* mask, T* advantages, T* returns,
              int64_t row0, int64_t row1, int64_t steps, T gamma, T gamma_lam) {
  for (int64_t b = row0; b < row1; ++b) {
    const T* r = rewards + b * steps;
    const T* v = values + b * steps;
    const bool* m = mask + b * steps;
    T* adv = advantages + b * steps;
    T* ret = returns + b * steps;
    T next_value = T(0);
    T running = T(0);
    for (int64_t t = steps - 1; t >= 0; --t) {
      if (!m[t]) {
        adv[t] = T(0);
        ret[t] = T(0);
        continue;
      }
      const T delta = (r[t] + gamma * next_value) - v[t];
      running = delta + gamma_lam * running;
      adv[t] = running;
      ret[t] = running + v[t];
      next_value = v[t];
    }
  }
}

}  // namespace

std::vector<at::Tensor> gae_forward(const at::Tensor& rewards, const at::Tensor& values,
                                    const at::Tensor& mask, double gamma, double lam) {
  constexpr const char* fn = "gae_forward";
  check_cpu_contiguous(fn, "rewards [B, T]", rewards, 2);
  check_cpu_contiguous(fn, "values [B, T]", values, 2);
  check_cpu_contiguous(fn, "mask [B, T]", mask, 2);
  const auto dtype = rewards.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, fn,
                   ": rewards must be float32 or float64, got ", dtype);
  TORCH_CHECK_TYPE(values.scalar_type() == dtype, fn, ": values must have rewards' dtype ", dtype,
                   ", got ", values.scalar_type());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, fn, ": mask must be bool, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(values.sizes() == rewards.sizes(), fn,
                    ": values must have the shape of rewards ", rewards.sizes(), ", got ",
                    values.sizes());
  TORCH_CHECK_VALUE(mask.sizes() == rewards.sizes(), fn,
                    ": mask must have the shape of rewards ", rewards.sizes(), ", got ",
                    mask.sizes());
  TORCH_CHECK_VALUE(std::isfinite(gamma), fn, ": gamma must be finite, got ", gamma);
  TORCH_CHECK_VALUE(std::isfinite(lam), fn, ": lam must be finite, got ", lam);

  const int64_t batch = rewards.size(0), steps = rewards.size(1);
  at::Tensor advantages = at::empty({batch, steps}, rewards.options());
  at::Tensor returns = at::empty({batch, steps}, rewards.options());
  if (batch == 0 || steps == 0) {
    return {advantages, returns};
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, fn, [&] {
    using T = scalar_t;
    const T* r = rewards.data_ptr<T>();
    const T* v = values.data_ptr<T>();
    const bool* m = mask.data_ptr<bool>();
    T* adv = advantages.data_ptr<T>();
    T* ret = returns.data_ptr<T>();
    const T g = static_cast<T>(gamma);
    const T gl = static_cast<T>(gamma * lam);
    // A row is a few hundred to a few thousand dependent steps: a grain of ~32k positions keeps
    // small batches on one thread.
    const int64_t grain = std::max<int64_t>(1, 32768 / steps);
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      gae_rows<T>(r, v, m, adv, ret, b0, b1, steps, g, gl);
    });
  });
  return {advantages, returns};
}

}  // namespace fastalign
