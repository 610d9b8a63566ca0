// The streaming scaffolding shared by the ops that reduce over a vocabulary through LM heads
// (linear_logprobs: one head; linear_kl: two): which rows take part, the float64 → (hi, lo) split
// of row statistics, the schedules and block sizes with which the vocabulary is spread over
// threads, the problem and per-thread scratch, and the block loops of forward and backward. An
// op supplies only its row math (see stream_forward and stream_backward for what it provides).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include "dispatch.h"

namespace fastalign {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// Rows that take part
// ---------------------------------------------------------------------------------------------
//
// An op drops the rows that cannot contribute before streaming (prompt tokens are often half the
// batch), so that they cost nothing and get exact zeros.

struct RowSelection {
  int64_t count = 0;
  bool compact = false;  // true when some rows were dropped
  at::Tensor index;      // [count] int64: original row of each kept row (compact only)
};

// The rows i of [0, n) for which keep(i) holds (called twice per row: keep it cheap and pure).
template <typename Keep>
RowSelection select_rows(int64_t n, const at::TensorOptions& options, const Keep& keep) {
  RowSelection sel;
  for (int64_t i = 0; i < n; ++i) {
    sel.count += keep(i) ? 1 : 0;
  }
  sel.compact = sel.count < n;
  if (sel.compact) {
    sel.index = at::empty({sel.count}, options.dtype(at::kLong));
    int64_t* index = sel.index.data_ptr<int64_t>();
    for (int64_t i = 0, j = 0; i < n; ++i) {
      if (keep(i)) index[j++] = i;
    }
  }
  return sel;
}

// The kept rows of a per-row tensor (hidden, an upstream gradient, ...) in `dtype`; no copy when
// every row is kept and the dtype already matches.
inline at::Tensor kept_rows(const at::Tensor& t, const RowSelection& sel, at::ScalarType dtype) {
  const at::Tensor rows = sel.compact ? t.index_select(0, sel.index) : t;
  // detach: worker threads run with autograd on (grad mode is thread-local), and out= products
  // refuse inputs that require grad.
  return rows.detach().to(dtype).contiguous();
}

// The full [N, H] gradient of a hidden input from the [count, H] one of the kept rows, in the
// input's dtype (zeros in the dropped rows).
inline at::Tensor scatter_rows(const at::Tensor& dh, const at::Tensor& like,
                               const RowSelection& sel) {
  if (!sel.compact) return dh.to(like.scalar_type());
  at::Tensor out = at::zeros_like(like);
  out.index_copy_(0, sel.index, dh.to(like.scalar_type()));
  return out;
}

// A gradient when nothing flows into it: zeros shaped like its input if asked for, else none.
inline at::Tensor zeros_if(bool wanted, const c10::optional<at::Tensor>& like) {
  return wanted ? at::zeros_like(*like) : at::Tensor();
}

// ---------------------------------------------------------------------------------------------
// Row statistics
// ---------------------------------------------------------------------------------------------

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
//   the fused pass. Nothing is shared until one merge at the end: the per-row statistics in
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
// Merges of per-row statistics: rows per parallel task.
constexpr int64_t kRowGrain = 4096;

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

// ---------------------------------------------------------------------------------------------
// Problem and scratch
// ---------------------------------------------------------------------------------------------

// One LM head: the rows of hidden taking part and the weight they meet.
struct Head {
  at::Tensor h;       // [n, H] kept rows of hidden, in the compute dtype
  at::Tensor weight;  // [V, H] in the input dtype
  at::Tensor bias;    // [V] in the compute dtype, or undefined
  int64_t hidden = 0;
  bool convert_weight = false;  // bf16/fp16 weight: each block is converted before use
};

// h must already be in the compute dtype. zero_bias: without a bias of its own the head gets a
// bias of zeros (linear_kl gives both heads a bias when either has one).
inline Head make_head(const at::Tensor& h, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, bool zero_bias = false) {
  Head head;
  head.h = h;
  head.weight = weight.detach();
  const auto dtype = h.scalar_type();
  if (bias.has_value() && bias->defined()) {
    head.bias = bias->detach().to(dtype).contiguous();
  } else if (zero_bias) {
    head.bias = at::zeros({weight.size(0)}, h.options());
  }
  head.hidden = h.size(1);
  head.convert_weight = weight.scalar_type() != dtype;
  return head;
}

// kHeads heads over the same n rows and vocabulary, and the logit transform they share:
// z = cap_over_t · tanh(a · inv_cap) with a softcap, else z = a · inv_t.
template <typename T, int kHeads>
struct Problem {
  Head head[kHeads];
  int64_t n, vocab;
  T inv_t, inv_cap, cap_over_t;
  double alpha;  // 1/T as the alpha of the gradient products
  bool has_softcap;
  Isa isa;

