"""Layer 2 of fastalign: the ops users call on tensors.

One module per op, each holding its argument checks, its one autograd Function, the dispatch to
its Triton (``fastalign.kernels``) and C++ (``fastalign._C``) kernels, and its materialising
plain-PyTorch reference:

* ``linear_logprobs``: per-token log-probabilities (and entropies) straight from hidden states
  and the LM head;
* ``linear_argmax`` and ``linear_logit_stats``: the arg-max, the mean and log Σ p² over the
  vocabulary of the head's logits (no gradient), for metrics and WPO's weights;
* ``linear_nll``: the NLL loss of the targets (mean, sum or per token), its gradients formed in
  the forward pass when the loss is a scalar (6·N·H·V FLOPs instead of 8);
* ``linear_kl``: the exact per-token KL between a policy head and a reference head;
* ``gae``: generalised advantage estimation;
* ``sequence``: the causal shift and per-sequence sums on top of ``linear_logprobs``.

Shared pieces: ``_checks`` (every argument check of the package), ``_backends`` (which
implementation runs), ``_extension`` (loads the C++ extension), ``vocab_parallel`` (the
collectives of a vocabulary sharded across ranks).
"""

from fastalign.ops._backends import IMPLEMENTATIONS, available_implementations
from fastalign.ops.gae import gae, gae_reference
from fastalign.ops.linear_argmax import (
    LogitStats,
    linear_argmax,
    linear_argmax_reference,
    linear_logit_stats,
    linear_logit_stats_reference,
)
from fastalign.ops.linear_kl import linear_kl, linear_kl_reference
from fastalign.ops.linear_logprobs import linear_logprobs, linear_logprobs_reference
from fastalign.ops.linear_nll import linear_nll, linear_nll_reference
from fastalign.ops.sequence import (
    SequenceLogprobs,
    next_token_targets,
    sequence_logprobs,
    sequence_logprobs_from_labels,
)

__all__ = [
    "IMPLEMENTATIONS",
    "LogitStats",
    "SequenceLogprobs",
    "available_implementations",
    "gae",
    "gae_reference",
    "linear_argmax",
    "linear_argmax_reference",
    "linear_logit_stats",
    "linear_logit_stats_reference",
    "linear_kl",
    "linear_kl_reference",
    "linear_logprobs",
    "linear_logprobs_reference",
    "linear_nll",
    "linear_nll_reference",
    "next_token_targets",
    "sequence_logprobs",
    "sequence_logprobs_from_labels",
]
