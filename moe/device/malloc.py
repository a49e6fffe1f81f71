"""Keep freed memory in the process: large CPU temporaries without a page fault per 4 KiB.

PyTorch's CPU allocator has no cache: every tensor is a ``malloc`` and every free a ``free``.
glibc serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB, raised dynamically up to 32 MiB) with
a fresh ``mmap`` and unmaps them on free, so each large temporary of a training step (the
[assignments, d_model] rows an MoE layer gathers, scales and scatters, activations, gradients)
is zeroed by the kernel page by page on first touch, every step. On the 2-vCPU machines this
project is measured on (a Firecracker VM) that costs about 3 us per page: a 32 MiB gather took
12 ms instead of 2.4 ms, and fine-grained experts (top-16 of 64), whose per-assignment tensors
are 8x those of top-2, lost most of their speed to it (docs/benchmarks.md, "Many small
experts"). Raising the mmap threshold to 1 GiB and the trim threshold to 2 GiB keeps freed
blocks in the heap for the next step to reuse; the process's resident memory stays at its
peak instead of going up and down each step.

Applied by the trainer and the benchmarks (``scripts/bench.py``) on CPU, process-wide, once.
Not applied when the environment already sets glibc's malloc (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``): ``--ac``'s memory measurement runs its
children with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed memory IS returned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1  # an int: mallopt takes one

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module doc); True when they are set
    (now or by an earlier call), False where this is not glibc or the environment decides."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or any(
            k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                      "GLIBC_TUNABLES")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                    and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
