// How a row kernel is chosen at run time, written once for every op:
//
// * compile-time switches: a kernel's variants (bias or none, softcap or none, which heads need
//   gradients, ...) are template parameters, so that a disabled feature costs nothing in the
//   inner loop. with_switches turns the run-time bools into them.
// * instruction sets: the float32 kernels are instantiated for 16-, 8- and 4-lane vectors inside
//   functions compiled for AVX-512, AVX2+FMA and baseline x86-64 (SSE2), and run_rows calls the
//   widest one chosen_isa() allows, so the extension still runs on any x86-64. float64 goes
//   through the same templates with V = double (it is there for gradcheck).
//
// A row kernel is a struct with one static member template,
//   template <typename V, bool... kSwitches> static void rows(args...);
// marked FASTALIGN_INLINE, so that its body (and the vector math it calls) is compiled inside
// the instruction-set trampoline below and takes on that trampoline's target.
#pragma once

#include <array>
#include <cstddef>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>

#include <c10/util/Exception.h>

#include "cpu_vec_math.h"

#if defined(FASTALIGN_VECTOR_TYPES) && defined(__x86_64__)
#define FASTALIGN_X86_ISAS 1
// GCC's target_clones would be shorter, but its "arch=" clones dispatch on the exact CPU model, so
// on a CPU newer than the compiler (or a VM reporting an odd model) they silently fall back to
// baseline. Explicit target attributes plus __builtin_cpu_supports (below) do not.
#define FASTALIGN_AVX2 __attribute__((target("avx2,fma")))
#define FASTALIGN_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#endif

namespace fastalign {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// Compile-time switches
// ---------------------------------------------------------------------------------------------

template <size_t K>
using Switches = std::array<bool, K>;

namespace detail {

// Fixes the switches one at a time, left to right, into the bool pack of `fixed`.
template <typename Kernel, typename V, size_t K, bool... kFixed, typename... Args>
FASTALIGN_INLINE void with_switches_from(std::integer_sequence<bool, kFixed...> fixed,
                                         const Switches<K>& on, const Args&... args) {
  (void)fixed;
  constexpr size_t kDone = sizeof...(kFixed);
  if constexpr (kDone == K) {
    (void)on;
    Kernel::template rows<V, kFixed...>(args...);
  } else if (on[kDone]) {
    with_switches_from<Kernel, V>(std::integer_sequence<bool, kFixed..., true>{}, on, args...);
  } else {
    with_switches_from<Kernel, V>(std::integer_sequence<bool, kFixed..., false>{}, on, args...);
  }
}

}  // namespace detail

// Kernel::rows<V, on[0], ..., on[K-1]>(args...): one instantiation per combination of switches.
template <typename Kernel, typename V, size_t K, typename... Args>
FASTALIGN_INLINE void with_switches(const Switches<K>& on, const Args&... args) {
  detail::with_switches_from<Kernel, V>(std::integer_sequence<bool>{}, on, args...);
}

// ---------------------------------------------------------------------------------------------
// Instruction sets
// ---------------------------------------------------------------------------------------------

// FASTALIGN_CPU_ISA=avx512|avx2|baseline forces a narrower path than the CPU allows (to test each
// one); asking for a wider one than the CPU has is an error.
enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa best_isa() {
#ifdef FASTALIGN_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBaseline;
}

inline Isa chosen_isa() {
  Isa isa = best_isa();
  const char* text = std::getenv("FASTALIGN_CPU_ISA");
  if (text != nullptr && *text != '\0') {
    const std::string name(text);
    TORCH_CHECK_VALUE(name == "avx512" || name == "avx2" || name == "baseline",
                      "FASTALIGN_CPU_ISA must be avx512, avx2 or baseline, got '", name, "'");
    const Isa wanted = name == "avx512" ? Isa::kAvx512
                       : name == "avx2" ? Isa::kAvx2
                                        : Isa::kBaseline;
    TORCH_CHECK_VALUE(static_cast<int>(wanted) <= static_cast<int>(isa), "FASTALIGN_CPU_ISA=",
                      name, " is not supported by this CPU");
    isa = wanted;
  }
  return isa;
}

// The baseline float32 vector: SSE2 is part of x86-64; other targets lower it as they can.
#ifdef FASTALIGN_VECTOR_TYPES
using BaselineF32 = f32x4;
#else
using BaselineF32 = float;
#endif

// The trampolines: one out-of-line function per instruction set and kernel, each compiling the
// kernel's (always-inline) body for its target. GCC never inlines them into run_rows, whose
// target is narrower.
template <typename Kernel, size_t K, typename... Args>
void rows_baseline(const Switches<K>& on, const Args&... args) {
  with_switches<Kernel, BaselineF32>(on, args...);
}

#ifdef FASTALIGN_X86_ISAS
template <typename Kernel, size_t K, typename... Args>
FASTALIGN_AVX2 void rows_avx2(const Switches<K>& on, const Args&... args) {
  with_switches<Kernel, f32x8>(on, args...);
}

template <typename Kernel, size_t K, typename... Args>
FASTALIGN_AVX512 void rows_avx512(const Switches<K>& on, const Args&... args) {
  with_switches<Kernel, f32x16>(on, args...);
}
#endif

// Runs Kernel::rows<V, switches...>(args...) for compute dtype T: float32 with the vector type of
// instruction set `isa`, float64 as V = double.
template <typename Kernel, typename T, size_t K, typename... Args>
void run_rows(Isa isa, const Switches<K>& on, const Args&... args) {
  if constexpr (std::is_same_v<T, float>) {
#ifdef FASTALIGN_X86_ISAS
    if (isa == Isa::kAvx512) return rows_avx512<Kernel>(on, args...);
    if (isa == Isa::kAvx2) return rows_avx2<Kernel>(on, args...);
#endif
    (void)isa;
    rows_baseline<Kernel>(on, args...);
  } else {
    (void)isa;
    with_switches<Kernel, T>(on, args...);
  }
}

}  // namespace cpu
}  // namespace fastalign
