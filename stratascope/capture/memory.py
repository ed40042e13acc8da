"""Keep freed memory in the process for reuse, while capturing.

glibc hands freed heap memory back to the kernel once more than a small threshold of it lies
free at the top of the heap, and serves allocations above another (adaptive, at most 32 MiB)
from fresh mmaps. A capture frees and allocates the same large buffers every batch (the
forward's activations, zarr's chunk buffers), so each batch faults its memory in again. Raising
both thresholds keeps that memory in the process: measured on the 2-core development VM
(SmolLM2, 10,148 tokens, hidden + attention + mlp, float16), the whole capture took 17.5 s
instead of 18.5 s (means of 4 runs each, alternating; benchmarks/README.md, capture). The cost
is that the process keeps up to `TRIM` of freed memory instead of returning it. Other C
libraries than glibc are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
TRIM = 1 << 30  # free heap kept before giving memory back to the kernel
MMAP = 32 << 20  # glibc's largest mmap threshold: smaller allocations come from the reusable heap
_done = False


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; False where the C library is not glibc."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    _done = bool(mallopt(M_TRIM_THRESHOLD, TRIM)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP))
    return _done
