// linear_logprobs on CPU: log π(y|h) and the entropy of softmax(z) from (hidden, LM head), streamed
// over vocabulary blocks (ALGORITHMS.md §1). No [N, V] tensor is ever allocated.
//
//   forward : per vocabulary block and token block: tile = h @ W_blkᵀ (ATen → MKL), then one fused
//             pass per row that applies bias/softcap/temperature, updates the online log-sum-exp
//             state and picks up the target logit.
//   backward: per block: recompute the tile from the saved lse, turn it into dL/da in place (one
//             fused pass), then dh += da @ W_blk, dW_blk = daᵀ @ h (each block owns its rows of
//             dW), db_blk = Σ_n da.
//
// Memory beyond inputs and gradients: one logit tile and, for bf16/fp16 weights, a float32 copy of
// the weight block (and of its dW block) per thread; the float32 copy of hidden (bf16/fp16 inputs,
// or when some targets are ignored); the float32 dh accumulator, plus one per extra thread in the
// owned schedule (bounded by kPrivateBudgetBytes, see "Schedules" in streaming.h).
//
// Rows whose target is ignore_index are dropped up front (prompt tokens are often half the batch),
// so they cost nothing and get exact zeros.
//
// This file holds the op's row math and its entry points; the block loops, schedules, problem and
// scratch are streaming.h's, the choice of variant and instruction set dispatch.h's.

#include "linear_logprobs_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include "checks.h"
#include "cpu_vec_math.h"
#include "dispatch.h"
#include "streaming.h"

