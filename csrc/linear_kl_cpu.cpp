// linear_kl on CPU: KL(p‖q) per token, p = softmax(z) from the policy head (h, W, b) and
// q = softmax(r) from the reference head (h_ref, W_ref, b_ref), streamed over vocabulary blocks
// (ALGORITHMS.md §2). No [N, V] tensor is ever allocated.
//
//   forward : per vocabulary block and token block: z_tile = h @ W_blkᵀ and
//             r_tile = h_ref @ W_ref_blkᵀ (ATen → MKL), then one fused pass per row that applies
//             bias/softcap/temperature to both and updates the online statistics of both
//             softmaxes and of Σ p (z − r).
//   backward: per block: recompute both tiles, turn them into dL/da in place (one fused pass:
//             the policy tile into dL/da_z, the reference tile into dL/da_r when that head needs
//             gradients), then per head that needs them dh += da @ W_blk, dW_blk = daᵀ @ h,
//             db_blk = Σ_n da.
//
// Work: forward 2·N·V·(H + H_ref) FLOPs; backward 2·N·V·(H + H_ref) to recompute plus 4·N·V·H per
// head that needs gradients. The schedules (owned / shared) and block sizes are linear_logprobs'
// (streaming.h); a thread's scratch is two logit tiles and, for bf16/fp16 heads, float32 copies of
// the two weight blocks (and of the dW blocks being accumulated).
//
// With the policy's targets (PPO with the exact KL) the same pass also gives the policy's log-prob
// of each target and its entropy, as linear_logprobs would: forward picks up the target logit and
// Σ e^{z−m_z}·(z − m_z) beside the KL's sums; backward adds their terms to dL/dz (see to_grads).
//
// This file holds the op's row math and its entry points; the block loops, schedules, problem,
// scratch and row selection are streaming.h's, the choice of variant and instruction set
// dispatch.h's.

#include "linear_kl_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
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

// The two heads, as streaming.h's Problem holds them.
constexpr int kPolicy = 0;
constexpr int kRef = 1;

// ---------------------------------------------------------------------------------------------
// Row kernels (one pair of tiles, a range of their rows)
// ---------------------------------------------------------------------------------------------

template <typename T>
struct KlTile {
  T* z;               // [rows, cols] policy: raw logits h·W_v on entry, overwritten
  T* r;               // [rows, cols] reference: raw logits h_ref·W_ref_v on entry, overwritten
  const T* bias;      // [cols] biases of this vocabulary block: both set when either head has
  const T* ref_bias;  //   one (zeros stand in for the other), else both nullptr
  const int64_t* targets;  // [rows] the policy's targets, or nullptr (not scored)
  int64_t cols;
  int64_t v0;  // vocabulary id of column 0
  // z = cap_over_t · tanh(a · inv_cap) with a softcap, else z = a · inv_t
  T inv_t;
  T inv_cap;
  T cap_over_t;
};

// Online state per row, in float64 whatever the compute dtype (it is merged once per block and
// row, so the cost is nothing next to the tile). With z̃ = z − m_z and r̃ = r − m_r relative to the
// running maxima:
//   rest_z = Σ e^{z̃} − 1             (s_z − 1: the maximum's own 1 kept apart, so that log s_z =
//   rest_r = Σ e^{r̃} − 1              log1p(rest_z) keeps its digits when one token dominates)
//   center = K, a float: z − r at the largest z seen (its rounding, t below, exactly)
//   csum   = Σ e^{z̃}·((z − r) − K)
//   diff   = Σ (e^{r̃} − e^{z̃})      (s_r − s_z, summed term by term)
// Then C = K + csum / s_z = Σ p (z − r), lse_z = m_z + log1p(rest_z), and
//   KL = Σ p (z − r) − lse_z + lse_r = (C − (m_z − m_r)) + log(s_r / s_z),
//   log(s_r / s_z) = log1p(diff / s_z).
// Each term is small when the two distributions are close, whatever their logits' size or the
// offset between the two heads: csum is centred on the dominant token, and each z − r enters it
// exactly (t = fl(z − r) plus its rounding error, by TwoSum), so that C keeps float64 accuracy
// even where log q at the dominant token is −66 and float32 would round it by 4e-6; diff, a sum
// of small differences, is accurate relative to itself, where log1p(rest_r) − log1p(rest_z) would
// carry the independent float32 rounding of two sums. When the sums are far apart
// (|diff| ≥ s_z/2: no cancellation to fear, while diff itself may cancel) the rests give the
// ratio instead. Identical heads give exactly KL = 0 (every z − r, e^{r̃} − e^{z̃} and K is 0).
// With targets, also ent = Σ e^{z̃}·z̃ (linear_logprobs' t: entropy = log s_z − ent/s_z) and the
// target logit z_y (one array shared by every slot: a row's target lies in one block).
// An empty row has m = −inf, rest = −1, center = csum = diff = ent = 0.
struct KlState {
  double* max_z;
  double* rest_z;
  double* max_r;
  double* rest_r;
  double* center;
  double* csum;
  double* diff;
  double* ent;
  double* z_target;  // nullptr when not scored
};

constexpr int64_t kStateArrays = 8;  // the merged arrays, z_target aside

KlState shifted(const KlState& s, int64_t n0) {
  return {s.max_z + n0,  s.rest_z + n0, s.max_r + n0, s.rest_r + n0,
          s.center + n0, s.csum + n0,   s.diff + n0,  s.ent + n0,
          s.z_target != nullptr ? s.z_target + n0 : nullptr};
}

// One set of logits' statistics (a block of a row), as merge_row takes them.
struct KlStats {
  double max_z, rest_z, max_r, rest_r, center, csum, diff, ent;
};

