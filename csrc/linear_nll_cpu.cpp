// linear_nll on CPU: the NLL of the targets and its head gradients in one pass per token block
// (ALGORITHMS.md §1, "6·N·H·V"), for a loss whose upstream gradient is known in forward.
//
//   per block of rows: tile = h_blk @ Wᵀ (ATen → MKL, all threads), then one pass per row (rows
//   spread over threads) that forms z, the log-sum-exp, the row's NLL and overwrites the row
//   with scale·∂nll/∂a; then dh_blk = tile @ W, dW += tileᵀ @ h_blk, db += Σ_rows tile.
//
// The products run one at a time from this thread (each multithreaded inside), so the float32
// dW and db accumulators need no locking and the result does not depend on the thread count.
// Memory beyond inputs and gradients: one [block_rows, V] tile in float32 (float64), the float32
// copy of a bf16/fp16 weight (V·H·4 bytes: the tile's products read it once a block), the
// float32 accumulators. Rows whose target is ignore_index are dropped up front (streaming.h).

#include "linear_nll_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include "checks.h"
#include "streaming.h"

namespace fastalign {
namespace {

using namespace cpu;  // NOLINT(build/namespaces): the headers above

// What the row pass reads besides the row: z = cap_over_t · tanh(a · inv_cap) with a softcap,
// else z = a · inv_t.
template <typename T>
struct RowMath {
  const T* bias;  // [V] or nullptr
  int64_t vocab;
  T inv_t, inv_cap, cap_over_t, scale;
  bool softcap;

  // ∂z/∂a from z: (1 − tanh²)/T with tanh = z / cap_over_t, as (1 − t)(1 + t), whose 1 − t is
  // exact where t is near 1 (Sterbenz) and 1 − t·t would cancel.
  T dz_da(T z) const {
    if (!softcap) return inv_t;
    const T t = z / cap_over_t;
    return (T(1) - t) * (T(1) + t) * inv_t;
  }