namespace fastalign {
namespace {

using namespace cpu;  // NOLINT(build/namespaces): the headers above

// ---------------------------------------------------------------------------------------------
// Row kernels (one tile, a range of its rows)
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Tile {
  // pointers
  T* data;                 // [rows, cols]: raw logits h·W_v on entry, overwritten
  const T* bias;           // [cols] bias of this vocabulary block, or nullptr
  const int64_t* targets;  // [rows] target ids (never ignore_index: those rows were dropped)
  // shapes
  int64_t cols;
  int64_t v0;  // vocabulary id of column 0
  // meta-parameters: z = cap_over_t · tanh(a · inv_cap) with a softcap, else z = a · inv_t
  T inv_t;
  T inv_cap;
  T cap_over_t;
};

// Online state per row. ALGORITHMS.md keeps t = Σ e^{z−m}·z; we keep it relative to the running
// max, t = Σ e^{z−m}·(z − m), so that the entropy comes out as log s − t/s instead of the
// difference lse − Σ p z of two large numbers (with logits around 60 that difference would lose
// five digits in float32). Merging (m1, s1, t1) and (m2, s2, t2) into m = max(m1, m2):
//   s = s1·e^{m1−m} + s2·e^{m2−m},   t = (t1 + (m1−m)·s1)·e^{m1−m} + (t2 + (m2−m)·s2)·e^{m2−m}.
template <typename T>
struct ForwardState {
  T* max;         // m
  T* sum_exp;     // s = Σ e^{z−m}
  T* sum_exp_dz;  // t = Σ e^{z−m}·(z − m)
  T* z_target;    // z_y, once the block holding y has been seen
};

// lse and Σ p z arrive in float64 and are split into hi + lo in the compute dtype: backward forms
// z − lse and z − Σ p z, which nearly cancel for a dominant token, and (z − hi) − lo keeps the
// digits that one rounding of lse to float32 would lose (1e-5 absolute at |z| ≈ 100).
template <typename T>
struct BackwardRows {  // per row of the tile
  const T* grad_logp;
  const T* grad_entropy;  // nullptr: no upstream gradient of the entropy
  const T* lse_hi;
  const T* lse_lo;
  const T* sum_pz_hi;
  const T* sum_pz_lo;
};

// (m, s, t) ← (m, s, t) merged with (m2, s2, t2). A side with m = -inf is empty (its rescale
// factor would be e^{-inf - -inf} = NaN, so it is skipped rather than scaled).
template <typename T>
inline void merge_state(T& max, T& sum_exp, T& sum_exp_dz, T other_max, T other_sum_exp,
                        T other_sum_exp_dz) {
  constexpr T kEmpty = -std::numeric_limits<T>::infinity();
  if (other_max == kEmpty) {
    return;
  }
  if (max == kEmpty) {
    max = other_max;
    sum_exp = other_sum_exp;
    sum_exp_dz = other_sum_exp_dz;
    return;
  }
  const T new_max = std::max(max, other_max);
  const T shift = max - new_max, other_shift = other_max - new_max;  // both <= 0
  const T scale = std::exp(shift), other_scale = std::exp(other_shift);
  sum_exp_dz = (sum_exp_dz + shift * sum_exp) * scale +
               (other_sum_exp_dz + other_shift * other_sum_exp) * other_scale;
  sum_exp = sum_exp * scale + other_sum_exp * other_scale;
  max = new_max;
}

// Each pass below runs over columns [begin, end) in steps of U's lanes: once with the vector
// type over the bulk of the row, once with the scalar type over the last (cols mod lanes).

// a → z in place, keeping the running max of z.
template <typename U, bool HAS_BIAS, bool HAS_SOFTCAP>
FASTALIGN_INLINE void logits_to_z(const Tile<ScalarOf<U>>& tile, ScalarOf<U>* __restrict__ x,
                                  int64_t begin, int64_t end, U& z_max) {
  constexpr int64_t kStep = Lanes<U>::kCount;
  const ScalarOf<U>* __restrict__ bias = tile.bias;
  const U inv_t = splat<U>(tile.inv_t), inv_cap = splat<U>(tile.inv_cap);
  const U cap_over_t = splat<U>(tile.cap_over_t);
  for (int64_t v = begin; v < end; v += kStep) {
    U a = load<U>(x + v);
    if constexpr (HAS_BIAS) a += load<U>(bias + v);
    U z;
    if constexpr (HAS_SOFTCAP) {
      z = cap_over_t * vtanh(a * inv_cap);
    } else {
      z = a * inv_t;
    }
    store(x + v, z);
    z_max = z > z_max ? z : z_max;
  }
}

// s += Σ e^{z−m}, t += Σ e^{z−m}·(z − m)
template <typename U>
FASTALIGN_INLINE void exp_sums(const ScalarOf<U>* __restrict__ x, int64_t begin, int64_t end,
                               ScalarOf<U> max, U& sum_exp, U& sum_exp_dz) {
  constexpr int64_t kStep = Lanes<U>::kCount;
  const U m = splat<U>(max);
  for (int64_t v = begin; v < end; v += kStep) {
    const U dz = load<U>(x + v) - m;
    const U e = vexp(dz);
    sum_exp += e;
    sum_exp_dz += e * dz;
  }
}

// dL/dz_v = g·(1[v=y] − p_v) − e·p_v·(z_v − Σ_u p_u z_u), with p_v = e^{z_v − lse}
// dL/da_v = dL/dz_v · (1/T) · (1 − tanh²(a_v/c))   (no tanh factor without softcap)
// Writes everything but the g·1[v=y] term and the 1/T (the caller adds the first, and the second
// becomes the alpha of the gradient products).
template <typename U, bool HAS_BIAS, bool HAS_SOFTCAP>
FASTALIGN_INLINE void logits_to_grad(const Tile<ScalarOf<U>>& tile, ScalarOf<U>* __restrict__ x,
                                     int64_t begin, int64_t end, ScalarOf<U> grad_logp,
                                     ScalarOf<U> grad_entropy, ScalarOf<U> lse_hi,
                                     ScalarOf<U> lse_lo, ScalarOf<U> sum_pz_hi,
                                     ScalarOf<U> sum_pz_lo) {
  constexpr int64_t kStep = Lanes<U>::kCount;
  const ScalarOf<U>* __restrict__ bias = tile.bias;
  const U inv_t = splat<U>(tile.inv_t), inv_cap = splat<U>(tile.inv_cap);
  const U cap_over_t = splat<U>(tile.cap_over_t);
  const U g = splat<U>(grad_logp), e = splat<U>(grad_entropy);
  const U row_lse_hi = splat<U>(lse_hi), row_lse_lo = splat<U>(lse_lo);
  const U row_sum_pz_hi = splat<U>(sum_pz_hi), row_sum_pz_lo = splat<U>(sum_pz_lo);
  for (int64_t v = begin; v < end; v += kStep) {
    U a = load<U>(x + v);
    if constexpr (HAS_BIAS) a += load<U>(bias + v);
    U z, dtanh;
    if constexpr (HAS_SOFTCAP) {
      const U scaled = a * inv_cap;
      z = cap_over_t * vtanh(scaled);
      dtanh = vsech2(scaled);
    } else {
      z = a * inv_t;
    }
    const U p = vexp((z - row_lse_hi) - row_lse_lo);
    U d = -p * (g + e * ((z - row_sum_pz_hi) - row_sum_pz_lo));
    if constexpr (HAS_SOFTCAP) d *= dtanh;
    store(x + v, d);
  }
}

// The fused passes, as dispatch.h's run_rows takes them (switches: bias, softcap).
struct ForwardKernel {
  template <typename V, bool HAS_BIAS, bool HAS_SOFTCAP>
  static FASTALIGN_INLINE void rows(const Tile<ScalarOf<V>>& tile,
                                    const ForwardState<ScalarOf<V>>& state, int64_t r0,
                                    int64_t r1) {
    using T = ScalarOf<V>;
    const int64_t cols = tile.cols;
    const int64_t bulk = cols - cols % Lanes<V>::kCount;
    for (int64_t r = r0; r < r1; ++r) {
      T* x = tile.data + r * cols;
      V bulk_max = splat<V>(-std::numeric_limits<T>::infinity());
      logits_to_z<V, HAS_BIAS, HAS_SOFTCAP>(tile, x, 0, bulk, bulk_max);
      T block_max = lane_max(bulk_max);
      logits_to_z<T, HAS_BIAS, HAS_SOFTCAP>(tile, x, bulk, cols, block_max);
      V bulk_sum_exp{}, bulk_sum_exp_dz{};
      exp_sums<V>(x, 0, bulk, block_max, bulk_sum_exp, bulk_sum_exp_dz);
      T sum_exp = lane_sum(bulk_sum_exp), sum_exp_dz = lane_sum(bulk_sum_exp_dz);
      exp_sums<T>(x, bulk, cols, block_max, sum_exp, sum_exp_dz);

      const int64_t y = tile.targets[r] - tile.v0;
      if (y >= 0 && y < cols) {
        state.z_target[r] = x[y];
      }
      merge_state(state.max[r], state.sum_exp[r], state.sum_exp_dz[r], block_max, sum_exp,
                  sum_exp_dz);
    }
  }
};

struct BackwardKernel {
  template <typename V, bool HAS_BIAS, bool HAS_SOFTCAP>
  static FASTALIGN_INLINE void rows(const Tile<ScalarOf<V>>& tile,
                                    const BackwardRows<ScalarOf<V>>& in, int64_t r0, int64_t r1) {
    using T = ScalarOf<V>;
    const int64_t cols = tile.cols;
    const int64_t bulk = cols - cols % Lanes<V>::kCount;
    for (int64_t r = r0; r < r1; ++r) {
      T* x = tile.data + r * cols;
      const T g = in.grad_logp[r];
      const T e = in.grad_entropy != nullptr ? in.grad_entropy[r] : T(0);
      const T lse_hi = in.lse_hi[r], lse_lo = in.lse_lo[r];
      const T sum_pz_hi = in.sum_pz_hi[r], sum_pz_lo = in.sum_pz_lo[r];
      const int64_t y = tile.targets[r] - tile.v0;
      const bool has_target = y >= 0 && y < cols;
      T target_grad = g;  // the g·1[v=y] term, times the tanh factor at y
      if constexpr (HAS_SOFTCAP) {
        if (has_target) {
          T a = x[y];
          if constexpr (HAS_BIAS) a += tile.bias[y];
          target_grad = g * vsech2(a * tile.inv_cap);
        }
      }
      logits_to_grad<V, HAS_BIAS, HAS_SOFTCAP>(tile, x, 0, bulk, g, e, lse_hi, lse_lo, sum_pz_hi,
                                               sum_pz_lo);
      logits_to_grad<T, HAS_BIAS, HAS_SOFTCAP>(tile, x, bulk, cols, g, e, lse_hi, lse_lo,
                                               sum_pz_hi, sum_pz_lo);
      if (has_target) {
        x[y] += target_grad;
      }
    }
  }
};

template <typename T>
ForwardState<T> shifted(const ForwardState<T>& s, int64_t n0) {
  return {s.max + n0, s.sum_exp + n0, s.sum_exp_dz + n0, s.z_target + n0};
}

template <typename T>
BackwardRows<T> shifted(const BackwardRows<T>& in, int64_t n0) {
  return {in.grad_logp + n0, in.grad_entropy != nullptr ? in.grad_entropy + n0 : nullptr,
          in.lse_hi + n0,    in.lse_lo + n0,
          in.sum_pz_hi + n0, in.sum_pz_lo + n0};
}

// The tile of the fused passes for one tile of the stream (see streaming.h).
template <typename T>
Tile<T> row_tile(const Problem<T, 1>& p, const int64_t* targets, const TileSet<T, 1>& tiles) {
  return {tiles.logits[0], p.bias(0, tiles.v0), targets + tiles.n0, tiles.cols, tiles.v0,
          p.inv_t,         p.inv_cap,           p.cap_over_t};
}

// ---------------------------------------------------------------------------------------------
// Argument checks and the rows that take part (target != ignore_index)
// ---------------------------------------------------------------------------------------------

void check_inputs(const char* fn, const at::Tensor& hidden, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
                  double temperature, double softcap) {
  check_head_and_targets(fn, hidden, weight, bias, targets);
  check_logit_options(fn, temperature, softcap);
}

// The rows whose target is not ignore_index, and their targets.
struct TargetRows {
  RowSelection sel;
  at::Tensor targets;  // [count] int64
};

TargetRows select_target_rows(const char* fn, const at::Tensor& targets, int64_t ignore_index,
                              int64_t vocab, bool off_shard_targets) {
  const int64_t n = targets.size(0);
  const int64_t* y = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    // With off_shard_targets (a vocabulary shard), y >= V is a target held by another shard:
    // the row still counts in the normaliser, and no column here is its target.
    TORCH_CHECK_VALUE(y[i] == ignore_index || (y[i] >= 0 && (y[i] < vocab || off_shard_targets)),
                      fn, ": targets must lie in [0, V) = [0, ", vocab,
                      ") or equal ignore_index (", ignore_index, "); found ", y[i],
                      " at position ", i);
  }
  TargetRows rows;
  rows.sel = select_rows(n, targets.options(), [&](int64_t i) { return y[i] != ignore_index; });
  rows.targets = kept_rows(targets, rows.sel, at::kLong);
  return rows;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// The op's side of stream_forward: (m, s, t) per row, z_target on the side (each row's target
// lies in exactly one block, so no slot but the one streaming that block writes it).
template <typename T>
struct ForwardOp {
  using State = ForwardState<T>;
  const Problem<T, 1>& p;
  const int64_t* targets;
  ForwardState<T> output;
  std::vector<T> extra;  // (m, s, t) of slots 1, 2, ...

