// The row passes of log-softmax statistics and their gradient over one tile of logits, written
// once for linear_logprobs (a tile is one vocabulary block of a streamed [N, V]) and for the
// sequence-loss row passes (a tile holds whole rows of the vocabulary): bias, softcap and
// temperature applied, then the running max and the exponential sums of a row; and the
// gradient of (log p_y, entropy) with respect to the raw logits, in place.
//
// The kernels take dispatch.h's form (a struct with a static rows<V, switches...>), so that
// run_rows compiles them for each instruction set with bias and softcap as compile-time switches.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_vec_math.h"

namespace fastalign {
namespace cpu {

template <typename T>
struct Tile {
  // pointers
  T* data;                 // [rows, cols]: raw logits h·W_v on entry
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

// lse and Σ p z may arrive split into hi + lo in the compute dtype: backward forms z − lse and
// z − Σ p z, which nearly cancel for a dominant token, and (z − hi) − lo keeps the digits that
// one rounding of a float64 lse to float32 would lose (1e-5 absolute at |z| ≈ 100).
template <typename T>
struct BackwardRows {  // per row of the tile
  const T* grad_logp;
  const T* grad_entropy;  // nullptr: no upstream gradient of the entropy
  const T* lse_hi;
  const T* lse_lo;
  const T* sum_pz_hi;
  const T* sum_pz_lo;
};

// One row of one tile: its max m and s = Σ e^{z−m}, t = Σ e^{z−m}·(z − m), q = Σ e^{2(z−m)}
// (q only when asked for: linear_logprobs has no use for it).
template <typename T>
struct BlockSums {
  T max;
  T sum_exp;
  T sum_exp_dz;
  T sum_exp_sq;
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

// z of the raw logits a into z (the same row for in place), keeping the running max of z.
template <typename U, bool HAS_BIAS, bool HAS_SOFTCAP>
FASTALIGN_INLINE void logits_to_z(const Tile<ScalarOf<U>>& tile, const ScalarOf<U>* a_row,
                                  ScalarOf<U>* z_row, int64_t begin, int64_t end, U& z_max) {
  constexpr int64_t kStep = Lanes<U>::kCount;
  const ScalarOf<U>* __restrict__ bias = tile.bias;
  const U inv_t = splat<U>(tile.inv_t), inv_cap = splat<U>(tile.inv_cap);
  const U cap_over_t = splat<U>(tile.cap_over_t);
  for (int64_t v = begin; v < end; v += kStep) {
    U a = load<U>(a_row + v);
    if constexpr (HAS_BIAS) a += load<U>(bias + v);
    U z;
    if constexpr (HAS_SOFTCAP) {
      z = cap_over_t * vtanh(a * inv_cap);
    } else {
      z = a * inv_t;
    }
    store(z_row + v, z);
    z_max = z > z_max ? z : z_max;
  }
}

// s += Σ e^{z−m}, t += Σ e^{z−m}·(z − m), and with SQUARES q += Σ e^{2(z−m)}
template <typename U, bool SQUARES>
FASTALIGN_INLINE void exp_sums(const ScalarOf<U>* __restrict__ x, int64_t begin, int64_t end,
                               ScalarOf<U> max, U& sum_exp, U& sum_exp_dz, U& sum_exp_sq) {
  constexpr int64_t kStep = Lanes<U>::kCount;
  const U m = splat<U>(max);
  for (int64_t v = begin; v < end; v += kStep) {
    const U dz = load<U>(x + v) - m;
    const U e = vexp(dz);
    sum_exp += e;
    sum_exp_dz += e * dz;
    if constexpr (SQUARES) sum_exp_sq += e * e;
  }
}

// One row: its z written to z_row (which may be a_row itself) and its BlockSums.
template <typename V, bool HAS_BIAS, bool HAS_SOFTCAP, bool SQUARES>
FASTALIGN_INLINE BlockSums<ScalarOf<V>> row_sums(const Tile<ScalarOf<V>>& tile,
                                                 const ScalarOf<V>* a_row,
                                                 ScalarOf<V>* z_row) {
  using T = ScalarOf<V>;
  const int64_t cols = tile.cols;
  const int64_t bulk = cols - cols % Lanes<V>::kCount;
  V bulk_max = splat<V>(-std::numeric_limits<T>::infinity());
  logits_to_z<V, HAS_BIAS, HAS_SOFTCAP>(tile, a_row, z_row, 0, bulk, bulk_max);
  T max = lane_max(bulk_max);
  logits_to_z<T, HAS_BIAS, HAS_SOFTCAP>(tile, a_row, z_row, bulk, cols, max);
  V bulk_sum_exp{}, bulk_sum_exp_dz{}, bulk_sum_exp_sq{};
  exp_sums<V, SQUARES>(z_row, 0, bulk, max, bulk_sum_exp, bulk_sum_exp_dz, bulk_sum_exp_sq);
  BlockSums<T> sums{max, lane_sum(bulk_sum_exp), lane_sum(bulk_sum_exp_dz),
                    SQUARES ? lane_sum(bulk_sum_exp_sq) : T(0)};
  exp_sums<T, SQUARES>(z_row, bulk, cols, max, sums.sum_exp, sums.sum_exp_dz, sums.sum_exp_sq);
  return sums;
}

// dL/dz_v = g·(1[v=y] − p_v) − e·p_v·(z_v − Σ_u p_u z_u), with p_v = e^{z_v − lse}
// dL/da_v = dL/dz_v · (1/T) · (1 − tanh²(a_v/c))   (no tanh factor without softcap)
// Writes everything but the g·1[v=y] term and the 1/T (BackwardKernel adds the first; the second
// is the caller's: the alpha of linear_logprobs' gradient products, or folded into g and e).
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

// a → z in place, and (m, s, t) of the tile merged into each row's online state.
struct ForwardKernel {
  template <typename V, bool HAS_BIAS, bool HAS_SOFTCAP>
  static FASTALIGN_INLINE void rows(const Tile<ScalarOf<V>>& tile,
                                    const ForwardState<ScalarOf<V>>& state, int64_t r0,
                                    int64_t r1) {
    using T = ScalarOf<V>;
    const int64_t cols = tile.cols;
    for (int64_t r = r0; r < r1; ++r) {
      T* x = tile.data + r * cols;
      const BlockSums<T> sums = row_sums<V, HAS_BIAS, HAS_SOFTCAP, false>(tile, x, x);
      const int64_t y = tile.targets[r] - tile.v0;
      if (y >= 0 && y < cols) {
        state.z_target[r] = x[y];
      }
      merge_state(state.max[r], state.sum_exp[r], state.sum_exp_dz[r], sums.max, sums.sum_exp,
                  sums.sum_exp_dz);
    }
  }
};

// Raw a → dL/da / (1/T) in place (see logits_to_grad).
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

}  // namespace cpu
}  // namespace fastalign
