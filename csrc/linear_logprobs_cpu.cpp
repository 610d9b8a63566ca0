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
#include "logprob_rows.h"
#include "streaming.h"

namespace fastalign {
namespace {

using namespace cpu;  // NOLINT(build/namespaces): the headers above

// ---------------------------------------------------------------------------------------------
// Row kernels: Tile, ForwardKernel and BackwardKernel are logprob_rows.h's (one tile, a range of
// its rows); here, the online state of a row range as the stream hands it out
// ---------------------------------------------------------------------------------------------

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