  State state(int64_t slot) {
    if (slot == 0) return output;
    T* base = extra.data() + (slot - 1) * 3 * p.n;
    return {base, base + p.n, base + 2 * p.n, output.z_target};
  }

  void add_slots(int64_t slots) {
    const int64_t n = p.n;
    extra.resize(static_cast<size_t>((slots - 1) * 3 * n));
    for (int64_t slot = 1; slot < slots; ++slot) {
      const State st = state(slot);
      std::fill(st.max, st.max + n, -std::numeric_limits<T>::infinity());
      std::fill(st.sum_exp, st.sum_exp + n, T(0));
      std::fill(st.sum_exp_dz, st.sum_exp_dz + n, T(0));
    }
  }

  void merge(int64_t slot, int64_t i) {
    const State st = state(slot);
    merge_state(output.max[i], output.sum_exp[i], output.sum_exp_dz[i], st.max[i], st.sum_exp[i],
                st.sum_exp_dz[i]);
  }

  void rows(const TileSet<T, 1>& tiles, const State& st, int64_t r0, int64_t r1) const {
    const Tile<T> tile = row_tile(p, targets, tiles);
    const Switches<2> on{tile.bias != nullptr, p.has_softcap};
    run_rows<ForwardKernel, T>(p.isa, on, tile, shifted(st, tiles.n0), r0, r1);
  }
};

}  // namespace

std::vector<at::Tensor> linear_logprobs_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& bias,
                                                const at::Tensor& targets, double temperature,
                                                double softcap, int64_t ignore_index,
                                                bool off_shard_targets) {
  constexpr const char* fn = "linear_logprobs_forward";
  check_inputs(fn, hidden, weight, bias, targets, temperature, softcap);
  at::NoGradGuard no_grad;
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const at::ScalarType dtype = compute_dtype(hidden.scalar_type());
  const auto opts = hidden.options().dtype(dtype);
  at::Tensor logp = at::zeros({n}, opts), entropy = at::zeros({n}, opts);
  // float64 whatever the input: see BackwardRows.
  const auto stat_opts = hidden.options().dtype(at::kDouble);
  at::Tensor lse = at::zeros({n}, stat_opts), sum_pz = at::zeros({n}, stat_opts);

  const TargetRows kept = select_target_rows(fn, targets, ignore_index, vocab, off_shard_targets);
  const RowSelection& sel = kept.sel;
  if (sel.count == 0) {
    return {logp, entropy, lse, sum_pz};
  }
  const Head head = make_head(kept_rows(hidden, sel, dtype), weight, bias);

  AT_DISPATCH_FLOATING_TYPES(dtype, fn, [&] {
    using T = scalar_t;
    const int64_t count = sel.count;
    std::vector<T> max(count, -std::numeric_limits<T>::infinity()), sum_exp(count, T(0)),
        sum_exp_dz(count, T(0)), z_target(count, T(0));
    const Problem<T, 1> problem({head}, temperature, softcap);
    ForwardOp<T> op{problem,
                    kept.targets.data_ptr<int64_t>(),
                    {max.data(), sum_exp.data(), sum_exp_dz.data(), z_target.data()},
                    {}};
    stream_forward(problem, op);

    T* logp_out = logp.data_ptr<T>();
    T* entropy_out = entropy.data_ptr<T>();
    double* lse_out = lse.data_ptr<double>();
    double* sum_pz_out = sum_pz.data_ptr<double>();
    const int64_t* index = sel.compact ? sel.index.data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, count, kRowGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row = index != nullptr ? index[i] : i;
        const T log_sum_exp = std::log(sum_exp[i]);
        const T mean_dz = sum_exp_dz[i] / sum_exp[i];  // Σ p (z − m)
        // The max is an exact logit; adding the small, precise parts in float64 keeps lse and
        // Σ p z to float64 accuracy for backward.
        lse_out[row] = static_cast<double>(max[i]) + static_cast<double>(log_sum_exp);
        sum_pz_out[row] = static_cast<double>(max[i]) + static_cast<double>(mean_dz);
        // z_y − lse ≤ 0 exactly; rounding in the two sums must not make a probability exceed 1.
        logp_out[row] = std::min((z_target[i] - max[i]) - log_sum_exp, T(0));
        entropy_out[row] = log_sum_exp - mean_dz;
      }
    });
  });
  return {logp, entropy, lse, sum_pz};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