  Problem(const Head (&heads)[kHeads], double temperature, double softcap)
      : n(heads[0].h.size(0)),
        vocab(heads[0].weight.size(0)),
        inv_t(static_cast<T>(1.0 / temperature)),
        inv_cap(static_cast<T>(softcap > 0 ? 1.0 / softcap : 0.0)),
        cap_over_t(static_cast<T>(softcap / temperature)),
        alpha(1.0 / temperature),
        has_softcap(softcap > 0),
        isa(chosen_isa()) {
    std::copy(heads, heads + kHeads, head);
  }

  // The bias of head `side` from vocabulary entry v0 on, or nullptr.
  const T* bias(int side, int64_t v0) const {
    return head[side].bias.defined() ? head[side].bias.template data_ptr<T>() + v0 : nullptr;
  }

  // Weight elements per vocabulary entry of a block (all heads), for make_plan.
  int64_t block_width() const {
    int64_t width = 0;
    for (int side = 0; side < kHeads; ++side) width += head[side].hidden;
    return width;
  }
};

// The buffers one thread streams through: never larger than one block.
template <typename T, int kHeads>
struct Scratch {
  at::Tensor tile[kHeads];     // [rows · cols] logits, then gradients
  at::Tensor weight[kHeads];   // [cols, H] the weight block in T (bf16/fp16 weights only)
  at::Tensor dweight[kHeads];  // [cols, H] the dW block in T, cast into the output when complete

  Scratch(const Problem<T, kHeads>& p, const Plan& plan, const bool (&need_dweight)[kHeads]) {
    const auto opts = p.head[0].h.options();
    for (int side = 0; side < kHeads; ++side) {
      tile[side] = at::empty({plan.rows * plan.cols}, opts);
      if (p.head[side].convert_weight) {
        weight[side] = at::empty({plan.cols, p.head[side].hidden}, opts);
        if (need_dweight[side]) dweight[side] = at::empty({plan.cols, p.head[side].hidden}, opts);
      }
    }
  }

  at::Tensor weight_block(const Problem<T, kHeads>& p, int side, int64_t v0, int64_t cols) {
    const Head& head = p.head[side];
    const at::Tensor block = head.weight.narrow(0, v0, cols);
    return head.convert_weight ? weight[side].narrow(0, 0, cols).copy_(block) : block;
  }

