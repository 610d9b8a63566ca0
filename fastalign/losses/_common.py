"""Small helpers shared by the loss functions: argument checks, dtype promotion, metric packing.

Everything here is generic (no loss formula lives in this file) so that any loss module can use it.
Error messages follow the package convention: ``TypeError`` for a value of the wrong kind,
``ValueError`` for a value of the right kind that is out of range, both naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Metrics = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Scalar options
# ----------------------------------------------------------------------------------------------


def _check_number(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_positive(name: str, value) -> float:
    """A finite number > 0 (e.g. ``beta``); returned as a float."""
    value = _check_number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
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


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------


def check_float_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


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


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def metric(value: torch.Tensor) -> torch.Tensor:
    """A logged metric: detached, 0-d, float32."""
    return value.detach().reshape(()).to(torch.float32)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate everywhere (Mächler, 2012).

    For x near 0, ``log(-expm1(x))``; for x far below, ``log1p(-exp(x))``; switch at −log 2.
    Returns −inf at x = 0. Both branches are evaluated on safe arguments so that no NaN reaches
    the gradient through the unused side of the ``where``.
    """
    near_zero = x > -math.log(2.0)
    safe_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    safe_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(
        near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far))
    )


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