std::vector<at::Tensor> linear_logprobs_backward(
    const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& sum_pz,
    double temperature, double softcap, int64_t ignore_index, bool compute_dhidden,
    bool compute_dweight, bool compute_dbias, bool off_shard_targets) {
  constexpr const char* fn = "linear_logprobs_backward";
  check_inputs(fn, hidden, weight, bias, targets, temperature, softcap);
  const int64_t n = hidden.size(0), hidden_size = hidden.size(1), vocab = weight.size(0);
  const at::ScalarType dtype = compute_dtype(hidden.scalar_type());
  check_row_stat(fn, "grad_logp", grad_logp, n, dtype);
  const bool has_grad_entropy = has_tensor(grad_entropy);
  if (has_grad_entropy) {
    check_row_stat(fn, "grad_entropy", *grad_entropy, n, dtype);
  }
  check_row_stat(fn, "lse", lse, n, at::kDouble);
  check_row_stat(fn, "sum_pz", sum_pz, n, at::kDouble);
  TORCH_CHECK_VALUE(!compute_dbias || has_tensor(bias), fn, ": compute_dbias needs a bias");
  at::NoGradGuard no_grad;

  const TargetRows kept = select_target_rows(fn, targets, ignore_index, vocab, off_shard_targets);
  const RowSelection& sel = kept.sel;
  const auto opts = hidden.options().dtype(dtype);
  if (sel.count == 0 || !(compute_dhidden || compute_dweight || compute_dbias)) {
    return {zeros_if(compute_dhidden, hidden), zeros_if(compute_dweight, weight),
            zeros_if(compute_dbias, bias)};
  }

  const Head head = make_head(kept_rows(hidden, sel, dtype), weight, bias);
  const at::Tensor g = kept_rows(grad_logp, sel, dtype);
  const at::Tensor e = has_grad_entropy ? kept_rows(*grad_entropy, sel, dtype) : at::Tensor();
  const auto [lse_hi, lse_lo] = split_hi_lo(kept_rows(lse, sel, at::kDouble), dtype);
  const auto [sum_pz_hi, sum_pz_lo] = split_hi_lo(kept_rows(sum_pz, sel, at::kDouble), dtype);

  // dh accumulates in the compute dtype; dW goes block by block straight into the output.
  Gradients<1> grads;
  grads.needed[0] = true;
  if (compute_dhidden) grads.dh[0] = at::empty({sel.count, hidden_size}, opts);
  if (compute_dweight) grads.dweight[0] = at::empty({vocab, hidden_size}, weight.options());
  if (compute_dbias) grads.db[0] = at::zeros({vocab}, opts);

  AT_DISPATCH_FLOATING_TYPES(dtype, fn, [&] {
    using T = scalar_t;
    const BackwardRows<T> in{g.data_ptr<T>(),      e.defined() ? e.data_ptr<T>() : nullptr,
                             lse_hi.data_ptr<T>(),    lse_lo.data_ptr<T>(),
                             sum_pz_hi.data_ptr<T>(), sum_pz_lo.data_ptr<T>()};
    const Problem<T, 1> problem({head}, temperature, softcap);
    const int64_t* kept_targets = kept.targets.data_ptr<int64_t>();
    stream_backward(problem, grads, [&](const TileSet<T, 1>& tiles, int64_t r0, int64_t r1) {
      const Tile<T> tile = row_tile(problem, kept_targets, tiles);
      const Switches<2> on{tile.bias != nullptr, problem.has_softcap};
      run_rows<BackwardKernel, T>(problem.isa, on, tile, shifted(in, tiles.n0), r0, r1);
    });
  });

  return {compute_dhidden ? scatter_rows(grads.dh[0], hidden, sel) : at::Tensor(),
          grads.dweight[0], compute_dbias ? grads.db[0].to(bias->scalar_type()) : at::Tensor()};
}

}  // namespace fastalign
