"""Every argument check of fastalign, in one place.

The public entry points (ops, losses, fused modules, ``fastalign.hf``, trainer configs) validate
their arguments once, with these helpers; what lies below them (autograd Functions, kernel
launchers, the C++ extension) trusts what it is given and keeps only cheap layout checks.

Convention: ``TypeError`` for a value of the wrong kind, ``ValueError`` for a value of the right
kind that is out of range; both name the argument as the caller spelled it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------
# Scalars
# ----------------------------------------------------------------------------------------------


def _check_number(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_positive(name: str, value, *, optional: bool = False) -> float | None:
    """A finite number > 0 (``beta``, ``temperature``), returned as a float; with ``optional``,
    None too (``softcap``).

    The message states the bound for infinities as well: ``softcap=inf`` reads as "no cap" to
    some users, and the error should say it is not.
    """
    if optional and value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        kind = "a float or None" if optional else "a float"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        extra = "None or " if optional else ""
        raise ValueError(f"{name} must be {extra}a finite number > 0, got {value}")
    return value


def check_non_negative(name: str, value) -> float:
    """A finite number >= 0 (e.g. a loss coefficient); returned as a float."""
    value = _check_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_finite(name: str, value) -> float:
    """Any finite number; returned as a float."""
    return _check_number(name, value)


def check_in_range(name: str, value, low: float, high: float, *, high_inclusive: bool) -> float:
    """A finite number in ``[low, high)`` or ``[low, high]``; returned as a float."""
    value = _check_number(name, value)
    inside = low <= value <= high if high_inclusive else low <= value < high
    if not inside:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value}")
    return value


def check_unit_interval(name: str, value) -> None:
    """A discount-like factor in [0, 1] (GAE's gamma and lambda)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def check_choice(name: str, value, choices) -> str:
    """One of ``choices`` (strings); returned unchanged."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid values are: {', '.join(choices)}")
    return value


def normalize_names(name: str, value: str | Sequence[str], valid: Sequence[str]) -> list[str]:
    """A string or a non-empty sequence of distinct strings, each one of ``valid``."""
    if isinstance(value, str):
        names = [value]
    elif isinstance(value, Sequence):
        names = list(value)
    else:
        names = None
    if names is None or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    for n in names:
        if n not in valid:
            raise ValueError(f"unknown {name} {n!r}; valid values are: {', '.join(valid)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name} must not repeat an entry, got {names}")
    return names


# ----------------------------------------------------------------------------------------------
# Tensors
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
    # A DTensor exists only once torch.distributed.tensor has been imported; importing it here
    # just to ask would pull in sympy and DTensor's op tables (~50 MiB resident, seconds) on the
    # first call of every op.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def check_float_tensor(name: str, value) -> None:
    """Any floating-point tensor (the losses upcast half precision themselves)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def check_per_token(name: str, value, *, like: torch.Tensor | None = None,
                  like_name: str = "") -> None:
    """A floating-point tensor: ``[B, T]`` when ``like`` is None, else of ``like``'s shape."""
    check_float_tensor(name, value)
    if like is None:
        if value.dim() != 2:
            raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(value.shape)}")
    elif value.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of {like_name} {tuple(like.shape)}, "
            f"got {tuple(value.shape)}"
        )
    if like is not None and value.device != like.device:
        raise ValueError(f"{name} must be on the same device as {like_name}, got {value.device} "
                         f"and {like.device}")