  // Raw logits a of one row in x → scale·∂nll/∂a in place; returns the row's nll, and its
  // entropy and arg-max (first column of the largest z) through the last two arguments.
  T row(T* x, int64_t y, T& entropy, int64_t& argmax) const {
    T max = -std::numeric_limits<T>::infinity();
    argmax = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      T a = x[v];
      if (bias != nullptr) a += bias[v];
      const T z = softcap ? cap_over_t * std::tanh(a * inv_cap) : a * inv_t;
      x[v] = z;
      if (z > max) {
        max = z;
        argmax = v;
      }
    }
    T sum_exp = 0;
    for (int64_t v = 0; v < vocab; ++v) sum_exp += std::exp(x[v] - max);
    const T lse = max + std::log(sum_exp);
    const T z_target = x[y];
    entropy = 0;  // −Σ p·log p: terms of one sign, no cancellation
    for (int64_t v = 0; v < vocab; ++v) {
      const T log_p = x[v] - lse, p = std::exp(log_p);
      entropy -= p * log_p;
      x[v] = p * dz_da(x[v]) * scale;
    }
    x[y] -= dz_da(z_target) * scale;  // the −1[v = y] of p − 1[v = y]
    return std::max(lse - z_target, T(0));  // z_y ≤ lse exactly; rounding must not say otherwise
  }
};

void check_inputs(const char* fn, const at::Tensor& hidden, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
                  double scale, double temperature, double softcap, int64_t block_rows) {
  check_head_and_targets(fn, hidden, weight, bias, targets);
  check_logit_options(fn, temperature, softcap);
  TORCH_CHECK_VALUE(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(block_rows >= 1, fn, ": block_rows must be >= 1, got ", block_rows);
}

}  // namespace

std::vector<at::Tensor> linear_nll_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias,
                                           const at::Tensor& targets, double scale,
                                           double temperature, double softcap,
                                           int64_t ignore_index, bool compute_dhidden,
                                           bool compute_dweight, bool compute_dbias,
                                           int64_t block_rows) {
  constexpr const char* fn = "linear_nll_forward";
  check_inputs(fn, hidden, weight, bias, targets, scale, temperature, softcap, block_rows);
  compute_dbias = compute_dbias && has_tensor(bias);
  at::NoGradGuard no_grad;
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const at::ScalarType dtype = compute_dtype(hidden.scalar_type());
  const auto opts = hidden.options().dtype(dtype);
  at::Tensor nll = at::zeros({n}, opts), entropy = at::zeros({n}, opts);
  at::Tensor argmax = at::zeros({n}, targets.options());

  const int64_t* y = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(y[i] == ignore_index || (y[i] >= 0 && y[i] < vocab), fn,
                      ": targets must lie in [0, V) = [0, ", vocab, ") or equal ignore_index (",
                      ignore_index, "); found ", y[i], " at position ", i);
  }
  const RowSelection sel =
      select_rows(n, targets.options(), [&](int64_t i) { return y[i] != ignore_index; });
  if (sel.count == 0) {
    return {nll, entropy, argmax, zeros_if(compute_dhidden, hidden), zeros_if(compute_dweight, weight),
            zeros_if(compute_dbias, bias)};
  }
  const at::Tensor h = kept_rows(hidden, sel, dtype);
  const at::Tensor kept_targets = kept_rows(targets, sel, at::kLong);
  const at::Tensor w = weight.detach().to(dtype).contiguous();
  const at::Tensor b = has_tensor(bias) ? bias->detach().to(dtype).contiguous() : at::Tensor();
  const int64_t count = sel.count, rows = std::min(block_rows, count);

  at::Tensor dh = compute_dhidden ? at::empty({count, hidden.size(1)}, opts) : at::Tensor();
  at::Tensor dw = compute_dweight ? at::zeros({vocab, hidden.size(1)}, opts) : at::Tensor();
  at::Tensor db = compute_dbias ? at::zeros({vocab}, opts) : at::Tensor();
  at::Tensor kept_nll = at::empty({count}, opts), kept_entropy = at::empty({count}, opts);
  at::Tensor kept_argmax = at::empty({count}, targets.options());
  at::Tensor buffer = at::empty({rows * vocab}, opts);

  AT_DISPATCH_FLOATING_TYPES(dtype, fn, [&] {
    using T = scalar_t;
    const RowMath<T> math{b.defined() ? b.data_ptr<T>() : nullptr,
                          vocab,
                          static_cast<T>(1.0 / temperature),
                          static_cast<T>(softcap > 0 ? 1.0 / softcap : 0.0),
                          static_cast<T>(softcap / temperature),
                          static_cast<T>(scale),
                          softcap > 0};
    const int64_t* target = kept_targets.data_ptr<int64_t>();
    T* nll_out = kept_nll.data_ptr<T>();
    T* entropy_out = kept_entropy.data_ptr<T>();
    int64_t* argmax_out = kept_argmax.data_ptr<int64_t>();
    for (int64_t n0 = 0; n0 < count; n0 += rows) {
      const int64_t block = std::min(rows, count - n0);
      const at::Tensor h_blk = h.narrow(0, n0, block);
      at::Tensor tile = buffer.narrow(0, 0, block * vocab).view({block, vocab});
      at::mm_out(tile, h_blk, w.t());
      T* data = tile.data_ptr<T>();
      at::parallel_for(0, block, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = n0 + r;
          nll_out[i] = math.row(data + r * vocab, target[i], entropy_out[i], argmax_out[i]);
        }
      });
      if (dh.defined()) {
        at::Tensor dh_blk = dh.narrow(0, n0, block);
        at::mm_out(dh_blk, tile, w);
      }
      if (dw.defined()) dw.addmm_(tile.t(), h_blk);
      if (db.defined()) db.add_(tile.sum(0));
    }
  });

  if (sel.compact) {
    nll.index_copy_(0, sel.index, kept_nll);
    entropy.index_copy_(0, sel.index, kept_entropy);
    argmax.index_copy_(0, sel.index, kept_argmax);
  } else {
    nll = kept_nll;
    entropy = kept_entropy;
    argmax = kept_argmax;
  }
  return {nll, entropy, argmax, compute_dhidden ? scatter_rows(dh, hidden, sel) : at::Tensor(),
          compute_dweight ? dw.to(weight.scalar_type()) : at::Tensor(),
          compute_dbias ? db.to(bias->scalar_type()) : at::Tensor()};
}

}  // namespace fastalign