// State row i ← state row i merged with the statistics of one more set of logits. With M the
// merged maxima, α = e^{m_z − M_z} and β = e^{m_r − M_r} per set, a set's s_z rescales to α·s_z,
// its s_r to β·s_r, its csum to α·(csum + (K − K_new)·s_z) (K_new: the center of the set holding
// the larger z), its diff = s_r − s_z to β·diff + (β − α)·s_z and its ent to
// α·(ent + (m_z − M_z)·s_z).
inline void merge_row(const KlState& st, int64_t i, const KlStats& b) {
  constexpr double kEmpty = -std::numeric_limits<double>::infinity();
  if (b.max_z == kEmpty && b.max_r == kEmpty) {
    // An empty set (all logits −inf, or all NaN: the running max skips NaN); keep a NaN visible.
    if (std::isnan(b.rest_z) || std::isnan(b.rest_r) || std::isnan(b.csum) ||
        std::isnan(b.diff)) {
      st.csum[i] = std::numeric_limits<double>::quiet_NaN();
    }
    return;
  }
  double& m_z = st.max_z[i];
  double& m_r = st.max_r[i];
  if (m_z == kEmpty && m_r == kEmpty) {
    const double old_csum = st.csum[i];  // 0, or NaN from an earlier all-NaN set
    m_z = b.max_z;
    st.rest_z[i] = b.rest_z;
    m_r = b.max_r;
    st.rest_r[i] = b.rest_r;
    st.center[i] = b.center;
    st.csum[i] = b.csum + old_csum;
    st.diff[i] = b.diff;
    st.ent[i] = b.ent;
    return;
  }
  const double new_max_z = std::max(m_z, b.max_z), new_max_r = std::max(m_r, b.max_r);
  const double shift_z = m_z - new_max_z, other_shift_z = b.max_z - new_max_z;  // both ≤ 0
  const double shift_r = m_r - new_max_r, other_shift_r = b.max_r - new_max_r;
  const double s_z = 1.0 + st.rest_z[i], other_s_z = 1.0 + b.rest_z;
  const double s_r = 1.0 + st.rest_r[i], other_s_r = 1.0 + b.rest_r;
  const double scale_z = std::exp(shift_z), other_scale_z = std::exp(other_shift_z);
  const double scale_r = std::exp(shift_r), other_scale_r = std::exp(other_shift_r);
  const double center = m_z >= b.max_z ? st.center[i] : b.center;
  st.csum[i] = scale_z * (st.csum[i] + (st.center[i] - center) * s_z) +
               other_scale_z * (b.csum + (b.center - center) * other_s_z);
  st.center[i] = center;
  st.ent[i] = scale_z * (st.ent[i] + shift_z * s_z) +
              other_scale_z * (b.ent + other_shift_z * other_s_z);
  st.diff[i] = (scale_r * st.diff[i] + (scale_r - scale_z) * s_z) +
               (other_scale_r * b.diff + (other_scale_r - other_scale_z) * other_s_z);
  // The rest of the set holding the maximum stays as it is (its scale is 1); the other set joins
  // it whole, its own maximum included.
  st.rest_z[i] = m_z >= b.max_z ? st.rest_z[i] + other_scale_z * other_s_z
                                : b.rest_z + scale_z * s_z;
  st.rest_r[i] = m_r >= b.max_r ? st.rest_r[i] + other_scale_r * other_s_r
                                : b.rest_r + scale_r * s_r;
  m_z = new_max_z;
  m_r = new_max_r;
}

// Each pass below runs over columns [begin, end) in steps of U's lanes: once with the vector
// type over the bulk of the row, once with the scalar type over the last (cols mod lanes). The
// forward and backward passes compute z from a with the same expression (logit_of), so that with
// -ffp-contract=off backward recomputes forward's logits bit for bit.

template <typename U, bool HAS_SOFTCAP>
FASTALIGN_INLINE U logit_of(const U& a, const U& inv_t, const U& inv_cap, const U& cap_over_t) {
  if constexpr (HAS_SOFTCAP) {
    return cap_over_t * vtanh(a * inv_cap);
  } else {
    (void)inv_cap;
    (void)cap_over_t;
    return a * inv_t;
  }
}

// t = fl(z − r) and its rounding error e, t + e = z − r exactly (Knuth's TwoSum; the build's
// -ffp-contract=off and the absence of -ffast-math keep every step as written).
template <typename U>
FASTALIGN_INLINE U difference_error(const U& z, const U& r, const U& t) {
  const U r_part = t - z;         // ≈ −r
  const U z_part = t - r_part;    // ≈ z
  return (z - z_part) - (r + r_part);
}

// a → z and a_ref → r in place, keeping the running maxima, and r where z is largest.
template <typename U, bool HAS_BIAS, bool HAS_SOFTCAP>
FASTALIGN_INLINE void to_logits(const KlTile<ScalarOf<U>>& tile, ScalarOf<U>* __restrict__ z,
                                ScalarOf<U>* __restrict__ r, int64_t begin, int64_t end,
                                U& z_max, U& r_max, U& r_at_z_max) {
  constexpr int64_t kStep = Lanes<U>::kCount;
  const ScalarOf<U>* __restrict__ bias = tile.bias;
  const ScalarOf<U>* __restrict__ ref_bias = tile.ref_bias;
  const U inv_t = splat<U>(tile.inv_t), inv_cap = splat<U>(tile.inv_cap);
  const U cap_over_t = splat<U>(tile.cap_over_t);
  for (int64_t v = begin; v < end; v += kStep) {
    U a = load<U>(z + v), a_ref = load<U>(r + v);
    if constexpr (HAS_BIAS) {
      a += load<U>(bias + v);
      a_ref += load<U>(ref_bias + v);
    }
    const U zv = logit_of<U, HAS_SOFTCAP>(a, inv_t, inv_cap, cap_over_t);
    const U rv = logit_of<U, HAS_SOFTCAP>(a_ref, inv_t, inv_cap, cap_over_t);
    store(z + v, zv);
    store(r + v, rv);
    const auto larger = zv > z_max;
    r_at_z_max = larger ? rv : r_at_z_max;
    z_max = larger ? zv : z_max;
    r_max = rv > r_max ? rv : r_max;
  }
}

