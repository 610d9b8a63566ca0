// The sequence-loss engine's two row passes on CPU (fastalign/ops/sequence_loss.py builds the
// tiles and does the matrix products). A tile holds whole vocabulary rows, so each row's
// statistics come from one block of logprob_rows.h's passes, with no online merging:
//
//   stats: per row, z into a per-thread scratch row (the tile keeps the raw a that the gradient
//          pass reads), its max m and s = Σ e^{z−m}, t = Σ e^{z−m}(z − m), q = Σ e^{2(z−m)};
//          then, in float64, lse = m + log s, Σ p z = m + t/s, H = log s − t/s, log Σ p² =
//          log q − 2 log s (relative to m, so nothing cancels but what must).
//   grad:  logprob_rows.h's BackwardKernel with 1/T folded into the upstream gradients (the
//          gradient is linear in them), in place.
//
// lse and Σ p z come in the tile's dtype, or with float64_stats in float64, which the gradient
// pass splits into hi + lo parts: with lse rounded to float32, every p_v = e^{z_v − lse} is off by
// the same factor, up to |lse|·6e-8, so a row's p no longer sum to 1 and the gradient of a target
// the model is sure of (1 − p_y small) takes that error whole.

#include "sequence_rows_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
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

// Rows per task of at::parallel_for: enough columns that a task outweighs its scheduling.
int64_t row_grain(int64_t vocab) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
}

template <typename T>
struct RowStats {  // outputs, per row
  T* logp;
  T* entropy;
  T* log_sum_sq;
  // lse and Σ p z: in the tile's dtype, or (float64_stats) in float64; the other pair is null
  T* lse;
  T* sum_pz;
  double* lse_f64;
  double* sum_pz_f64;
  T* z;  // [cols] scratch: the current row's z
};

struct StatsKernel {
  template <typename V, bool HAS_BIAS, bool HAS_SOFTCAP>
  static FASTALIGN_INLINE void rows(const Tile<ScalarOf<V>>& tile, const RowStats<ScalarOf<V>>& out,
                                    int64_t r0, int64_t r1) {
    using T = ScalarOf<V>;
    for (int64_t r = r0; r < r1; ++r) {
      const BlockSums<T> sums =
          row_sums<V, HAS_BIAS, HAS_SOFTCAP, true>(tile, tile.data + r * tile.cols, out.z);
      const double max = sums.max, sum_exp = sums.sum_exp;
      const double log_sum_exp = std::log(sum_exp);
      const double mean_dz = sums.sum_exp_dz / sum_exp;  // Σ p (z − m)
      const double z_target = out.z[tile.targets[r]];
      if (out.lse != nullptr) {
        out.lse[r] = static_cast<T>(max + log_sum_exp);
        out.sum_pz[r] = static_cast<T>(max + mean_dz);
      } else {
        out.lse_f64[r] = max + log_sum_exp;
        out.sum_pz_f64[r] = max + mean_dz;
      }
      // z_y − lse ≤ 0 exactly; rounding in the sums must not make a probability exceed 1.
      out.logp[r] = static_cast<T>(std::min((z_target - max) - log_sum_exp, 0.0));
      out.entropy[r] = static_cast<T>(log_sum_exp - mean_dz);
      out.log_sum_sq[r] = static_cast<T>(std::log(static_cast<double>(sums.sum_exp_sq)) -
                                         2 * log_sum_exp);
    }
  }
};

// tile [N, V] float32/float64, bias [V] or absent, targets [N] int64 in [0, V), and the options.
void check_tile_inputs(const char* fn, const at::Tensor& tile,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
                       double temperature, double softcap) {
  check_cpu_contiguous(fn, "tile [N, V]", tile, 2);
  const at::ScalarType dtype = tile.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, fn,
                   ": tile must be float32 or float64, got ", dtype);
  const int64_t vocab = tile.size(1);
  if (has_tensor(bias)) {
    check_bias(fn, *bias, "tile", dtype, vocab);
  }
  check_targets(fn, targets, tile.size(0), vocab, c10::nullopt);
  check_logit_options(fn, temperature, softcap);
}

// lse or Σ p z [N] as hi + lo in the tile's dtype: from float64 (float64_stats) split, so that the
// gradient pass keeps 1 − p of a dominant token (see BackwardRows); from the tile's dtype, lo = 0.
std::pair<at::Tensor, at::Tensor> stat_parts(const char* fn, const char* name,
                                             const at::Tensor& stat, int64_t n,
                                             at::ScalarType dtype) {
  check_row_stat(fn, name, stat, n, stat.scalar_type());
  TORCH_CHECK_TYPE(stat.scalar_type() == dtype || stat.scalar_type() == at::kDouble, fn, ": ",
                   name, " must be ", dtype, " (tile's dtype) or float64, got ",
                   stat.scalar_type());
  if (stat.scalar_type() == dtype) return {stat, at::zeros({n}, stat.options())};
  return split_hi_lo(stat, dtype);
}

