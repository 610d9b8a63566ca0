// The one Python module of fastalign's C++ kernels: fastalign._C.
#include <torch/extension.h>

#include "linear_logprobs_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastalign C++ kernels (CPU). Called through fastalign.linear_logprobs(impl='cpp').";

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

Returns:
    [logp, entropy, lse, sum_pz], each [N]: logp and entropy float32 (float64 for float64
    inputs); lse and sum_pz (log-sum-exp of z and sum_v p_v z_v, what backward needs) float64
    always, since backward subtracts them from logits of nearly the same size.)doc",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"),
        py::arg("temperature"), py::arg("softcap"), py::arg("ignore_index"));

  m.def("linear_logprobs_backward", &fastalign::linear_logprobs_backward,
        R"doc(Gradients of linear_logprobs_forward, recomputing the logits tile by tile.

Args:
    grad_logp: [N] upstream gradient of logp, in the forward's logp dtype.
    grad_entropy: [N] upstream gradient of the entropy, or None (zero).
    hidden, weight, bias, targets, temperature, softcap, ignore_index: as in forward.
    lse, sum_pz: [N] float64, as returned by forward.
    compute_dhidden, compute_dweight, compute_dbias: which gradients to compute.

Returns:
    [dhidden, dweight, dbias], each in the dtype of its input, or None where not asked for.)doc",
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("hidden"), py::arg("weight"),
        py::arg("bias"), py::arg("targets"), py::arg("lse"), py::arg("sum_pz"),
        py::arg("temperature"), py::arg("softcap"), py::arg("ignore_index"),
        py::arg("compute_dhidden"), py::arg("compute_dweight"), py::arg("compute_dbias"));
}