// The block's (rest, ties) per head, csum and diff, relative to the block maxima and to the
// center K: ties counts the logits equal to the maximum (each contributes exactly e^0 = 1), rest
// sums e^{z−m} over the others, so that the maximum's 1 never enters a float32 sum. SCORED: ent
// too, Σ e^{z−m}·(z − m).
template <typename U, bool SCORED>
FASTALIGN_INLINE void block_sums(const ScalarOf<U>* __restrict__ z,
                                 const ScalarOf<U>* __restrict__ r, int64_t begin, int64_t end,
                                 ScalarOf<U> max_z, ScalarOf<U> max_r, ScalarOf<U> center,
                                 U& rest_z, U& ties_z, U& rest_r, U& ties_r, U& csum, U& diff,
                                 U& ent) {
  constexpr int64_t kStep = Lanes<U>::kCount;
  const U m_z = splat<U>(max_z), m_r = splat<U>(max_r), k = splat<U>(center);
  const U zero = splat<U>(0), one = splat<U>(1);
  for (int64_t v = begin; v < end; v += kStep) {
    const U zv = load<U>(z + v), rv = load<U>(r + v);
    const U dz = zv - m_z;
    const U dr = rv - m_r;
    const U ez = vexp(dz), er = vexp(dr);
    const U t = zv - rv;
    csum += ez * ((t - k) + difference_error(zv, rv, t));
    diff += er - ez;
    rest_z += dz == zero ? zero : ez;
    ties_z += dz == zero ? one : zero;
    rest_r += dr == zero ? zero : er;
    ties_r += dr == zero ? one : zero;
    if constexpr (SCORED) ent += ez * dz;
  }
}

// Backward per-row constants, float64 row statistics split into hi + lo in the compute dtype (see
// split_hi_lo). With C = lse_z − lse_r + KL = Σ p (z − r) (forward writes ref_lse so that this
// holds to float64 rounding) and t + e = z − r exactly (TwoSum):
//   u = ((t − C_hi) − C_lo) + e = log p − log q − KL,   dL/dz = g·p·u,
//   dL/dr = g·(q − p) = g·p·expm1(−u − KL)  while |u + KL| < 1/4, else g·(q − p),
// p = e^{(z − lse_hi) − lse_lo}, q = e^{(r − ref_lse_hi) − ref_lse_lo}. t − C_hi is exact where p
// is large (Sterbenz), so u is accurate relative to itself whatever the logits' size, the offset
// between the two heads or the size of log q; and Σ p u = 0 as it should, since C is the
// forward's Σ p (z − r) of the same logits. Identical heads and a one-token vocabulary give exact
// zeros. The expm1 form keeps q − p accurate relative to itself for close heads, where two
// rounded probabilities would leave only their rounding.
template <typename T>
struct KlRows {
  const T* grad;
  const T* lse_hi;
  const T* lse_lo;
  const T* ref_lse_hi;
  const T* ref_lse_lo;
  const T* c_hi;
  const T* c_lo;
  const T* kl;  // KL rounded to T
  // with targets (else nullptr): the upstream gradients of logp and entropy (the latter may be
  // nullptr: zero) and Σ p z as hi + lo, as linear_logprobs' backward takes them
  const T* grad_logp;
  const T* grad_entropy;
  const T* sum_pz_hi;
  const T* sum_pz_lo;
};

template <typename T>
const T* shifted_or_null(const T* p, int64_t n0) {
  return p != nullptr ? p + n0 : nullptr;
}

template <typename T>
KlRows<T> shifted(const KlRows<T>& in, int64_t n0) {
  return {in.grad + n0,
          in.lse_hi + n0,
          in.lse_lo + n0,
          in.ref_lse_hi + n0,
          in.ref_lse_lo + n0,
          in.c_hi + n0,
          in.c_lo + n0,
          in.kl + n0,
          shifted_or_null(in.grad_logp, n0),
          shifted_or_null(in.grad_entropy, n0),
          shifted_or_null(in.sum_pz_hi, n0),
          shifted_or_null(in.sum_pz_lo, n0)};
}

// e^x − 1 for |x| ≤ 1/4: float32, the Taylor series to x⁷ (truncation < x⁸/40320, 4e-10 relative
// at 1/4, below float32 rounding); float64, libm's expm1.
template <typename U>
FASTALIGN_INLINE U expm1_small(const U& x) {
  if constexpr (std::is_same_v<U, double>) {
    return std::expm1(x);
  }
  using S = ScalarOf<U>;
  U p = x * S(1.0 / 5040.0) + S(1.0 / 720.0);
  p = p * x + S(1.0 / 120.0);
  p = p * x + S(1.0 / 24.0);
  p = p * x + S(1.0 / 6.0);
  p = p * x + S(0.5);
  p = p * x + S(1.0);
  return p * x;
}

