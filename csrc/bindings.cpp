// The one Python module of fastalign's C++ kernels: fastalign._C.
#include <torch/extension.h>

#include "gae_cpu.h"
#include "linear_kl_cpu.h"
#include "linear_logprobs_cpu.h"
#include "sequence_rows_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "fastalign C++ kernels (CPU). Called through fastalign.linear_logprobs, fastalign.linear_nll, "
      "fastalign.linear_kl and fastalign.gae (impl='cpp'), and by the sequence-loss "
      "engine (sequence_rows_*).";

  m.def("linear_logprobs_forward", &fastalign::linear_logprobs_forward,
        R"doc(Per-token log-probabilities and entropies from (hidden, LM head), streamed over
vocabulary blocks without materialising the [N, V] logits.

Args:
    hidden: [N, H] contiguous CPU tensor, float32 / bfloat16 / float16 / float64.
    weight: [V, H] contiguous, hidden's dtype.
    bias: [V] contiguous, hidden's dtype, or None.
    targets: [N] int64; entries equal to ignore_index are ignored, the others lie in [0, V).
    temperature: > 0; the logits are divided by it (after the softcap).
    softcap: 0 for none, else z = softcap * tanh(a / softcap) / temperature.
    ignore_index: target value of ignored rows (logp = entropy = 0, no gradient).
    off_shard_targets: weight holds one shard of a vocabulary split across ranks; a target >= V
        lies on another shard (the row is computed, with no target logit: logp = -lse).

Returns:
    [logp, entropy, lse, sum_pz], each [N]: logp and entropy float32 (float64 for float64
    inputs); lse and sum_pz (log-sum-exp of z and sum_v p_v z_v, what backward needs) float64
    always, since backward subtracts them from logits of nearly the same size.)doc",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"),
        py::arg("temperature"), py::arg("softcap"), py::arg("ignore_index"),
        py::arg("off_shard_targets") = false);

  m.def("linear_logprobs_backward", &fastalign::linear_logprobs_backward,
        R"doc(Gradients of linear_logprobs_forward, recomputing the logits tile by tile.

Args:
    grad_logp: [N] upstream gradient of logp, in the forward's logp dtype.
    grad_entropy: [N] upstream gradient of the entropy, or None (zero).
    hidden, weight, bias, targets, temperature, softcap, ignore_index: as in forward.
    lse, sum_pz: [N] float64, as returned by forward.
    compute_dhidden, compute_dweight, compute_dbias: which gradients to compute.
    off_shard_targets: as in forward (pass the whole vocabulary's lse and sum_pz for exact
        gradients of this shard's columns).

Returns:
    [dhidden, dweight, dbias], each in the dtype of its input, or None where not asked for.)doc",
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("hidden"), py::arg("weight"),
        py::arg("bias"), py::arg("targets"), py::arg("lse"), py::arg("sum_pz"),
        py::arg("temperature"), py::arg("softcap"), py::arg("ignore_index"),
        py::arg("compute_dhidden"), py::arg("compute_dweight"), py::arg("compute_dbias"),
        py::arg("off_shard_targets") = false);

  m.def("linear_kl_forward", &fastalign::linear_kl_forward,
        R"doc(Exact per-token KL(p || q) between the softmax of two LM heads, streamed over
vocabulary blocks without materialising either [N, V] logit tensor.

p = softmax(z) with z from (hidden, weight, bias), q = softmax(r) with r from (ref_hidden,
ref_weight, ref_bias); each head's logits are a = h @ W.T + b, then softcap * tanh(a / softcap)
when softcap > 0, then divided by temperature. For KL(q || p), swap the two heads.

Args:
    hidden: [N, H] contiguous CPU tensor, float32 / bfloat16 / float16 / float64.
    weight: [V, H] contiguous, hidden's dtype.
    bias: [V] contiguous, hidden's dtype, or None.
    ref_hidden: [N, H_ref] contiguous, hidden's dtype (H_ref may differ from H).
    ref_weight: [V, H_ref] contiguous, hidden's dtype (the same V as weight).
    ref_bias: [V] contiguous, hidden's dtype, or None.
    temperature: > 0; both heads' logits are divided by it (after the softcap).
    softcap: 0 for none, else a -> softcap * tanh(a / softcap) on both heads.
    targets: optional [N] int64 targets of the first head (each in [0, V) or ignore_index).
    ignore_index: the target value of rows whose logp and entropy are 0.

Returns:
    [kl, lse, ref_lse], each [N] float64: KL(p || q) >= 0 per row, and the log-sum-exp of z and
    of r (what backward needs besides kl); with targets also [logp, entropy, sum_pz] of the first
    head from the same pass (float32, float32 and float64; float64 throughout for float64).)doc",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("ref_hidden"),
        py::arg("ref_weight"), py::arg("ref_bias"), py::arg("temperature"), py::arg("softcap"),
        py::arg("targets") = py::none(), py::arg("ignore_index") = -100);

  m.def("linear_kl_backward", &fastalign::linear_kl_backward,
        R"doc(Gradients of linear_kl_forward, recomputing both heads' logits tile by tile.

dL/dz_v = g * p_v * (log p_v - log q_v - KL) and dL/dr_v = g * (q_v - p_v), then through the
temperature and softcap to each head's hidden, weight and bias. Rows whose grad_kl is 0 are
skipped; a head none of whose gradients is asked for costs only the recomputation of its logits.

Args:
    grad_kl: [N] upstream gradient of kl, float32 (float64 for float64 inputs).
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, softcap: as in forward.
    kl, lse, ref_lse: [N] float64, as returned by forward.
    compute_dhidden, compute_dweight, compute_dbias: which policy-head gradients to compute.
    compute_dref_hidden, compute_dref_weight, compute_dref_bias: which reference-head gradients.
    grad_logp, grad_entropy, targets, sum_pz, ignore_index: with targets (as in forward), the
        upstream gradients of logp and (optional) entropy and forward's sum_pz; the policy's
        gradients are then those of all three outputs.

Returns:
    [dhidden, dweight, dbias, dref_hidden, dref_weight, dref_bias], each in the dtype of its
    input, or None where not asked for.)doc",
        py::arg("grad_kl"), py::arg("hidden"), py::arg("weight"), py::arg("bias"),
        py::arg("ref_hidden"), py::arg("ref_weight"), py::arg("ref_bias"), py::arg("kl"),
        py::arg("lse"), py::arg("ref_lse"), py::arg("temperature"), py::arg("softcap"),
        py::arg("compute_dhidden"), py::arg("compute_dweight"), py::arg("compute_dbias"),
        py::arg("compute_dref_hidden"), py::arg("compute_dref_weight"),
        py::arg("compute_dref_bias"), py::arg("grad_logp") = py::none(),
        py::arg("grad_entropy") = py::none(), py::arg("targets") = py::none(),
        py::arg("sum_pz") = py::none(), py::arg("ignore_index") = -100);

  m.def("sequence_rows_stats", &fastalign::sequence_rows_stats,
        R"doc(Per-row log-softmax statistics of a tile of LM-head logits holding whole vocabulary
rows (the sequence-loss engine's first row pass). The tile is left unchanged.

z = softcap * tanh((a + bias) / softcap) / temperature, or (a + bias) / temperature without a
softcap.

Args:
    tile: [N, V] contiguous CPU tensor of raw logits a, float32 or float64.
    bias: [V] contiguous, tile's dtype, or None.
    targets: [N] int64, each in [0, V).
    temperature: > 0.
    softcap: 0 for none.
    float64_stats: return lse and sum_pz in float64 (the others stay in tile's dtype): with
        them sequence_rows_grad's p of a row sum to 1, which lse rounded to float32 (up to
        |lse| * 6e-8 relative error in every p) breaks, and the gradient 1 - p_y of a target the
        model is sure of takes that error whole.

Returns:
    [logp, entropy, lse, sum_pz, log_sum_sq], each [N] in tile's dtype: log p_y, -sum p log p,
    logsumexp z, sum p z and log sum p^2.)doc",
        py::arg("tile"), py::arg("bias"), py::arg("targets"), py::arg("temperature"),
        py::arg("softcap"), py::arg("float64_stats") = false);

  m.def("sequence_rows_grad", &fastalign::sequence_rows_grad,
        R"doc(Overwrites a tile of raw logits a (as sequence_rows_stats took them) with dL/da,
L = sum_n grad_logp_n * logp_n + grad_entropy_n * entropy_n, in one pass per row:
dL/dz_v = g (1[v = y] - p_v) - e p_v (z_v - sum_pz), times
dz/da = (1 - tanh^2((a + b) / softcap)) / T (1 / T without a softcap).

Args:
    tile: [N, V] contiguous, float32 or float64: raw logits on entry, dL/da on return.
    bias, targets, temperature, softcap: as in sequence_rows_stats.
    lse, sum_pz: [N] tile's dtype or float64, as sequence_rows_stats returned them.
    grad_logp: [N] tile's dtype.
    grad_entropy: [N] tile's dtype, or None (zero).)doc",
        py::arg("tile"), py::arg("bias"), py::arg("targets"), py::arg("lse"), py::arg("sum_pz"),
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("temperature"),
        py::arg("softcap"));

  m.def("gae_forward", &fastalign::gae_forward,
        R"doc(Generalised advantage estimation: one reverse scan per row over the masked positions.

Per row, only positions where mask is true take part, walked from the last to the first; the next
value of a position is the value at the next masked position of its row (0 after the last):
delta_t = r_t + gamma * V_next - V_t, A_t = delta_t + gamma * lam * A_next, returns R_t = A_t + V_t.
Positions outside the mask get A = R = 0. Agrees exactly with fastalign.reference.gae_reference.

Args:
    rewards: [B, T] contiguous CPU tensor, float32 or float64.
    values: [B, T] contiguous, rewards' dtype.
    mask: [B, T] contiguous bool.
    gamma: discount factor.
    lam: GAE lambda.

Returns:
    [advantages, returns], each [B, T] in rewards' dtype.)doc",
        py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("gamma"),
        py::arg("lam"));
}
