"""Which implementation runs an op, and the options every kernel takes.

Each fused op exists three times: Triton kernels (``fastalign.kernels``; CUDA tensors, or CPU
tensors under the Triton interpreter), the C++ extension (``fastalign._C``, CPU tensors) and a
plain-PyTorch reference that materialises the logits (beside each op, in ``fastalign.ops``).
``impl="auto"`` picks the fastest one that can run on the inputs' device. The op modules import
their kernels' entry points by name; this module only decides which family may run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastalign.ops._extension import EXTENSION, EXTENSION_ERROR

IMPLEMENTATIONS = ("auto", "triton", "cpp", "reference")


@dataclass(frozen=True)
class HeadParams:
    """The non-tensor options of a head's logits z = softcap·tanh(a/softcap)/temperature, passed
    to the kernels as one object (the kernels take softcap 0 for none)."""

    temperature: float = 1.0
    softcap: float | None = None

    @property
    def softcap_or_zero(self) -> float:
        return 0.0 if self.softcap is None else float(self.softcap)


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None if they can. The device is asked
    first: importing triton costs a CPU-only process ~150 MiB resident and a second."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type != "cuda" and not interpreted:
        return (
            f"Triton kernels need CUDA tensors (got device {device}); on CPU they run only "
            "through the Triton interpreter, enabled by TRITON_INTERPRET=1 before "
            "fastalign.kernels is imported"
        )
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return None


def cpp_unavailable_reason(device: torch.device) -> str | None:
    """Why the C++ extension cannot run on ``device``, or None if it can."""
    if EXTENSION is None:
        return f"the C++ extension fastalign._C is not built ({EXTENSION_ERROR})"
    if device.type != "cpu":
        return f"the C++ extension runs on CPU tensors only (got device {device})"
    return None


def available_implementations(device: torch.device | str = "cpu") -> list[str]:
    """The implementations that can run on ``device``, fastest first."""
    device = torch.device(device)
    found = []
    if device.type == "cuda" and triton_unavailable_reason(device) is None:
        found.append("triton")
    if cpp_unavailable_reason(device) is None:
        found.append("cpp")
    if device.type == "cpu" and triton_unavailable_reason(device) is None:
        found.append("triton")  # the interpreter: correct but slow, for tests
    found.append("reference")
    return found


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map ``impl`` ("auto" or a name) to the implementation that will run, or raise."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda" and dtype != torch.float64 \
                and triton_unavailable_reason(device) is None:
            return "triton"
        if cpp_unavailable_reason(device) is None:
            return "cpp"
        return "reference"
    if impl == "triton":
        reason = triton_unavailable_reason(device)
        if reason is None and dtype == torch.float64:
            reason = "the Triton kernels support float32, bfloat16 and float16, not float64"
        if reason is not None:
            raise ValueError(f"impl='triton' cannot run here: {reason}")
    if impl == "cpp":
        reason = cpp_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"impl='cpp' cannot run here: {reason}")
    return impl


# The FASTALIGN_* variables read while the ops run (the README's table of knobs), by the reader
# that takes each up; FASTALIGN_BUILD_EXT and FASTALIGN_NATIVE act at install time only.
TRITON_ENVIRONMENT = ("FASTALIGN_TRITON_BACKWARD", "FASTALIGN_AUTOTUNE")
CPP_ENVIRONMENT = ("FASTALIGN_CPU_SCHEDULE", "FASTALIGN_CPU_BLOCK_N", "FASTALIGN_CPU_BLOCK_V",
                   "FASTALIGN_CPU_ISA")


def check_environment() -> None:
    """Raise ValueError, naming the variable and what it takes, for the first FASTALIGN_* value
    the ops would refuse when they read it, so that a command refuses it before it starts
    rather than minutes into a run. Each variable is put to the code that reads it (the C++ ones
    to a one-token call of the extension), so the two cannot disagree."""
    from fastalign.kernels import _chunked

    _chunked.cpu_matmul()
    _chunked.chunk_rows(1, 1, 4)
    if any(os.environ.get(name) for name in TRITON_ENVIRONMENT):
        from fastalign.kernels import _launch  # imports triton: only when one of its knobs is set

        _launch.backward_strategy()
        _launch.autotune_enabled()
    if EXTENSION is not None and any(os.environ.get(name) for name in CPP_ENVIRONMENT):
        one = torch.zeros(1, 1)
        EXTENSION.linear_logprobs_forward(one, one, None, torch.zeros(1, dtype=torch.long),
                                          1.0, 0.0, -100)