// Both tiles → dL/da · T in place (the 1/T becomes the alpha of the gradient products):
//   dL/da_z = dL/dz · (1 − tanh²(a_z/c)),  dL/da_r = dL/dr · (1 − tanh²(a_r/c))   (no tanh factor
// without softcap). A tile whose head needs no gradient is left holding its logits.
// SCORED adds logp's and the entropy's terms for their upstream gradients g_y and g_e (as
// linear_logprobs' backward; ∂ent/∂z_v = −p_v·(z_v − Σ_u p_u z_u)):
//   dL/dz_v = g·p_v·u_v + g_y·(1[v = y] − p_v) − g_e·p_v·(z_v − Σ_u p_u z_u),
// all but the g_y·1[v = y] term, which the caller adds at y.
template <typename U, bool HAS_BIAS, bool HAS_SOFTCAP, bool GRAD_Z, bool GRAD_R, bool SCORED>
FASTALIGN_INLINE void to_grads(const KlTile<ScalarOf<U>>& tile, ScalarOf<U>* __restrict__ zp,
                               ScalarOf<U>* __restrict__ rp, int64_t begin, int64_t end,
                               ScalarOf<U> grad, ScalarOf<U> lse_hi, ScalarOf<U> lse_lo,
                               ScalarOf<U> ref_lse_hi, ScalarOf<U> ref_lse_lo, ScalarOf<U> c_hi,
                               ScalarOf<U> c_lo, ScalarOf<U> kl, ScalarOf<U> grad_logp,
                               ScalarOf<U> grad_entropy, ScalarOf<U> sum_pz_hi,
                               ScalarOf<U> sum_pz_lo) {
  constexpr int64_t kStep = Lanes<U>::kCount;
  const ScalarOf<U>* __restrict__ bias = tile.bias;
  const ScalarOf<U>* __restrict__ ref_bias = tile.ref_bias;
  const U inv_t = splat<U>(tile.inv_t), inv_cap = splat<U>(tile.inv_cap);
  const U cap_over_t = splat<U>(tile.cap_over_t);
  const U g = splat<U>(grad);
  const U row_lse_hi = splat<U>(lse_hi), row_lse_lo = splat<U>(lse_lo);
  const U row_ref_lse_hi = splat<U>(ref_lse_hi), row_ref_lse_lo = splat<U>(ref_lse_lo);
  const U row_c_hi = splat<U>(c_hi), row_c_lo = splat<U>(c_lo);
  const U row_kl = splat<U>(kl);
  const U g_y = splat<U>(grad_logp), g_e = splat<U>(grad_entropy);
  const U row_sum_pz_hi = splat<U>(sum_pz_hi), row_sum_pz_lo = splat<U>(sum_pz_lo);
  const U small = splat<U>(ScalarOf<U>(0.0625));  // (1/4)²
  for (int64_t v = begin; v < end; v += kStep) {
    U a = load<U>(zp + v), a_ref = load<U>(rp + v);
    if constexpr (HAS_BIAS) {
      a += load<U>(bias + v);
      a_ref += load<U>(ref_bias + v);
    }
    const U z = logit_of<U, HAS_SOFTCAP>(a, inv_t, inv_cap, cap_over_t);
    const U r = logit_of<U, HAS_SOFTCAP>(a_ref, inv_t, inv_cap, cap_over_t);
    const U p = vexp((z - row_lse_hi) - row_lse_lo);
    const U t = z - r;
    const U u = ((t - row_c_hi) - row_c_lo) + difference_error(z, r, t);
    if constexpr (GRAD_Z) {
      U d = g * p * u;
      if constexpr (SCORED) d -= p * (g_y + g_e * ((z - row_sum_pz_hi) - row_sum_pz_lo));
      if constexpr (HAS_SOFTCAP) d *= vsech2(a * inv_cap);
      store(zp + v, d);
    }
    if constexpr (GRAD_R) {
      const U x = -u - row_kl;  // log q − log p
      const U q = vexp((r - row_ref_lse_hi) - row_ref_lse_lo);
      U d = g * (x * x < small ? p * expm1_small(x) : q - p);
      if constexpr (HAS_SOFTCAP) d *= vsech2(a_ref * inv_cap);
      store(rp + v, d);
    }
  }
}

// The fused passes, as dispatch.h's run_rows takes them (switches: bias, softcap; backward also
// which heads need gradients).
struct ForwardKernel {
  template <typename V, bool HAS_BIAS, bool HAS_SOFTCAP, bool SCORED>
  static FASTALIGN_INLINE void rows(const KlTile<ScalarOf<V>>& tile, const KlState& state,
                                    int64_t r0, int64_t r1) {
    using T = ScalarOf<V>;
    constexpr T kNegInf = -std::numeric_limits<T>::infinity();
    const int64_t cols = tile.cols;
    const int64_t bulk = cols - cols % Lanes<V>::kCount;
    for (int64_t row = r0; row < r1; ++row) {
      T* z = tile.z + row * cols;
      T* r = tile.r + row * cols;
      V bulk_max_z = splat<V>(kNegInf), bulk_max_r = splat<V>(kNegInf), bulk_r_at{};
      to_logits<V, HAS_BIAS, HAS_SOFTCAP>(tile, z, r, 0, bulk, bulk_max_z, bulk_max_r, bulk_r_at);
      T max_z = kNegInf, r_at = T(0);
      if constexpr (Lanes<V>::kCount == 1) {
        max_z = bulk_max_z;
        r_at = bulk_r_at;
      } else {
        for (int64_t l = 0; l < Lanes<V>::kCount; ++l) {
          if (bulk_max_z[l] > max_z) {
            max_z = bulk_max_z[l];
            r_at = bulk_r_at[l];
          }
        }
      }
      T max_r = lane_max(bulk_max_r);
      to_logits<T, HAS_BIAS, HAS_SOFTCAP>(tile, z, r, bulk, cols, max_z, max_r, r_at);
      // The center: z − r rounded at the largest z, exactly as block_sums rounds it there.
      const T center = max_z - r_at;

      V v_rest_z{}, v_ties_z{}, v_rest_r{}, v_ties_r{}, v_csum{}, v_diff{}, v_ent{};
      block_sums<V, SCORED>(z, r, 0, bulk, max_z, max_r, center, v_rest_z, v_ties_z, v_rest_r,
                            v_ties_r, v_csum, v_diff, v_ent);
      T rest_z = lane_sum(v_rest_z), ties_z = lane_sum(v_ties_z);
      T rest_r = lane_sum(v_rest_r), ties_r = lane_sum(v_ties_r);
      T csum = lane_sum(v_csum), diff = lane_sum(v_diff), ent = lane_sum(v_ent);
      block_sums<T, SCORED>(z, r, bulk, cols, max_z, max_r, center, rest_z, ties_z, rest_r,
                            ties_r, csum, diff, ent);
      if constexpr (SCORED) {  // (an ignored target may land anywhere: its logp is zeroed later)
        const int64_t y = tile.targets[row] - tile.v0;
        if (y >= 0 && y < cols) state.z_target[row] = static_cast<double>(z[y]);
      }
      // rest = (ties − 1) + Σ_others: the ties are small integers, exact in any dtype.
      merge_row(state, row,
                {static_cast<double>(max_z),
                 static_cast<double>(rest_z) + (static_cast<double>(ties_z) - 1.0),
                 static_cast<double>(max_r),
                 static_cast<double>(rest_r) + (static_cast<double>(ties_r) - 1.0),
                 static_cast<double>(center), static_cast<double>(csum),
                 static_cast<double>(diff), static_cast<double>(ent)});
    }
  }
};

