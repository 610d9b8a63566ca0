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
// owned schedule (bounded by kPrivateBudgetBytes, see "Schedules").
//
// Rows whose target is ignore_index are dropped up front (prompt tokens are often half the batch),
// so they cost nothing and get exact zeros.

#include "linear_logprobs_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include "cpu_common.h"
#include "cpu_vec_math.h"

namespace fastalign {
namespace {

using namespace cpu;  // NOLINT(build/namespaces): cpu_vec_math.h and cpu_common.h

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

template <typename V, bool HAS_BIAS, bool HAS_SOFTCAP>
FASTALIGN_INLINE void forward_rows_impl(const Tile<ScalarOf<V>>& tile,
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

template <typename V, bool HAS_BIAS, bool HAS_SOFTCAP>
FASTALIGN_INLINE void backward_rows_impl(const Tile<ScalarOf<V>>& tile,
                                         const BackwardRows<ScalarOf<V>>& in, int64_t r0,
                                         int64_t r1) {
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

template <typename V>
FASTALIGN_INLINE void forward_rows_dispatch(const Tile<ScalarOf<V>>& tile,
                                            const ForwardState<ScalarOf<V>>& state, int64_t r0,
                                            int64_t r1, bool has_softcap) {
  const bool has_bias = tile.bias != nullptr;
  if (has_bias && has_softcap) {
    forward_rows_impl<V, true, true>(tile, state, r0, r1);
  } else if (has_bias) {
    forward_rows_impl<V, true, false>(tile, state, r0, r1);
  } else if (has_softcap) {
    forward_rows_impl<V, false, true>(tile, state, r0, r1);
  } else {
    forward_rows_impl<V, false, false>(tile, state, r0, r1);
  }
}

template <typename V>
FASTALIGN_INLINE void backward_rows_dispatch(const Tile<ScalarOf<V>>& tile,
                                             const BackwardRows<ScalarOf<V>>& in, int64_t r0,
                                             int64_t r1, bool has_softcap) {
  const bool has_bias = tile.bias != nullptr;
  if (has_bias && has_softcap) {
    backward_rows_impl<V, true, true>(tile, in, r0, r1);
  } else if (has_bias) {
    backward_rows_impl<V, true, false>(tile, in, r0, r1);
  } else if (has_softcap) {
    backward_rows_impl<V, false, true>(tile, in, r0, r1);
  } else {
    backward_rows_impl<V, false, false>(tile, in, r0, r1);
  }
}

// ---------------------------------------------------------------------------------------------
// Instruction sets
// ---------------------------------------------------------------------------------------------
//
// The float32 row kernels, once per instruction set (the always-inline bodies take on the ISA of
// the function they are inlined into); forward_rows_f32 / backward_rows_f32 pick one at run time.
// See cpu_vec_math.h (and BaselineF32 in cpu_common.h).

void forward_rows_baseline(const Tile<float>& tile, const ForwardState<float>& state, int64_t r0,
                           int64_t r1, bool has_softcap) {
  forward_rows_dispatch<BaselineF32>(tile, state, r0, r1, has_softcap);
}

void backward_rows_baseline(const Tile<float>& tile, const BackwardRows<float>& in, int64_t r0,
                            int64_t r1, bool has_softcap) {
  backward_rows_dispatch<BaselineF32>(tile, in, r0, r1, has_softcap);
}

#ifdef FASTALIGN_X86_ISAS
FASTALIGN_AVX2 void forward_rows_avx2(const Tile<float>& tile, const ForwardState<float>& state,
                                      int64_t r0, int64_t r1, bool has_softcap) {
  forward_rows_dispatch<f32x8>(tile, state, r0, r1, has_softcap);
}

FASTALIGN_AVX2 void backward_rows_avx2(const Tile<float>& tile, const BackwardRows<float>& in,
                                       int64_t r0, int64_t r1, bool has_softcap) {
  backward_rows_dispatch<f32x8>(tile, in, r0, r1, has_softcap);
}

FASTALIGN_AVX512 void forward_rows_avx512(const Tile<float>& tile,
                                          const ForwardState<float>& state, int64_t r0,
                                          int64_t r1, bool has_softcap) {
  forward_rows_dispatch<f32x16>(tile, state, r0, r1, has_softcap);
}

FASTALIGN_AVX512 void backward_rows_avx512(const Tile<float>& tile, const BackwardRows<float>& in,
                                           int64_t r0, int64_t r1, bool has_softcap) {
  backward_rows_dispatch<f32x16>(tile, in, r0, r1, has_softcap);
}
#endif

void forward_rows_f32(const Tile<float>& tile, const ForwardState<float>& state, int64_t r0,
                      int64_t r1, bool has_softcap, Isa isa) {
#ifdef FASTALIGN_X86_ISAS
  if (isa == Isa::kAvx512) return forward_rows_avx512(tile, state, r0, r1, has_softcap);
  if (isa == Isa::kAvx2) return forward_rows_avx2(tile, state, r0, r1, has_softcap);
#endif
  forward_rows_baseline(tile, state, r0, r1, has_softcap);
}

void backward_rows_f32(const Tile<float>& tile, const BackwardRows<float>& in, int64_t r0,
                       int64_t r1, bool has_softcap, Isa isa) {
#ifdef FASTALIGN_X86_ISAS
  if (isa == Isa::kAvx512) return backward_rows_avx512(tile, in, r0, r1, has_softcap);
  if (isa == Isa::kAvx2) return backward_rows_avx2(tile, in, r0, r1, has_softcap);
#endif
  backward_rows_baseline(tile, in, r0, r1, has_softcap);
}

template <typename T>
void forward_rows(const Tile<T>& tile, const ForwardState<T>& state, int64_t r0, int64_t r1,
                  bool has_softcap, Isa isa) {
  if constexpr (std::is_same_v<T, float>) {
    forward_rows_f32(tile, state, r0, r1, has_softcap, isa);
  } else {
    (void)isa;
    forward_rows_dispatch<T>(tile, state, r0, r1, has_softcap);
  }
}

template <typename T>
void backward_rows(const Tile<T>& tile, const BackwardRows<T>& in, int64_t r0, int64_t r1,
                   bool has_softcap, Isa isa) {
  if constexpr (std::is_same_v<T, float>) {
    backward_rows_f32(tile, in, r0, r1, has_softcap, isa);
  } else {
    (void)isa;
    backward_rows_dispatch<T>(tile, in, r0, r1, has_softcap);
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks (compute_dtype, check_cpu_contiguous and check_row_stat: cpu_common.h)
// ---------------------------------------------------------------------------------------------

void check_inputs(const char* fn, const at::Tensor& hidden, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
                  double temperature, double softcap) {
  check_cpu_contiguous(fn, "hidden [N, H]", hidden, 2);
  check_cpu_contiguous(fn, "weight [V, H]", weight, 2);
  check_cpu_contiguous(fn, "targets [N]", targets, 1);
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                       dtype == at::kDouble,
                   fn, ": hidden must be float32, bfloat16, float16 or float64, got ", dtype);
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
  if (bias.has_value() && bias->defined()) {
    check_cpu_contiguous(fn, "bias [V]", *bias, 1);
    TORCH_CHECK_TYPE(bias->scalar_type() == dtype, fn, ": bias must have weight's dtype ", dtype,
                     ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->size(0) == weight.size(0), fn, ": bias must have shape [V] = [",
                      weight.size(0), "], got ", bias->sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, fn,
                    ": temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, fn,
                    ": softcap must be finite and >= 0 (0 = no softcap), got ", softcap);
}

// ---------------------------------------------------------------------------------------------
// Rows that take part (target != ignore_index)
// ---------------------------------------------------------------------------------------------

struct RowSelection {
  int64_t count = 0;
  bool compact = false;  // true when some rows were dropped
  at::Tensor index;      // [count] int64: original row of each kept row (compact only)
  at::Tensor targets;    // [count] int64: targets of the kept rows
};

RowSelection select_rows(const char* fn, const at::Tensor& targets, int64_t ignore_index,
                         int64_t vocab, bool off_shard_targets) {
  const int64_t n = targets.size(0);
  const int64_t* y = targets.data_ptr<int64_t>();
  RowSelection sel;
  for (int64_t i = 0; i < n; ++i) {
    if (y[i] == ignore_index) {
      continue;
    }
    // With off_shard_targets (a vocabulary shard), y >= V is a target held by another shard:
    // the row still counts in the normaliser, and no column here is its target.
    TORCH_CHECK_VALUE(y[i] >= 0 && (y[i] < vocab || off_shard_targets), fn,
                      ": targets must lie in [0, V) = [0, ", vocab, ") or equal ignore_index (",
                      ignore_index, "); found ", y[i], " at position ", i);
    ++sel.count;
  }
  sel.compact = sel.count < n;
  if (!sel.compact) {
    sel.targets = targets;
    return sel;
  }
  sel.index = at::empty({sel.count}, targets.options());
  sel.targets = at::empty({sel.count}, targets.options());
  int64_t* index = sel.index.data_ptr<int64_t>();
  int64_t* kept = sel.targets.data_ptr<int64_t>();
  for (int64_t i = 0, j = 0; i < n; ++i) {
    if (y[i] != ignore_index) {
      index[j] = i;
      kept[j] = y[i];
      ++j;
    }
  }
  return sel;
}

// The kept rows of a per-row tensor (hidden, grad_logp, ...) in dtype `dtype`; no copy when every
// row is kept and the dtype already matches.
at::Tensor kept_rows(const at::Tensor& t, const RowSelection& sel, at::ScalarType dtype) {
  const at::Tensor rows = sel.compact ? t.index_select(0, sel.index) : t;
  // detach: worker threads run with autograd on (grad mode is thread-local), and out= products
  // refuse inputs that require grad.
  return rows.detach().to(dtype).contiguous();
}

// Schedules and block sizes (owned / shared, make_plan): cpu_common.h.

// ---------------------------------------------------------------------------------------------
// Tiles
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Problem {
  at::Tensor h;            // [n, H] kept rows of hidden, in the compute dtype T
  at::Tensor weight;       // [V, H] in the input dtype
  const T* bias;           // [V] in T, or nullptr
  const int64_t* targets;  // [n] targets of the kept rows
  int64_t n, hidden, vocab;
  T inv_t, inv_cap, cap_over_t;
  double alpha;            // 1/T as the alpha of the gradient products
  bool has_softcap;
  bool convert_weight;     // bf16/fp16 weight: each block is converted to T before use
  Isa isa;

  Problem(const at::Tensor& h_, const at::Tensor& weight_, const at::Tensor& bias_,
          const int64_t* targets_, double temperature, double softcap)
      : h(h_),
        weight(weight_.detach()),
        bias(bias_.defined() ? bias_.data_ptr<T>() : nullptr),
        targets(targets_),
        n(h_.size(0)),
        hidden(h_.size(1)),
        vocab(weight_.size(0)),
        inv_t(static_cast<T>(1.0 / temperature)),
        inv_cap(static_cast<T>(softcap > 0 ? 1.0 / softcap : 0.0)),
        cap_over_t(static_cast<T>(softcap / temperature)),
        alpha(1.0 / temperature),
        has_softcap(softcap > 0),
        convert_weight(weight_.scalar_type() != h_.scalar_type()),
        isa(chosen_isa()) {}

  Tile<T> tile(T* data, int64_t n0, int64_t v0, int64_t cols) const {
    return {data, bias != nullptr ? bias + v0 : nullptr, targets + n0, cols, v0, inv_t, inv_cap,
            cap_over_t};
  }
};

// The buffers one thread streams through: never larger than one block.
template <typename T>
struct Scratch {
  at::Tensor tile;     // [rows · cols] logits, then gradients
  at::Tensor weight;   // [cols, H] the weight block in T (bf16/fp16 weights only)
  at::Tensor dweight;  // [cols, H] the dW block in T, cast into the output when complete (idem)

  Scratch(const Problem<T>& p, const Plan& plan, bool need_dweight) {
    const auto opts = p.h.options();
    tile = at::empty({plan.rows * plan.cols}, opts);
    if (p.convert_weight) {
      weight = at::empty({plan.cols, p.hidden}, opts);
      if (need_dweight) dweight = at::empty({plan.cols, p.hidden}, opts);
    }
  }

  at::Tensor weight_block(const Problem<T>& p, int64_t v0, int64_t cols) {
    const at::Tensor block = p.weight.narrow(0, v0, cols);
    return p.convert_weight ? weight.narrow(0, 0, cols).copy_(block) : block;
  }

  // h[n0 : n0 + rows] @ w_blkᵀ into the tile buffer.
  at::Tensor logits(const Problem<T>& p, const at::Tensor& w_blk, int64_t n0, int64_t rows) {
    at::Tensor out = tile.narrow(0, 0, rows * w_blk.size(0)).view({rows, w_blk.size(0)});
    return at::mm_out(out, p.h.narrow(0, n0, rows), w_blk.t());
  }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T>
ForwardState<T> shifted(const ForwardState<T>& s, int64_t n0) {
  return {s.max + n0, s.sum_exp + n0, s.sum_exp_dz + n0, s.z_target + n0};
}

// Streams vocabulary block `block` through the state of every row; split_rows spreads the fused
// pass over threads (shared schedule).
template <typename T>
void forward_block(const Problem<T>& p, const Plan& plan, Scratch<T>& scratch, int64_t block,
                   const ForwardState<T>& state, bool split_rows) {
  const int64_t v0 = block * plan.cols, cols = std::min(plan.cols, p.vocab - v0);
  const at::Tensor w_blk = scratch.weight_block(p, v0, cols);
  for (int64_t n0 = 0; n0 < p.n; n0 += plan.rows) {
    const int64_t rows = std::min(plan.rows, p.n - n0);
    at::Tensor tile = scratch.logits(p, w_blk, n0, rows);
    const Tile<T> desc = p.tile(tile.data_ptr<T>(), n0, v0, cols);
    const ForwardState<T> rows_state = shifted(state, n0);
    if (split_rows) {
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / cols),
                       [&](int64_t r0, int64_t r1) {
                         forward_rows<T>(desc, rows_state, r0, r1, p.has_softcap, p.isa);
                       });
    } else {
      forward_rows<T>(desc, rows_state, 0, rows, p.has_softcap, p.isa);
    }
  }
}

template <typename T>
void forward_all(const Problem<T>& p, const ForwardState<T>& state) {
  const Plan plan = make_plan(p.n, p.vocab, p.hidden, 0);
  if (plan.schedule == Schedule::kShared) {
    Scratch<T> scratch(p, plan, false);
    for (int64_t block = 0; block < plan.blocks; ++block) {
      forward_block(p, plan, scratch, block, state, /*split_rows=*/true);
    }
    return;
  }
  // Slot 0 streams into `state`, the others into private (m, s, t) arrays merged at the end in
  // slot order. z_target needs no copy: each row's target lies in exactly one block.
  const int64_t n = p.n;
  std::vector<T> extra(static_cast<size_t>((plan.slots - 1) * 3 * n));
  auto slot_state = [&](int64_t slot) -> ForwardState<T> {
    if (slot == 0) return state;
    T* base = extra.data() + (slot - 1) * 3 * n;
    return {base, base + n, base + 2 * n, state.z_target};
  };
  for (int64_t slot = 1; slot < plan.slots; ++slot) {
    const ForwardState<T> st = slot_state(slot);
    std::fill(st.max, st.max + n, -std::numeric_limits<T>::infinity());
    std::fill(st.sum_exp, st.sum_exp + n, T(0));
    std::fill(st.sum_exp_dz, st.sum_exp_dz + n, T(0));
  }
  at::parallel_for(0, plan.slots, 1, [&](int64_t s0, int64_t s1) {
    at::NoGradGuard no_grad;
    for (int64_t slot = s0; slot < s1; ++slot) {
      Scratch<T> scratch(p, plan, false);
      const ForwardState<T> st = slot_state(slot);
      for (int64_t block = slot; block < plan.blocks; block += plan.slots) {
        forward_block(p, plan, scratch, block, st, /*split_rows=*/false);
      }
    }
  });
  if (plan.slots > 1) {
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t slot = 1; slot < plan.slots; ++slot) {
        const ForwardState<T> st = slot_state(slot);
        for (int64_t i = i0; i < i1; ++i) {
          merge_state(state.max[i], state.sum_exp[i], state.sum_exp_dz[i], st.max[i],
                      st.sum_exp[i], st.sum_exp_dz[i]);
        }
      }
    });
  }
}

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

