// Vector math for fastalign's CPU kernels: exp and tanh as branch-free polynomials written once
// over a type V that is a scalar (float, double) or a GCC vector of floats (`vector_size`).
//
// The elementwise passes of the kernels evaluate e^x once per logit in forward and again in
// backward; libm's scalar expf would cost about a third of the matrix-product time. The float32
// loops run on explicit 16-, 8- and 4-lane vectors, one width per instruction set (dispatch.h
// picks one at run time). Auto-vectorisation (`omp simd`) was tried first: GCC 12 kept the AVX2
// exp loop scalar (4x slower, and nothing warns), so the vector types are explicit. float64 goes
// through the same templates with V = double and libm's exp/tanh (it is there for gradcheck).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__)
#define FASTALIGN_INLINE inline __attribute__((always_inline))
#define FASTALIGN_VECTOR_TYPES 1
// Vectors only travel between always-inline functions, never across an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define FASTALIGN_INLINE inline
#endif

namespace fastalign {
namespace cpu {

#ifdef FASTALIGN_VECTOR_TYPES
typedef float f32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
#endif

template <typename V>
struct Lanes;  // Scalar: element type; Bits: unsigned integer type of the same shape; kCount
template <>
struct Lanes<float> {
  using Scalar = float;
  using Bits = uint32_t;
  static constexpr int64_t kCount = 1;
};
template <>
struct Lanes<double> {
  using Scalar = double;
  using Bits = uint64_t;
  static constexpr int64_t kCount = 1;
};
#ifdef FASTALIGN_VECTOR_TYPES
template <>
struct Lanes<f32x4> {
  using Scalar = float;
  using Bits = u32x4;
  static constexpr int64_t kCount = 4;
};
template <>
struct Lanes<f32x8> {
  using Scalar = float;
  using Bits = u32x8;
  static constexpr int64_t kCount = 8;
};
template <>
struct Lanes<f32x16> {
  using Scalar = float;
  using Bits = u32x16;
  static constexpr int64_t kCount = 16;
};
#endif

template <typename V>
using ScalarOf = typename Lanes<V>::Scalar;

template <typename V>
FASTALIGN_INLINE V splat(ScalarOf<V> value) {
  return V{} + value;  // scalar + vector broadcasts
}

template <typename V>
FASTALIGN_INLINE V load(const ScalarOf<V>* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // unaligned vector load
  return v;
}

template <typename V>
FASTALIGN_INLINE void store(ScalarOf<V>* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename To, typename From>
FASTALIGN_INLINE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

template <typename V>
FASTALIGN_INLINE ScalarOf<V> lane_sum(const V& v) {
  if constexpr (Lanes<V>::kCount == 1) {
    return v;
  } else {
    ScalarOf<V> total = v[0];
    for (int64_t i = 1; i < Lanes<V>::kCount; ++i) total += v[i];
    return total;
  }
}

template <typename V>
FASTALIGN_INLINE ScalarOf<V> lane_max(const V& v) {
  if constexpr (Lanes<V>::kCount == 1) {
    return v;
  } else {
    ScalarOf<V> best = v[0];
    for (int64_t i = 1; i < Lanes<V>::kCount; ++i) best = v[i] > best ? v[i] : best;
    return best;
  }
}

// e^x = 2^n · e^r with n = round(x·log2 e), |r| ≤ ln2/2, e^r by the Cephes degree-6 polynomial:
// relative error below 1e-7. Adding 1.5·2^23 rounds x·log2 e to an integer held in the low
// mantissa bits, which then become the exponent field of 2^n. x ≤ -88 gives exactly 0 (n = -127
// has a zero exponent field), so e^-inf = 0; a NaN fails both clamps and stays NaN.
template <typename V>
FASTALIGN_INLINE V exp_approx(const V& x_in) {
  V x = x_in;
  using Bits = typename Lanes<V>::Bits;
  const V lo = splat<V>(-88.0f), hi = splat<V>(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V shifter = splat<V>(12582912.0f);  // 1.5 · 2^23, bit pattern 0x4B400000
  const V k = x * 1.44269504088896341f + shifter;
  const V n = k - shifter;
  V r = x - n * 0.693359375f;  // ln 2 split in two so that n · 0.693359375 is exact
  r = r - n * -2.12194440e-4f;
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Bits exponent = (bit_cast<Bits>(k) - 0x4B400000u + 127u) << 23;
  return p * bit_cast<V>(exponent);
}

// tanh as a [13/6] rational function on [-7.9, 7.9] (the approximation Eigen uses; relative error
// below 4e-7 against float64 tanh), and tanh(x) = x for |x| < 4e-4 where the rational form loses
// relative accuracy.
template <typename V>
FASTALIGN_INLINE V tanh_approx(const V& a) {
  const V clamp = splat<V>(7.90531110763549805f), neg_clamp = splat<V>(-7.90531110763549805f);
  V x = a > clamp ? clamp : a;
  x = x < neg_clamp ? neg_clamp : x;
  const V x2 = x * x;
  V p = splat<V>(-2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  V q = splat<V>(1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const V t = p / q;
  // One comparison (x² < (4e-4)²) rather than two joined by &: GCC 12 turns the AND of two
  // AVX-512 mask comparisons into per-lane scalar code, four times slower.
  return x2 < splat<V>(1.6e-7f) ? a : t;
}

template <typename V>
FASTALIGN_INLINE V vexp(const V& x) {
  if constexpr (std::is_same_v<V, double>) {
    return std::exp(x);
  } else {
    return exp_approx(x);
  }
}

template <typename V>
FASTALIGN_INLINE V vtanh(const V& x) {
  if constexpr (std::is_same_v<V, double>) {
    return std::tanh(x);
  } else {
    return tanh_approx(x);
  }
}

// 1 − tanh²(x) = 4u / (1 + u)² with u = e^{−2|x|}. Written out rather than as 1 − t·t: near
// saturation (|x| ≳ 3) 1 − t·t cancels, and tanh_approx's 4e-7 error in t becomes a relative error
// of 1e-3 in the softcap's gradient factor; this form keeps vexp's 1e-7 relative accuracy.
template <typename V>
FASTALIGN_INLINE V vsech2(const V& x) {
  const V abs_x = x < ScalarOf<V>(0) ? -x : x;
  const V u = vexp(ScalarOf<V>(-2) * abs_x);
  const V one_plus_u = ScalarOf<V>(1) + u;
  return ScalarOf<V>(4) * u / (one_plus_u * one_plus_u);
}

}  // namespace cpu
}  // namespace fastalign