// At least one of GRAD_Z, GRAD_R is true when it runs (the entry point returns early otherwise).
struct BackwardKernel {
  template <typename V, bool HAS_BIAS, bool HAS_SOFTCAP, bool GRAD_Z, bool GRAD_R, bool SCORED>
  static FASTALIGN_INLINE void rows(const KlTile<ScalarOf<V>>& tile, const KlRows<ScalarOf<V>>& in,
                                    int64_t r0, int64_t r1) {
    using T = ScalarOf<V>;
    const int64_t cols = tile.cols;
    const int64_t bulk = cols - cols % Lanes<V>::kCount;
    for (int64_t row = r0; row < r1; ++row) {
      T* z = tile.z + row * cols;
      T* r = tile.r + row * cols;
      const T g = in.grad[row];
      const T lse_hi = in.lse_hi[row], lse_lo = in.lse_lo[row];
      const T ref_lse_hi = in.ref_lse_hi[row], ref_lse_lo = in.ref_lse_lo[row];
      const T c_hi = in.c_hi[row], c_lo = in.c_lo[row], kl = in.kl[row];
      T g_y = T(0), g_e = T(0), sum_pz_hi = T(0), sum_pz_lo = T(0);
      int64_t y = -1;       // the target's column in this block, if there
      T target_grad = T(0);  // the g_y·1[v = y] term, times the tanh factor at y
      if constexpr (SCORED) {
        g_y = in.grad_logp[row];
        g_e = in.grad_entropy != nullptr ? in.grad_entropy[row] : T(0);
        sum_pz_hi = in.sum_pz_hi[row];
        sum_pz_lo = in.sum_pz_lo[row];
        y = tile.targets[row] - tile.v0;  // g_y = 0 on rows whose target is ignored
        if (y >= 0 && y < cols) {
          target_grad = g_y;
          if constexpr (HAS_SOFTCAP) {
            T a = z[y];  // still the raw logit
            if constexpr (HAS_BIAS) a += tile.bias[y];
            target_grad = g_y * vsech2(a * tile.inv_cap);
          }
        } else {
          y = -1;
        }
      }
      to_grads<V, HAS_BIAS, HAS_SOFTCAP, GRAD_Z, GRAD_R, SCORED>(
          tile, z, r, 0, bulk, g, lse_hi, lse_lo, ref_lse_hi, ref_lse_lo, c_hi, c_lo, kl, g_y, g_e,
          sum_pz_hi, sum_pz_lo);
      to_grads<T, HAS_BIAS, HAS_SOFTCAP, GRAD_Z, GRAD_R, SCORED>(
          tile, z, r, bulk, cols, g, lse_hi, lse_lo, ref_lse_hi, ref_lse_lo, c_hi, c_lo, kl, g_y,
          g_e, sum_pz_hi, sum_pz_lo);
      if (y >= 0) z[y] += target_grad;
    }
  }
};

// The tiles of the fused passes for one tile of the stream (see streaming.h). Both biases are set
// when either head has one (make_head gives the other zeros), else both nullptr.
template <typename T>
KlTile<T> row_tile(const Problem<T, 2>& p, const TileSet<T, 2>& tiles, const int64_t* targets) {
  return {tiles.logits[kPolicy],
          tiles.logits[kRef],
          p.bias(kPolicy, tiles.v0),
          p.bias(kRef, tiles.v0),
          targets != nullptr ? targets + tiles.n0 : nullptr,
          tiles.cols,
          tiles.v0,
          p.inv_t,
          p.inv_cap,
          p.cap_over_t};
}

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------

void check_head(const char* fn, const char* hidden_name, const char* weight_name,
                const char* bias_name, const at::Tensor& hidden, const at::Tensor& weight,
                const c10::optional<at::Tensor>& bias, at::ScalarType dtype) {
  check_cpu_contiguous(fn, hidden_name, hidden, 2);
  check_cpu_contiguous(fn, weight_name, weight, 2);
  TORCH_CHECK_TYPE(hidden.scalar_type() == dtype, fn, ": ", hidden_name,
                   " must have hidden's dtype ", dtype, ", got ", hidden.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == dtype, fn, ": ", weight_name,
                   " must have hidden's dtype ", dtype, ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), fn, ": ", hidden_name, " has H = ",
                    hidden.size(1), " but ", weight_name, " has H = ", weight.size(1));
  if (has_tensor(bias)) {
    check_cpu_contiguous(fn, bias_name, *bias, 1);
    TORCH_CHECK_TYPE(bias->scalar_type() == dtype, fn, ": ", bias_name,
                     " must have hidden's dtype ", dtype, ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->size(0) == weight.size(0), fn, ": ", bias_name, " must have shape [",
                      weight.size(0), "], got ", bias->sizes());
  }
}