template <typename T>
Tile<T> whole_rows(const at::Tensor& tile, const c10::optional<at::Tensor>& bias,
                   const at::Tensor& targets, double temperature, double softcap) {
  return {tile.data_ptr<T>(),
          has_tensor(bias) ? bias->data_ptr<T>() : nullptr,
          targets.data_ptr<int64_t>(),
          tile.size(1),
          0,
          static_cast<T>(1.0 / temperature),
          static_cast<T>(softcap > 0 ? 1.0 / softcap : 0.0),
          static_cast<T>(softcap / temperature)};
}

}  // namespace

std::vector<at::Tensor> sequence_rows_stats(const at::Tensor& tile,
                                            const c10::optional<at::Tensor>& bias,
                                            const at::Tensor& targets, double temperature,
                                            double softcap, bool float64_stats) {
  constexpr const char* fn = "sequence_rows_stats";
  check_tile_inputs(fn, tile, bias, targets, temperature, softcap);
  at::NoGradGuard no_grad;
  const int64_t n = tile.size(0), vocab = tile.size(1);
  const auto opts = tile.options();
  const auto stat_opts = float64_stats ? opts.dtype(at::kDouble) : opts;
  at::Tensor logp = at::empty({n}, opts), entropy = at::empty({n}, opts);
  at::Tensor lse = at::empty({n}, stat_opts), sum_pz = at::empty({n}, stat_opts);
  at::Tensor log_sum_sq = at::empty({n}, opts);
  if (n == 0) return {logp, entropy, lse, sum_pz, log_sum_sq};
  const bool split_stats = float64_stats && tile.scalar_type() != at::kDouble;

  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), fn, [&] {
    using T = scalar_t;
    const Tile<T> rows = whole_rows<T>(tile, bias, targets, temperature, softcap);
    const Switches<2> on{rows.bias != nullptr, softcap > 0};
    const Isa isa = chosen_isa();
    at::parallel_for(0, n, row_grain(vocab), [&](int64_t r0, int64_t r1) {
      std::vector<T> z(static_cast<size_t>(vocab));
      const RowStats<T> out{logp.data_ptr<T>(),
                            entropy.data_ptr<T>(),
                            log_sum_sq.data_ptr<T>(),
                            split_stats ? nullptr : lse.data_ptr<T>(),
                            split_stats ? nullptr : sum_pz.data_ptr<T>(),
                            split_stats ? lse.data_ptr<double>() : nullptr,
                            split_stats ? sum_pz.data_ptr<double>() : nullptr,
                            z.data()};
      run_rows<StatsKernel, T>(isa, on, rows, out, r0, r1);
    });
  });
  return {logp, entropy, lse, sum_pz, log_sum_sq};
}

void sequence_rows_grad(const at::Tensor& tile, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& targets, const at::Tensor& lse,
                        const at::Tensor& sum_pz, const at::Tensor& grad_logp,
                        const c10::optional<at::Tensor>& grad_entropy, double temperature,
                        double softcap) {
  constexpr const char* fn = "sequence_rows_grad";
  check_tile_inputs(fn, tile, bias, targets, temperature, softcap);
  const int64_t n = tile.size(0), vocab = tile.size(1);
  const at::ScalarType dtype = tile.scalar_type();
  check_row_stat(fn, "grad_logp", grad_logp, n, dtype);
  const bool has_grad_entropy = has_tensor(grad_entropy);
  if (has_grad_entropy) {
    check_row_stat(fn, "grad_entropy", *grad_entropy, n, dtype);
  }
  const auto lse_parts = stat_parts(fn, "lse", lse, n, dtype);
  const auto sum_pz_parts = stat_parts(fn, "sum_pz", sum_pz, n, dtype);
  // Autograd must see the write (and refuse it for an inference tensor outside inference mode).
  tile.unsafeGetTensorImpl()->bump_version();
  at::NoGradGuard no_grad;
  if (n == 0) return;

  // dL/da is linear in (grad_logp, grad_entropy): scaling them by 1/T supplies the 1/T that
  // BackwardKernel leaves out.
  const at::Tensor g = grad_logp.mul(1.0 / temperature);
  const at::Tensor e = has_grad_entropy ? grad_entropy->mul(1.0 / temperature) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, fn, [&] {
    using T = scalar_t;
    const Tile<T> rows = whole_rows<T>(tile, bias, targets, temperature, softcap);
    const BackwardRows<T> in{g.data_ptr<T>(),          e.defined() ? e.data_ptr<T>() : nullptr,
                             lse_parts.first.data_ptr<T>(),    lse_parts.second.data_ptr<T>(),
                             sum_pz_parts.first.data_ptr<T>(), sum_pz_parts.second.data_ptr<T>()};
    const Switches<2> on{rows.bias != nullptr, softcap > 0};
    const Isa isa = chosen_isa();
    at::parallel_for(0, n, row_grain(vocab), [&](int64_t r0, int64_t r1) {
      run_rows<BackwardKernel, T>(isa, on, rows, in, r0, r1);
    });
  });
}

}  // namespace fastalign
