"""fastalign: fused kernels for LLM alignment losses that never materialise the logits."""

from fastalign._extension import EXTENSION as _EXTENSION  # noqa: F401  (warns once if missing)
from fastalign.linear_logprobs import (
    IMPLEMENTATIONS,
    available_implementations,
    linear_logprobs,
)
from fastalign.reference import linear_logprobs_reference

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATIONS",
    "available_implementations",
    "linear_logprobs",
    "linear_logprobs_reference",
    "__version__",
]