void check_inputs(const char* fn, const at::Tensor& hidden, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& ref_hidden,
                  const at::Tensor& ref_weight, const c10::optional<at::Tensor>& ref_bias,
                  double temperature, double softcap) {
  check_cpu_contiguous(fn, "hidden [N, H]", hidden, 2);
  const auto dtype = hidden.scalar_type();
  check_head_dtype(fn, dtype);
  check_head(fn, "hidden [N, H]", "weight [V, H]", "bias [V]", hidden, weight, bias, dtype);
  check_head(fn, "ref_hidden [N, H_ref]", "ref_weight [V, H_ref]", "ref_bias [V]", ref_hidden,
             ref_weight, ref_bias, dtype);
  TORCH_CHECK_VALUE(weight.size(0) >= 1, fn, ": weight must have at least one row (V >= 1)");
  TORCH_CHECK_VALUE(ref_weight.size(0) == weight.size(0), fn,
                    ": weight and ref_weight must have the same vocabulary size V, got ",
                    weight.size(0), " and ", ref_weight.size(0));
  TORCH_CHECK_VALUE(ref_hidden.size(0) == hidden.size(0), fn,
                    ": hidden and ref_hidden must have the same number of rows N, got ",
                    hidden.size(0), " and ", ref_hidden.size(0));
  check_logit_options(fn, temperature, softcap);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// n rows of empty state in `storage` (kStateArrays·n doubles).
KlState empty_state(double* storage, int64_t n, double* z_target) {
  KlState st{storage,         storage + n,     storage + 2 * n, storage + 3 * n,
             storage + 4 * n, storage + 5 * n, storage + 6 * n, storage + 7 * n,
             z_target};
  std::fill(st.max_z, st.max_z + n, -std::numeric_limits<double>::infinity());
  std::fill(st.rest_z, st.rest_z + n, -1.0);
  std::fill(st.max_r, st.max_r + n, -std::numeric_limits<double>::infinity());
  std::fill(st.rest_r, st.rest_r + n, -1.0);
  std::fill(st.center, st.center + n, 0.0);
  std::fill(st.csum, st.csum + n, 0.0);
  std::fill(st.diff, st.diff + n, 0.0);
  std::fill(st.ent, st.ent + n, 0.0);
  return st;
}

// The op's side of stream_forward: a KlState per slot (z_target shared, see KlState).
template <typename T>
struct ForwardOp {
  using State = KlState;
  const Problem<T, 2>& p;
  const int64_t* targets;           // nullptr: not scored
  std::vector<KlState> slot_state;  // [0]: the output
  std::vector<double> extra;        // the storage of slots 1, 2, ...

  State state(int64_t slot) { return slot_state[slot]; }

  void add_slots(int64_t slots) {
    const int64_t n = p.n;
    extra.resize(static_cast<size_t>((slots - 1) * kStateArrays * n));
    slot_state.resize(static_cast<size_t>(slots));
    for (int64_t slot = 1; slot < slots; ++slot) {
      slot_state[slot] = empty_state(extra.data() + (slot - 1) * kStateArrays * n, n,
                                     slot_state[0].z_target);
    }
  }

  void merge(int64_t slot, int64_t i) {
    const KlState& st = slot_state[slot];
    merge_row(slot_state[0], i,
              {st.max_z[i], st.rest_z[i], st.max_r[i], st.rest_r[i], st.center[i], st.csum[i],
               st.diff[i], st.ent[i]});
  }

  void rows(const TileSet<T, 2>& tiles, const State& st, int64_t r0, int64_t r1) const {
    const KlTile<T> tile = row_tile(p, tiles, targets);
    const Switches<3> on{tile.bias != nullptr, p.has_softcap, targets != nullptr};
    run_rows<ForwardKernel, T>(p.isa, on, tile, shifted(st, tiles.n0), r0, r1);
  }
};

}  // namespace