  const RowSelection sel = select_rows(fn, targets, ignore_index, vocab, off_shard_targets);
  if (sel.count == 0) {
    return {logp, entropy, lse, sum_pz};
  }
  const at::Tensor h = kept_rows(hidden, sel, dtype);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->detach().to(dtype).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(dtype, fn, [&] {
    using T = scalar_t;
    const int64_t count = sel.count;
    std::vector<T> max(count, -std::numeric_limits<T>::infinity()), sum_exp(count, T(0)),
        sum_exp_dz(count, T(0)), z_target(count, T(0));
    const Problem<T> problem(h, weight, b, sel.targets.data_ptr<int64_t>(), temperature, softcap);
    forward_all<T>(problem, {max.data(), sum_exp.data(), sum_exp_dz.data(), z_target.data()});

    T* logp_out = logp.data_ptr<T>();
    T* entropy_out = entropy.data_ptr<T>();
    double* lse_out = lse.data_ptr<double>();
    double* sum_pz_out = sum_pz.data_ptr<double>();
    const int64_t* index = sel.compact ? sel.index.data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, count, 4096, [&](int64_t i0, int64_t i1) {
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

namespace {

template <typename T>
BackwardRows<T> shifted(const BackwardRows<T>& in, int64_t n0) {
  return {in.grad_logp + n0, in.grad_entropy != nullptr ? in.grad_entropy + n0 : nullptr,
          in.lse_hi + n0,    in.lse_lo + n0,
          in.sum_pz_hi + n0, in.sum_pz_lo + n0};
}

struct Grads {
  at::Tensor dweight;  // [V, H] output in weight's dtype, or undefined
  at::Tensor db;       // [V] accumulator in the compute dtype (zeros), or undefined
};

// Recomputes block `block` tile by tile and adds its share to every gradient. dh is this thread's
// accumulator (undefined if not wanted); dh_fresh says it holds nothing yet (beta = 0 ignores
// its uninitialised memory, NaN included, as documented for addmm).
template <typename T>
void backward_block(const Problem<T>& p, const Plan& plan, Scratch<T>& scratch, int64_t block,
                    const BackwardRows<T>& in, const at::Tensor& dh, bool dh_fresh,
                    const Grads& grads, bool split_rows) {
  const int64_t v0 = block * plan.cols, cols = std::min(plan.cols, p.vocab - v0);
  const at::Tensor w_blk = scratch.weight_block(p, v0, cols);
  at::Tensor dw_blk;
  if (grads.dweight.defined()) {
    dw_blk = p.convert_weight ? scratch.dweight.narrow(0, 0, cols)
                              : grads.dweight.narrow(0, v0, cols);
  }
  for (int64_t n0 = 0; n0 < p.n; n0 += plan.rows) {
    const int64_t rows = std::min(plan.rows, p.n - n0);
    at::Tensor tile = scratch.logits(p, w_blk, n0, rows);
    const Tile<T> desc = p.tile(tile.data_ptr<T>(), n0, v0, cols);
    const BackwardRows<T> rows_in = shifted(in, n0);
    if (split_rows) {
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / cols),
                       [&](int64_t r0, int64_t r1) {
                         backward_rows<T>(desc, rows_in, r0, r1, p.has_softcap, p.isa);
                       });
    } else {
      backward_rows<T>(desc, rows_in, 0, rows, p.has_softcap, p.isa);
    }
    // The tile holds T·dL/da; the 1/T rides on alpha.
    if (dh.defined()) {
      dh.narrow(0, n0, rows).addmm_(tile, w_blk, dh_fresh ? 0.0 : 1.0, p.alpha);
    }
    if (dw_blk.defined()) {
      dw_blk.addmm_(tile.t(), p.h.narrow(0, n0, rows), n0 == 0 ? 0.0 : 1.0, p.alpha);
    }
    if (grads.db.defined()) {
      grads.db.narrow(0, v0, cols).add_(tile.sum(0), p.alpha);
    }
  }
  if (dw_blk.defined() && p.convert_weight) {
    grads.dweight.narrow(0, v0, cols).copy_(dw_blk);
  }
}

template <typename T>
void backward_all(const Problem<T>& p, const BackwardRows<T>& in, const at::Tensor& dh,
                  const Grads& grads) {
  const int64_t private_bytes =
      dh.defined() ? p.n * p.hidden * static_cast<int64_t>(sizeof(T)) : 0;
  const Plan plan = make_plan(p.n, p.vocab, p.hidden, private_bytes);
  if (plan.schedule == Schedule::kShared) {
    Scratch<T> scratch(p, plan, grads.dweight.defined());
    for (int64_t block = 0; block < plan.blocks; ++block) {
      backward_block(p, plan, scratch, block, in, dh, block == 0, grads, /*split_rows=*/true);
    }
    return;
  }
  // Slot s owns blocks s, s + S, ...; slot 0 (which always owns block 0) accumulates dh into the
  // output, the others into private copies added to it in slot order.
  std::vector<at::Tensor> slot_dh(static_cast<size_t>(plan.slots));
  slot_dh[0] = dh;
  at::parallel_for(0, plan.slots, 1, [&](int64_t s0, int64_t s1) {
    at::NoGradGuard no_grad;
    for (int64_t slot = s0; slot < s1; ++slot) {
      Scratch<T> scratch(p, plan, grads.dweight.defined());
      if (slot > 0 && dh.defined()) {
        slot_dh[slot] = at::empty({p.n, p.hidden}, p.h.options());
      }
      for (int64_t block = slot; block < plan.blocks; block += plan.slots) {
        backward_block(p, plan, scratch, block, in, slot_dh[slot], block == slot, grads,
                       /*split_rows=*/false);
      }
    }
  });
  if (dh.defined()) {
    for (int64_t slot = 1; slot < plan.slots; ++slot) {
      dh.add_(slot_dh[slot]);
    }
  }
}

}  // namespace

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
  const bool has_grad_entropy = grad_entropy.has_value() && grad_entropy->defined();
  if (has_grad_entropy) {
    check_row_stat(fn, "grad_entropy", *grad_entropy, n, dtype);
  }
  check_row_stat(fn, "lse", lse, n, at::kDouble);
  check_row_stat(fn, "sum_pz", sum_pz, n, at::kDouble);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK_VALUE(!compute_dbias || has_bias, fn, ": compute_dbias needs a bias");
  at::NoGradGuard no_grad;

  const RowSelection sel = select_rows(fn, targets, ignore_index, vocab, off_shard_targets);
  const auto opts = hidden.options().dtype(dtype);
  if (sel.count == 0 || !(compute_dhidden || compute_dweight || compute_dbias)) {
    return {compute_dhidden ? at::zeros_like(hidden) : at::Tensor(),
            compute_dweight ? at::zeros_like(weight) : at::Tensor(),
            compute_dbias ? at::zeros_like(*bias) : at::Tensor()};
  }

  const at::Tensor h = kept_rows(hidden, sel, dtype);
  const at::Tensor g = kept_rows(grad_logp, sel, dtype);
  const at::Tensor e = has_grad_entropy ? kept_rows(*grad_entropy, sel, dtype) : at::Tensor();
  const auto [lse_hi, lse_lo] = split_hi_lo(kept_rows(lse, sel, at::kDouble), dtype);
  const auto [sum_pz_hi, sum_pz_lo] = split_hi_lo(kept_rows(sum_pz, sel, at::kDouble), dtype);
  const at::Tensor b = has_bias ? bias->detach().to(dtype).contiguous() : at::Tensor();

  // dh accumulates in the compute dtype; dW goes block by block straight into the output.
  at::Tensor dh = compute_dhidden ? at::empty({sel.count, hidden_size}, opts) : at::Tensor();
  Grads grads;
  if (compute_dweight) grads.dweight = at::empty({vocab, hidden_size}, weight.options());
  if (compute_dbias) grads.db = at::zeros({vocab}, opts);

  AT_DISPATCH_FLOATING_TYPES(dtype, fn, [&] {
    using T = scalar_t;
    const BackwardRows<T> in{g.data_ptr<T>(),      e.defined() ? e.data_ptr<T>() : nullptr,
                             lse_hi.data_ptr<T>(),    lse_lo.data_ptr<T>(),
                             sum_pz_hi.data_ptr<T>(), sum_pz_lo.data_ptr<T>()};
    const Problem<T> problem(h, weight, b, sel.targets.data_ptr<int64_t>(), temperature, softcap);
    backward_all<T>(problem, in, dh, grads);
  });

  at::Tensor dhidden;
  if (compute_dhidden) {
    if (sel.compact) {
      dhidden = at::zeros_like(hidden);
      dhidden.index_copy_(0, sel.index, dh.to(hidden.scalar_type()));
    } else {
      dhidden = dh.to(hidden.scalar_type());
    }
  }
  at::Tensor dbias = compute_dbias ? grads.db.to(bias->scalar_type()) : at::Tensor();
  return {dhidden, grads.dweight, dbias};
}

}  // namespace fastalign
