"""fastalign: fused kernels for LLM alignment losses that never materialise the logits."""

from fastalign._extension import EXTENSION as _EXTENSION  # noqa: F401  (warns once if missing)
from fastalign.gae import gae
from fastalign.linear_kl import linear_kl
from fastalign.linear_logprobs import (
    IMPLEMENTATIONS,
    available_implementations,
    linear_logprobs,
)
from fastalign.reference import gae_reference, linear_kl_reference, linear_logprobs_reference
from fastalign.sequence import (
    SequenceLogprobs,
    next_token_targets,
    sequence_logprobs,
    sequence_logprobs_from_labels,
)

__version__ = "0.2.0"

__all__ = [
    "IMPLEMENTATIONS",
    "SequenceLogprobs",
    "available_implementations",
    "gae",
    "gae_reference",
    "linear_kl",
    "linear_kl_reference",
    "linear_logprobs",
    "linear_logprobs_reference",
    "next_token_targets",
    "sequence_logprobs",
    "sequence_logprobs_from_labels",
    "__version__",
]