def check_token_mask(mask, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Check ``mask`` (bool or 0/1, the shape of ``like``) and return it as a bool tensor."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be a bool or 0/1 tensor, got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(
            f"mask must have the shape of {like_name} {tuple(like.shape)}, got {tuple(mask.shape)}"
        )
    if mask.device != like.device:
        raise ValueError(f"mask must be on the same device as {like_name}, got {mask.device} "
                         f"and {like.device}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_mask(name: str, value) -> None:
    """A token mask: a bool tensor, or an integer one holding 0/1 (as Hugging Face's masks)."""
    check_tensor(name, value, floating=False)
    if value.dtype.is_floating_point or value.dtype.is_complex:
        raise TypeError(f"{name} must be a bool (or 0/1 integer) tensor, got {value.dtype}")


def check_token_ids(name: str, value) -> None:
    """An integer tensor of token ids (targets and labels may hold the ignore index too)."""
    check_tensor(name, value, floating=False)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")


def check_token_range(name: str, ids: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every id in [0, V) or equal to ``ignore_index``.

    The one label check of a call, and its one device sync: an id outside the head would score
    garbage (or read out of bounds), silently. Callers name the tensor as their user passed it.
    """
    if ids.numel() == 0 or ids.device.type == "meta":
        return
    outside = (ids != ignore_index) & ((ids < 0) | (ids >= vocab_size))
    if bool(outside.any()):
        raise ValueError(
            f"{name} must lie in [0, V) = [0, {vocab_size}) or equal ignore_index "
            f"({ignore_index}); found {ids[outside][:5].tolist()}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {(name, t.device) for name, t in tensors.items() if t is not None}
    if len({device for _, device in devices}) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in sorted(devices, key=str))
        raise ValueError(f"all tensors must be on the same device, got {listed}")


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


# ----------------------------------------------------------------------------------------------
# Per-sequence tensors (the losses' inputs)
# ----------------------------------------------------------------------------------------------


def check_per_sequence(**tensors: torch.Tensor | None) -> int:
    """Check that the given tensors are floating-point, 1-D ``[B]``, with one B >= 1, on one device.

    ``None`` entries are skipped (optional arguments). Returns B.
    """
    batch_size = None
    first_name = None
    devices = set()
    for name, value in tensors.items():
        if value is None:
            continue
        check_float_tensor(name, value)
        if value.dim() != 1:
            raise ValueError(
                f"{name} must be 1-D [B] (one value per sequence), got shape {tuple(value.shape)}"
            )
        if batch_size is None:
            batch_size, first_name = value.shape[0], name
        elif value.shape[0] != batch_size:
            raise ValueError(
                f"mismatched batch sizes: {first_name} has B={batch_size} but {name} has "
                f"B={value.shape[0]}"
            )
        devices.add(value.device)
    if batch_size == 0:
        raise ValueError(f"{first_name} is empty: the batch needs at least one sequence (B >= 1)")
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on the same device, got {sorted(map(str, devices))}")
    assert batch_size is not None, "check_per_sequence needs at least one tensor"
    return batch_size


def check_lengths(name: str, lengths, batch_size: int) -> None:
    """Per-sequence token counts ``[B]`` (integer or float), every one > 0.

    Zero lengths are refused rather than clamped: a sequence without response tokens is a data
    bug, and dividing by a clamped 1 would silently hide it. This costs one device sync.
    """
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dtype == torch.bool or lengths.dtype.is_complex:
        raise TypeError(f"{name} must be an integer or floating-point tensor, got {lengths.dtype}")
    if tuple(lengths.shape) != (batch_size,):
        raise ValueError(f"{name} must have shape [B] = [{batch_size}], got {tuple(lengths.shape)}")
    if bool((lengths <= 0).any()):
        raise ValueError(f"{name} must be > 0 for every sequence (token counts), got {lengths}")


def check_max_len(max_len) -> int | None:
    if max_len is None:
        return None
    if not isinstance(max_len, int) or isinstance(max_len, bool):
        raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    return max_len


# ----------------------------------------------------------------------------------------------
# Configuration fields (the trainers' configs). Always ValueError, whatever is wrong: these
# values come from a command line or a config file, where a wrong kind is a usage error too.
# ----------------------------------------------------------------------------------------------


def check_field_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_field_float(name: str, value, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got "
                         f"{value!r}")


def check_field_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_field_number(name: str, value, *, low: float, high: float | None = None,
                 inclusive: bool = False, high_inclusive: bool = False) -> None:
    """A finite number above ``low`` (or equal, ``inclusive``) and below ``high`` if given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value >= low if inclusive else value > low
        if high is not None:
            ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        bounds = f"{'[' if inclusive else '('}{low}, "
        bounds += f"{high}{']' if high_inclusive else ')'}" if high is not None else "inf)"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its repr when the message is empty), for a
    one-line error that wraps a library's long one."""
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)
