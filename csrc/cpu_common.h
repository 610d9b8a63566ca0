// Pieces shared by fastalign's CPU kernels (linear_logprobs, linear_kl): argument checks, the
// float64 -> (hi, lo) split of row statistics, and the schedules and block sizes with which the
// kernels stream the vocabulary over threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_vec_math.h"

namespace fastalign {
namespace cpu {

// The float32 row kernels are instantiated once per instruction set; this is the baseline one's
// vector type (see cpu_vec_math.h).
#ifdef FASTALIGN_VECTOR_TYPES
using BaselineF32 = f32x4;  // SSE2 is part of x86-64; other targets lower it as they can
#else
using BaselineF32 = float;
#endif

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------

// Kernels compute in float32, or in float64 for float64 inputs.
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cpu_contiguous(const char* fn, const char* name, const at::Tensor& t,
                                 int64_t dim) {
  TORCH_CHECK_VALUE(t.defined(), fn, ": ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ",
                    t.device());
  TORCH_CHECK_VALUE(t.dim() == dim, fn, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

inline void check_row_stat(const char* fn, const char* name, const at::Tensor& t, int64_t n,
                           at::ScalarType dtype) {
  check_cpu_contiguous(fn, name, t, 1);
  TORCH_CHECK_VALUE(t.size(0) == n, fn, ": ", name, " must have shape [N] = [", n, "], got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, fn, ": ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
}

// x (float64) as hi + lo in `dtype`: hi = x rounded, lo = the rest (0 when dtype is float64).
// Backward forms differences such as z − lse that nearly cancel for a dominant token; (z − hi) − lo
// keeps the digits that one rounding of lse to float32 would lose.
inline std::pair<at::Tensor, at::Tensor> split_hi_lo(const at::Tensor& x,
                                                     at::ScalarType dtype) {
  at::Tensor hi = x.to(dtype);
  at::Tensor lo = (x - hi.to(at::kDouble)).to(dtype);
  return {hi.contiguous(), lo.contiguous()};
}

// ---------------------------------------------------------------------------------------------
// Schedules and block sizes
// ---------------------------------------------------------------------------------------------
//
// Two ways to spread the work over threads:
//
// * owned: vocabulary block b belongs to thread b mod S, which streams it end to end on a private
//   tile with single-threaded products (ATen runs them serially inside a parallel region) and
//   the fused pass. Nothing is shared until one merge at the end: the per-row (m, s, t) in
//   forward; in backward each thread keeps its own [N, H] dh accumulator, while dW and db rows
//   belong to the block's owner. There is no barrier per tile, which matters when the cores are
//   also busy with other work: every barrier then waits for the slowest thread's time slice. On a
//   2-core VM with one busy-looping process beside it, this schedule took 1.1-1.2x the time of
//   eager PyTorch (logits + log_softmax + autograd) and the shared one 2.1x. The assignment is
//   static, so results are bitwise reproducible for a given thread count.
// * shared: blocks in sequence, each product multithreaded by ATen/MKL, the fused pass split by
//   rows. Used when there are too few vocabulary blocks to share out, and in backward when the
//   private dh copies would exceed kPrivateBudgetBytes (many threads × large N·H).
//
// Block sizes were measured on a 2-core Sapphire Rapids VM (N=2048, H=1024, V=32000, float32,
// forward+backward, owned schedule; tiles [rows, cols] from [128, 512] to [2048, 512]): all lie
// within 15% of each other, matrix products take 97% of the time (MKL at ~150 GFLOP/s per core),
// and [512, 512] was among the fastest there and at H=64, V=131072 and H=4096 (differences close
// to the noise of a shared VM). Its 1 MiB tile stays in one core's L2 between the product that
// writes it and the fused pass that reads it, and each product still has K = H and 512 on both
// other sides. FASTALIGN_CPU_SCHEDULE (owned|shared), FASTALIGN_CPU_BLOCK_N and
// FASTALIGN_CPU_BLOCK_V override the choices (to tune on other machines). linear_kl uses the same
// sizes: its two tiles (2 MiB) measured within the noise of [256, 1024] and [512, 1024] at N=1024,
// H=1024, V=32000.

constexpr int64_t kOwnedBlockN = 512;
constexpr int64_t kOwnedBlockV = 512;
constexpr int64_t kSharedBlockN = 512;
constexpr int64_t kSharedBlockV = 1024;
// Owned: at least this many blocks per thread for balance, shrinking blocks down to kMinBlockV.
constexpr int64_t kBlocksPerThread = 4;
constexpr int64_t kMinBlockV = 128;
// With few tokens the vocabulary block widens to keep block_n·block_v logits per tile, as long as
// the (float32 copy of the) weight block stays under this many elements (16 MiB).
constexpr int64_t kMaxWeightBlockElems = int64_t{1} << 22;
// Owned backward: the extra dh accumulators (one per thread beyond the first) may take this much.
constexpr int64_t kPrivateBudgetBytes = int64_t{256} << 20;
// Shared schedule: elementwise work per parallel task, in logits.
constexpr int64_t kGrainElems = 16384;

enum class Schedule { kOwned, kShared };

struct Plan {
  Schedule schedule;
  int64_t rows;    // tokens per tile
  int64_t cols;    // vocabulary entries per block (and tile)
  int64_t blocks;  // vocabulary blocks
  int64_t slots;   // threads that own blocks (1 for the shared schedule)
};

inline int64_t env_positive(const char* name, int64_t fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') {
    return fallback;
  }
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && value > 0, name, " must be a positive integer, got '", text,
                    "'");
  return static_cast<int64_t>(value);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// hidden: weight elements per vocabulary entry that a block holds (H; H + H_ref in linear_kl,
// which streams two heads). private_bytes: memory one more owning thread needs (its dh
// accumulators; 0 in forward).
inline Plan make_plan(int64_t n, int64_t vocab, int64_t hidden, int64_t private_bytes) {
  const int64_t threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  bool owned = threads == 1 ||
               (threads - 1) * private_bytes <= kPrivateBudgetBytes;
  bool forced = false;
  if (const char* text = std::getenv("FASTALIGN_CPU_SCHEDULE"); text != nullptr && *text != '\0') {
    const std::string name(text);
    TORCH_CHECK_VALUE(name == "owned" || name == "shared",
                      "FASTALIGN_CPU_SCHEDULE must be owned or shared, got '", name, "'");
    owned = name == "owned";
    forced = true;
  }
  const int64_t block_n =
      env_positive("FASTALIGN_CPU_BLOCK_N", owned ? kOwnedBlockN : kSharedBlockN);
  const int64_t block_v =
      env_positive("FASTALIGN_CPU_BLOCK_V", owned ? kOwnedBlockV : kSharedBlockV);
  const int64_t rows = std::max<int64_t>(1, std::min(n, block_n));
  int64_t cols = block_v;
  if (rows < block_n) {
    const int64_t wide = block_n * block_v / rows;
    const int64_t cap = std::max(block_v, kMaxWeightBlockElems / std::max<int64_t>(hidden, 1));
    cols = std::max(block_v, std::min(wide, cap));
  }
  cols = std::max<int64_t>(1, std::min(cols, vocab));
  if (owned && threads > 1 && ceil_div(vocab, cols) < kBlocksPerThread * threads) {
    cols = std::max(std::min(cols, kMinBlockV), ceil_div(vocab, kBlocksPerThread * threads));
  }
  const int64_t blocks = ceil_div(vocab, cols);
  if (owned && !forced && blocks < threads) {
    owned = false;  // too few blocks to give every thread one
  }
  const int64_t slots = owned ? std::min(threads, blocks) : 1;
  return {owned ? Schedule::kOwned : Schedule::kShared, rows, cols, blocks, slots};
}

}  // namespace cpu
}  // namespace fastalign
