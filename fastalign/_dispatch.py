"""Which implementation runs an op, and the argument checks every op shares.

Each fused op exists three times: Triton kernels (``fastalign.kernels.<op>``, CUDA tensors, or CPU
tensors under the Triton interpreter), the C++ extension (``fastalign._C``, CPU tensors) and a
plain-PyTorch reference (``fastalign.reference``). ``impl="auto"`` picks the fastest one that can
run on the inputs' device.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from fastalign._extension import EXTENSION, EXTENSION_ERROR

IMPLEMENTATIONS = ("auto", "triton", "cpp", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
    """Why the Triton kernels cannot run on ``device``, or None if they can."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return (
        f"Triton kernels need CUDA tensors (got device {device}); on CPU they run only through the "
        "Triton interpreter, enabled by TRITON_INTERPRET=1 before fastalign.kernels is imported"
    )


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
        triton_ok = triton_unavailable_reason(device) is None
        if device.type == "cuda" and dtype != torch.float64 and triton_ok:
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


def kernel_module(impl: str, op: str) -> ModuleType:
    """The module holding ``<op>_forward`` / ``<op>_backward`` for a fused implementation."""
    if impl == "triton":
        # Imported lazily: TRITON_INTERPRET is read when the kernels are decorated, and CPU users
        # who never touch the Triton path should not pay for importing triton.
        return importlib.import_module(f"fastalign.kernels.{op}")
    return EXTENSION


# ----------------------------------------------------------------------------------------------
# Argument checks shared by the ops
# ----------------------------------------------------------------------------------------------


def check_tensor(name: str, value, *, floating: bool) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if _is_dtensor(value):
        # A shard would give a wrong normaliser, silently; refuse it instead.
        raise TypeError(
            f"{name} is a DTensor (placements {tuple(value.placements)}), e.g. a parameter FSDP "
            "has sharded: call the op inside the FSDP module's forward, where its parameters "
            "are whole (fastalign's trainers do), or pass the local shard of a tensor-parallel "
            "head with process_group= and vocab_start_index=")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}"
        )


def _is_dtensor(value: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def check_mask(name: str, value) -> None:
    """A token mask: a bool tensor, or an integer one holding 0/1 (as Hugging Face's masks)."""
    check_tensor(name, value, floating=False)
    if value.dtype.is_floating_point or value.dtype.is_complex:
        raise TypeError(f"{name} must be a bool (or 0/1 integer) tensor, got {value.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {(name, t.device) for name, t in tensors.items() if t is not None}
    if len({device for _, device in devices}) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in sorted(devices, key=str))
        raise ValueError(f"all tensors must be on the same device, got {listed}")


def check_positive_float(name: str, value, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        kind = "a float or None" if optional else "a float"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        extra = "None or " if optional else ""
        raise ValueError(f"{name} must be {extra}a finite number > 0, got {value}")


def check_head(prefix: str, hidden, weight, bias) -> None:
    """hidden [..., H], weight [V, H] and optional bias [V], all of one floating dtype."""
    check_tensor(f"{prefix}hidden", hidden, floating=True)
    check_tensor(f"{prefix}weight", weight, floating=True)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight must have at least one row (V >= 1), got shape [0, H]")
    if hidden.dim() < 1:
        raise ValueError(
            f"{prefix}hidden must have at least one dimension [..., H], got a 0-d tensor"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}hidden's last dimension ({hidden.shape[-1]}) must equal {prefix}weight."
            f"shape[1] ({weight.shape[1]}): {prefix}hidden is [..., H] and {prefix}weight is [V, H]"
        )
    if hidden.shape[-1] == 0:
        raise ValueError(f"{prefix}hidden size H must be at least 1")
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"{prefix}hidden and {prefix}weight must have the same dtype, got {hidden.dtype} and "
            f"{weight.dtype}"
        )
    if bias is not None:
        check_tensor(f"{prefix}bias", bias, floating=True)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"{prefix}bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(
                f"{prefix}bias must have {prefix}weight's dtype {weight.dtype}, got {bias.dtype}"
            )


def check_finite_tensors(**tensors: torch.Tensor | None) -> None:
    """Raise if any floating tensor holds NaN or ±inf (the ops' optional ``check_finite``).

    One device sync per tensor; off by default, since the kernels would otherwise pay it on
    every call. Without the check a NaN or inf input gives NaN outputs on the tokens it reaches.
    """
    for name, tensor in tensors.items():
        if tensor is None or not tensor.dtype.is_floating_point:
            continue
        bad = ~torch.isfinite(tensor.detach())
        count = int(bad.sum())
        if count:
            kinds = []
            if bool(torch.isnan(tensor.detach()).any()):
                kinds.append("NaN")
            if bool(torch.isinf(tensor.detach()).any()):
                kinds.append("inf")
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise ValueError(
                f"{name} contains {' and '.join(kinds)} ({count} of {tensor.numel()} values, "
                f"first at index {first}); check_finite=True refuses non-finite inputs")