std::vector<at::Tensor> linear_kl_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias,
                                          const at::Tensor& ref_hidden,
                                          const at::Tensor& ref_weight,
                                          const c10::optional<at::Tensor>& ref_bias,
                                          double temperature, double softcap,
                                          const c10::optional<at::Tensor>& targets,
                                          int64_t ignore_index) {
  constexpr const char* fn = "linear_kl_forward";
  check_inputs(fn, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, softcap);
  const int64_t n = hidden.size(0);
  const bool scored = has_tensor(targets);
  if (scored) check_targets(fn, *targets, n, weight.size(0), ignore_index);
  at::NoGradGuard no_grad;
  const auto stat_opts = hidden.options().dtype(at::kDouble);
  at::Tensor kl = at::zeros({n}, stat_opts), lse = at::zeros({n}, stat_opts),
             ref_lse = at::zeros({n}, stat_opts);
  const at::ScalarType dtype = compute_dtype(hidden.scalar_type());
  // With targets: logp and entropy in the compute dtype, Σ p z in float64 (for backward).
  at::Tensor logp, entropy, sum_pz;
  if (scored) {
    logp = at::zeros({n}, hidden.options().dtype(dtype));
    entropy = at::zeros({n}, hidden.options().dtype(dtype));
    sum_pz = at::zeros({n}, stat_opts);
  }
  const auto outputs = [&]() -> std::vector<at::Tensor> {
    if (!scored) return {kl, lse, ref_lse};
    return {kl, lse, ref_lse, logp, entropy, sum_pz};
  };
  if (n == 0) {
    return outputs();
  }
  // detach: worker threads run with autograd on (grad mode is thread-local), and out= products
  // refuse inputs that require grad.
  const at::Tensor h = hidden.detach().to(dtype).contiguous();
  const at::Tensor h_ref = ref_hidden.detach().to(dtype).contiguous();
  const bool any_bias = has_tensor(bias) || has_tensor(ref_bias);
  const Head heads[2] = {make_head(h, weight, bias, any_bias),
                         make_head(h_ref, ref_weight, ref_bias, any_bias)};

  AT_DISPATCH_FLOATING_TYPES(dtype, fn, [&] {
    using T = scalar_t;
    std::vector<double> storage(static_cast<size_t>(kStateArrays * n));
    std::vector<double> z_target(static_cast<size_t>(scored ? n : 0), 0.0);
    const KlState state = empty_state(storage.data(), n, scored ? z_target.data() : nullptr);
    const Problem<T, 2> problem(heads, temperature, softcap);
    const int64_t* target_ids = scored ? targets->data_ptr<int64_t>() : nullptr;
    ForwardOp<T> op{problem, target_ids, {state}, {}};
    stream_forward(problem, op);

    double* kl_out = kl.data_ptr<double>();
    double* lse_out = lse.data_ptr<double>();
    double* ref_lse_out = ref_lse.data_ptr<double>();
    T* logp_out = scored ? logp.data_ptr<T>() : nullptr;
    T* entropy_out = scored ? entropy.data_ptr<T>() : nullptr;
    double* sum_pz_out = scored ? sum_pz.data_ptr<double>() : nullptr;
    at::parallel_for(0, n, kRowGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const double s_z = 1.0 + state.rest_z[i];
        const double log_s_z = std::log1p(state.rest_z[i]);
        const double ratio = state.diff[i] / s_z;  // s_r / s_z − 1
        const double log_ratio = std::fabs(ratio) < 0.5
                                     ? std::log1p(ratio)
                                     : std::log1p(state.rest_r[i]) - log_s_z;
        const double sum_pd = state.center[i] + state.csum[i] / s_z;  // C = Σ p (z − r)
        // KL ≥ 0; rounding may leave a tiny negative (NaN passes through std::max unchanged).
        const double value =
            std::max((sum_pd - (state.max_z[i] - state.max_r[i])) + log_ratio, 0.0);
        const double lse_z = state.max_z[i] + log_s_z;
        kl_out[i] = value;
        lse_out[i] = lse_z;
        // lse_r = m_r + log s_z + log(s_r / s_z), written so that lse − ref_lse + KL gives back C
        // to float64 rounding (see KlRows): two independently rounded lse would be off by ~1e-7
        // (far more where log q of the dominant token is large) and bias every gradient.
        ref_lse_out[i] = (lse_z + value) - sum_pd;
        if (scored) {  // as linear_logprobs_forward, with the statistics in float64 already
          const bool valid = target_ids[i] != ignore_index;
          const double mean_dz = state.ent[i] / s_z;  // Σ p (z − m_z)
          sum_pz_out[i] = state.max_z[i] + mean_dz;
          // z_y − lse ≤ 0 exactly; rounding must not make a probability exceed 1 (NaN stays).
          logp_out[i] =
              valid ? static_cast<T>(std::min((z_target[i] - state.max_z[i]) - log_s_z, 0.0))
                    : T(0);
          entropy_out[i] = valid ? static_cast<T>(log_s_z - mean_dz) : T(0);
        }
      }
    });
  });
  return outputs();
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

