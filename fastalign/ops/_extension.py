"""Loads the optional C++ extension ``fastalign._C`` and remembers why it is missing, if it is."""

from __future__ import annotations

import warnings

import torch  # noqa: F401  (the extension links against libtorch: load it first)

try:
    import fastalign._C as EXTENSION  # built by setup.py from csrc/
    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # not built (FASTALIGN_BUILD_EXT=0, build isolation) or broken
    EXTENSION = None
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "fastalign: the C++ extension fastalign._C is not available "
        f"({EXTENSION_ERROR}); CPU tensors use the plain-PyTorch reference implementation, "
        "which materialises the [tokens x vocab] logits. Reinstall with "
        "`pip install --no-build-isolation -e .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )
