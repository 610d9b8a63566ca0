"""Peak-memory measurement on CUDA and on CPU, shared by tests and benchmarks.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
CPU: the process's resident high-water mark (``VmHWM`` in ``/proc/self/status``), reset by
writing ``5`` to ``/proc/self/clear_refs`` (Linux). Freed memory must not stay resident, or a
function that reuses it would look free: glibc keeps freed blocks below its mmap threshold (which
grows up to 32 MiB as large blocks are freed) in its heaps, resident. So, before measuring,
``malloc_trim(0)`` hands every free heap page back to the OS (glibc ≥ 2.8 releases the interior of
free blocks too); the high-water mark above the resident size at the start is then the peak of
what the measured function held at once. The test suite also pins the threshold at 1 MiB
(``map_large_blocks_directly``), so that its bounds do not depend on the tests that ran before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from typing import Callable

import torch

_STATUS = "/proc/self/status"


def _load_glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_GLIBC = _load_glibc()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def map_large_blocks_directly(threshold_bytes: int = 2**20) -> bool:
    """Pin glibc's mmap threshold at ``threshold_bytes`` for the rest of the process, so that
    every block at least that large is mapped when allocated and unmapped when freed.

    By default glibc raises the threshold (up to 32 MiB) each time a mapped block is freed;
    blocks below it then come from the heaps, where what earlier work left there decides how
    much of them is resident. A test suite's memory bounds would then depend on the tests that
    ran before: a DPO step measured 124 or 179 MiB after the rest of the suite, 66 MiB alone
    and with the threshold pinned. Returns False where glibc is not the allocator."""
    return _GLIBC is not None and bool(_GLIBC.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))


def _release_free_heap_memory() -> None:
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open(_STATUS) as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field} not found in {_STATUS}")
    return int(match.group(1))


def cpu_peak_supported() -> bool:
    """Whether this system lets us reset and read the resident high-water mark."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False
    except RuntimeError:
        return False


def measure_peak_memory(fn: Callable[[], object], device: torch.device | str) -> tuple[object, int]:
    """Run ``fn()`` and return ``(its result, peak bytes it added above the memory in use before)``.

    The result is kept alive until the measurement ends, so returned tensors (for example
    gradients) count towards the peak, as they would in a training step.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(0, torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cuda or cpu devices, got {device}")
    _release_free_heap_memory()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    return result, max(0, peak - before) * 1024