std::vector<at::Tensor> linear_kl_backward(
    const at::Tensor& grad_kl, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& ref_hidden,
    const at::Tensor& ref_weight, const c10::optional<at::Tensor>& ref_bias, const at::Tensor& kl,
    const at::Tensor& lse, const at::Tensor& ref_lse, double temperature, double softcap,
    bool compute_dhidden, bool compute_dweight, bool compute_dbias, bool compute_dref_hidden,
    bool compute_dref_weight, bool compute_dref_bias, const c10::optional<at::Tensor>& grad_logp,
    const c10::optional<at::Tensor>& grad_entropy, const c10::optional<at::Tensor>& targets,
    const c10::optional<at::Tensor>& sum_pz, int64_t ignore_index) {
  constexpr const char* fn = "linear_kl_backward";
  check_inputs(fn, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, softcap);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const at::ScalarType dtype = compute_dtype(hidden.scalar_type());
  check_row_stat(fn, "grad_kl", grad_kl, n, dtype);
  check_row_stat(fn, "kl", kl, n, at::kDouble);
  check_row_stat(fn, "lse", lse, n, at::kDouble);
  check_row_stat(fn, "ref_lse", ref_lse, n, at::kDouble);
  const bool has_targets = has_tensor(targets);
  const bool has_grad_entropy = has_targets && has_tensor(grad_entropy);
  if (has_targets) {
    check_targets(fn, *targets, n, vocab, ignore_index);
    TORCH_CHECK_VALUE(has_tensor(grad_logp) && has_tensor(sum_pz), fn,
                      ": targets need grad_logp and sum_pz");
    check_row_stat(fn, "grad_logp", *grad_logp, n, dtype);
    check_row_stat(fn, "sum_pz", *sum_pz, n, at::kDouble);
    if (has_grad_entropy) check_row_stat(fn, "grad_entropy", *grad_entropy, n, dtype);
  }
  TORCH_CHECK_VALUE(!compute_dbias || has_tensor(bias), fn, ": compute_dbias needs a bias");
  TORCH_CHECK_VALUE(!compute_dref_bias || has_tensor(ref_bias), fn,
                    ": compute_dref_bias needs a ref_bias");
  at::NoGradGuard no_grad;

  const bool need_policy = compute_dhidden || compute_dweight || compute_dbias;
  const bool need_ref = compute_dref_hidden || compute_dref_weight || compute_dref_bias;
  // Rows with an upstream gradient that is not 0 (NaN counts as not 0, so that it propagates).
  // The logp and entropy terms reach the policy head only.
  const bool scored = has_targets && need_policy;
  RowSelection sel;
  AT_DISPATCH_FLOATING_TYPES(dtype, fn, [&] {
    const scalar_t* g = grad_kl.data_ptr<scalar_t>();
    const scalar_t* g_y = scored ? grad_logp->data_ptr<scalar_t>() : nullptr;
    const scalar_t* g_e = scored && has_grad_entropy ? grad_entropy->data_ptr<scalar_t>()
                                                     : nullptr;
    const int64_t* y = scored ? targets->data_ptr<int64_t>() : nullptr;
    sel = select_rows(n, grad_kl.options(), [&](int64_t i) {
      const bool scored_row = y != nullptr && y[i] != ignore_index;
      return g[i] != scalar_t(0) ||
             (scored_row && (g_y[i] != scalar_t(0) || (g_e != nullptr && g_e[i] != scalar_t(0))));
    });
  });
  if (sel.count == 0 || !(need_policy || need_ref)) {
    return {zeros_if(compute_dhidden, hidden),         zeros_if(compute_dweight, weight),
            zeros_if(compute_dbias, bias),             zeros_if(compute_dref_hidden, ref_hidden),
            zeros_if(compute_dref_weight, ref_weight), zeros_if(compute_dref_bias, ref_bias)};
  }

  const at::Tensor h = kept_rows(hidden, sel, dtype);
  const at::Tensor h_ref = kept_rows(ref_hidden, sel, dtype);
  const at::Tensor g = kept_rows(grad_kl, sel, dtype);
  const at::Tensor lse_kept = kept_rows(lse, sel, at::kDouble);
  const at::Tensor ref_lse_kept = kept_rows(ref_lse, sel, at::kDouble);
  const auto [lse_hi, lse_lo] = split_hi_lo(lse_kept, dtype);
  const auto [ref_lse_hi, ref_lse_lo] = split_hi_lo(ref_lse_kept, dtype);
  const at::Tensor kl_kept = kept_rows(kl, sel, at::kDouble);
  // C = lse_z − lse_r + KL = Σ p (z − r): 0 exactly for identical heads.
  const auto [c_hi, c_lo] = split_hi_lo((lse_kept - ref_lse_kept) + kl_kept, dtype);
  const at::Tensor kl_t = kl_kept.to(dtype).contiguous();
  at::Tensor kept_targets, g_y, g_e, sum_pz_hi, sum_pz_lo;
  if (scored) {
    kept_targets = kept_rows(*targets, sel, at::kLong);
    // logp and entropy are 0 on rows whose target is ignored: no gradient flows from them.
    const at::Tensor ignored = kept_targets == ignore_index;
    g_y = kept_rows(*grad_logp, sel, dtype).masked_fill(ignored, 0);
    if (has_grad_entropy) g_e = kept_rows(*grad_entropy, sel, dtype).masked_fill(ignored, 0);
    std::tie(sum_pz_hi, sum_pz_lo) = split_hi_lo(kept_rows(*sum_pz, sel, at::kDouble), dtype);
  }

  const auto opts = h.options();
  Gradients<2> grads;
  grads.needed[kPolicy] = need_policy;
  grads.needed[kRef] = need_ref;
  // dh accumulates in the compute dtype; dW goes block by block straight into the output.
  if (compute_dhidden) grads.dh[kPolicy] = at::empty({sel.count, hidden.size(1)}, opts);
  if (compute_dref_hidden) grads.dh[kRef] = at::empty({sel.count, ref_hidden.size(1)}, opts);
  if (compute_dweight) grads.dweight[kPolicy] = at::empty(weight.sizes(), weight.options());
  if (compute_dref_weight) {
    grads.dweight[kRef] = at::empty(ref_weight.sizes(), ref_weight.options());
  }
  if (compute_dbias) grads.db[kPolicy] = at::zeros({vocab}, opts);
  if (compute_dref_bias) grads.db[kRef] = at::zeros({vocab}, opts);
  const bool any_bias = has_tensor(bias) || has_tensor(ref_bias);
  const Head heads[2] = {make_head(h, weight, bias, any_bias),
                         make_head(h_ref, ref_weight, ref_bias, any_bias)};

  AT_DISPATCH_FLOATING_TYPES(dtype, fn, [&] {
    using T = scalar_t;
    const auto data_or_null = [](const at::Tensor& t) -> const T* {
      return t.defined() ? t.data_ptr<T>() : nullptr;
    };
    const KlRows<T> in{g.data_ptr<T>(),          lse_hi.data_ptr<T>(),
                       lse_lo.data_ptr<T>(),     ref_lse_hi.data_ptr<T>(),
                       ref_lse_lo.data_ptr<T>(), c_hi.data_ptr<T>(),
                       c_lo.data_ptr<T>(),       kl_t.data_ptr<T>(),
                       data_or_null(g_y),        data_or_null(g_e),
                       data_or_null(sum_pz_hi),  data_or_null(sum_pz_lo)};
    const Problem<T, 2> problem(heads, temperature, softcap);
    const int64_t* target_ids = scored ? kept_targets.data_ptr<int64_t>() : nullptr;
    stream_backward(problem, grads, [&](const TileSet<T, 2>& tiles, int64_t r0, int64_t r1) {
      const KlTile<T> tile = row_tile(problem, tiles, target_ids);
      const Switches<5> on{tile.bias != nullptr, problem.has_softcap, need_policy, need_ref,
                           scored};
      run_rows<BackwardKernel, T>(problem.isa, on, tile, shifted(in, tiles.n0), r0, r1);
    });
  });

  return {compute_dhidden ? scatter_rows(grads.dh[kPolicy], hidden, sel) : at::Tensor(),
          grads.dweight[kPolicy],
          compute_dbias ? grads.db[kPolicy].to(bias->scalar_type()) : at::Tensor(),
          compute_dref_hidden ? scatter_rows(grads.dh[kRef], ref_hidden, sel) : at::Tensor(),
          grads.dweight[kRef],
          compute_dref_bias ? grads.db[kRef].to(ref_bias->scalar_type()) : at::Tensor()};
}

}  // namespace fastalign