  // h[n0 : n0 + rows] @ w_blkᵀ of one head into its tile buffer.
  at::Tensor logits(const Problem<T, kHeads>& p, int side, const at::Tensor& w_blk, int64_t n0,
                    int64_t rows) {
    at::Tensor out = tile[side].narrow(0, 0, rows * w_blk.size(0)).view({rows, w_blk.size(0)});
    return at::mm_out(out, p.head[side].h.narrow(0, n0, rows), w_blk.t());
  }
};

// What an op's fused pass sees: one tile of rows × cols logits per head.
template <typename T, int kHeads>
struct TileSet {
  T* logits[kHeads];  // [rows, cols] each: raw logits h·W_v on entry, the op's to overwrite
  int64_t n0;         // row of the problem at the tile's row 0
  int64_t v0;         // vocabulary id of column 0
  int64_t cols;
};

// Vocabulary block `block` tile by tile: the logits of every head, then pass(tiles, r0, r1) over
// the tile's rows (spread over threads with split_rows, the shared schedule), then
// after(n0, rows, tiles, w_blk) with the tiles as the pass left them and the weight blocks.
template <typename T, int kHeads, typename Pass, typename After>
void stream_block(const Problem<T, kHeads>& p, const Plan& plan, Scratch<T, kHeads>& scratch,
                  int64_t block, bool split_rows, const Pass& pass, const After& after) {
  const int64_t v0 = block * plan.cols, cols = std::min(plan.cols, p.vocab - v0);
  at::Tensor w_blk[kHeads];
  for (int side = 0; side < kHeads; ++side) {
    w_blk[side] = scratch.weight_block(p, side, v0, cols);
  }
  for (int64_t n0 = 0; n0 < p.n; n0 += plan.rows) {
    const int64_t rows = std::min(plan.rows, p.n - n0);
    at::Tensor tile[kHeads];
    TileSet<T, kHeads> tiles{{}, n0, v0, cols};
    for (int side = 0; side < kHeads; ++side) {
      tile[side] = scratch.logits(p, side, w_blk[side], n0, rows);
      tiles.logits[side] = tile[side].template data_ptr<T>();
    }
    if (split_rows) {
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / (kHeads * cols)),
                       [&](int64_t r0, int64_t r1) { pass(tiles, r0, r1); });
    } else {
      pass(tiles, 0, rows);
    }
    after(n0, rows, tile, w_blk);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
//
// stream_forward runs every vocabulary block through the op's fused pass, which folds a tile into
// per-row statistics. The op provides
//   using State = ...;                    a view of the statistics of the n rows (cheap to copy)
//   State state(int64_t slot);            slot 0: the output; slots ≥ 1 once add_slots has run
//   void add_slots(int64_t slots);        empty private states for slots 1 .. slots − 1
//   void merge(int64_t slot, int64_t i);  row i of slot `slot` into row i of slot 0
//   void rows(const TileSet<T, kHeads>&, const State&, int64_t r0, int64_t r1) const;
//                                         tile rows [r0, r1) into the state (indexed by problem
//                                         row: tile row r is state row n0 + r)

template <typename T, int kHeads, typename Op>
void stream_forward(const Problem<T, kHeads>& p, Op& op) {
  const Plan plan = make_plan(p.n, p.vocab, p.block_width(), 0);
  const bool no_dweight[kHeads] = {};
  auto block_into = [&](Scratch<T, kHeads>& scratch, int64_t block,
                        const typename Op::State& state, bool split_rows) {
    stream_block(
        p, plan, scratch, block, split_rows,
        [&](const TileSet<T, kHeads>& tiles, int64_t r0, int64_t r1) {
          op.rows(tiles, state, r0, r1);
        },
        [](int64_t, int64_t, const at::Tensor(&)[kHeads], const at::Tensor(&)[kHeads]) {});
  };
  if (plan.schedule == Schedule::kShared) {
    Scratch<T, kHeads> scratch(p, plan, no_dweight);
    for (int64_t block = 0; block < plan.blocks; ++block) {
      block_into(scratch, block, op.state(0), /*split_rows=*/true);
    }
    return;
  }
  // Slot 0 streams into the output state, the others into private states merged at the end in
  // slot order.
  op.add_slots(plan.slots);
  at::parallel_for(0, plan.slots, 1, [&](int64_t s0, int64_t s1) {
    at::NoGradGuard no_grad;
    for (int64_t slot = s0; slot < s1; ++slot) {
      Scratch<T, kHeads> scratch(p, plan, no_dweight);
      const typename Op::State state = op.state(slot);
      for (int64_t block = slot; block < plan.blocks; block += plan.slots) {
        block_into(scratch, block, state, /*split_rows=*/false);
      }
    }
  });
  if (plan.slots > 1) {
    at::parallel_for(0, p.n, kRowGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t slot = 1; slot < plan.slots; ++slot) {
        for (int64_t i = i0; i < i1; ++i) {
          op.merge(slot, i);
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <int kHeads>
struct Gradients {
  bool needed[kHeads] = {};   // the head needs any gradient: its tiles become dL/da
  at::Tensor dh[kHeads];      // [n, H] accumulator in T, or undefined
  at::Tensor dweight[kHeads]; // [V, H] output in weight's dtype, or undefined
  at::Tensor db[kHeads];      // [V] accumulator in T (zeros), or undefined
};

// Recomputes block `block` tile by tile, turns the tiles of the heads that need gradients into
// T·dL/da with pass(tiles, r0, r1) and adds their share to every gradient. dh holds this thread's
// accumulators; dh_fresh says they hold nothing yet (beta = 0 ignores their uninitialised memory,
// NaN included, as documented for addmm).
template <typename T, int kHeads, typename Pass>
void backward_block(const Problem<T, kHeads>& p, const Plan& plan, Scratch<T, kHeads>& scratch,
                    int64_t block, const Pass& pass, const at::Tensor (&dh)[kHeads],
                    bool dh_fresh, const Gradients<kHeads>& grads, bool split_rows) {
  const int64_t v0 = block * plan.cols, cols = std::min(plan.cols, p.vocab - v0);
  at::Tensor dw_blk[kHeads];
  for (int side = 0; side < kHeads; ++side) {
    if (grads.dweight[side].defined()) {
      dw_blk[side] = p.head[side].convert_weight ? scratch.dweight[side].narrow(0, 0, cols)
                                                 : grads.dweight[side].narrow(0, v0, cols);
    }
  }
  stream_block(p, plan, scratch, block, split_rows, pass,
               [&](int64_t n0, int64_t rows, const at::Tensor (&tile)[kHeads],
                   const at::Tensor (&w_blk)[kHeads]) {
                 // A tile holds T·dL/da; the 1/T rides on alpha.
                 for (int side = 0; side < kHeads; ++side) {
                   if (!grads.needed[side]) continue;
                   if (dh[side].defined()) {
                     dh[side].narrow(0, n0, rows).addmm_(tile[side], w_blk[side],
                                                         dh_fresh ? 0.0 : 1.0, p.alpha);
                   }
                   if (dw_blk[side].defined()) {
                     dw_blk[side].addmm_(tile[side].t(), p.head[side].h.narrow(0, n0, rows),
                                         n0 == 0 ? 0.0 : 1.0, p.alpha);
                   }
                   if (grads.db[side].defined()) {
                     grads.db[side].narrow(0, v0, cols).add_(tile[side].sum(0), p.alpha);
                   }
                 }
               });
  for (int side = 0; side < kHeads; ++side) {
    if (dw_blk[side].defined() && p.head[side].convert_weight) {
      grads.dweight[side].narrow(0, v0, cols).copy_(dw_blk[side]);
    }
  }
}

// Every vocabulary block through pass(tiles, r0, r1), the op's fused pass that turns the tiles
// (of the heads that need gradients) into T·dL/da in place, and into the gradients.
template <typename T, int kHeads, typename Pass>
void stream_backward(const Problem<T, kHeads>& p, const Gradients<kHeads>& grads,
                     const Pass& pass) {
  int64_t private_bytes = 0;
  bool need_dweight[kHeads];
  for (int side = 0; side < kHeads; ++side) {
    if (grads.dh[side].defined()) {
      private_bytes += p.n * p.head[side].hidden * static_cast<int64_t>(sizeof(T));
    }
    need_dweight[side] = grads.dweight[side].defined();
  }
  const Plan plan = make_plan(p.n, p.vocab, p.block_width(), private_bytes);
  if (plan.schedule == Schedule::kShared) {
    Scratch<T, kHeads> scratch(p, plan, need_dweight);
    for (int64_t block = 0; block < plan.blocks; ++block) {
      backward_block(p, plan, scratch, block, pass, grads.dh, block == 0, grads,
                     /*split_rows=*/true);
    }
    return;
  }
  // Slot s owns blocks s, s + S, ...; slot 0 (which always owns block 0) accumulates dh into the
  // output accumulators, the others into private copies added to them in slot order.
  struct SlotDh {
    at::Tensor dh[kHeads];
  };
  std::vector<SlotDh> slot_dh(static_cast<size_t>(plan.slots));
  for (int side = 0; side < kHeads; ++side) {
    slot_dh[0].dh[side] = grads.dh[side];
  }
  at::parallel_for(0, plan.slots, 1, [&](int64_t s0, int64_t s1) {
    at::NoGradGuard no_grad;
    for (int64_t slot = s0; slot < s1; ++slot) {
      Scratch<T, kHeads> scratch(p, plan, need_dweight);
      for (int side = 0; side < kHeads; ++side) {
        if (slot > 0 && grads.dh[side].defined()) {
          slot_dh[slot].dh[side] = at::empty({p.n, p.head[side].hidden}, p.head[side].h.options());
        }
      }
      for (int64_t block = slot; block < plan.blocks; block += plan.slots) {
        backward_block(p, plan, scratch, block, pass, slot_dh[slot].dh, block == slot, grads,
                       /*split_rows=*/false);
      }
    }
  });
  for (int side = 0; side < kHeads; ++side) {
    if (!grads.dh[side].defined()) continue;
    for (int64_t slot = 1; slot < plan.slots; ++slot) {
      grads.dh[side].add_(slot_dh[slot].dh[side]);
    }
  }
}

}  // namespace cpu
}  // namespace fastalign
