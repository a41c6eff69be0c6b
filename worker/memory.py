"""Process-wide memory settings for a worker, applied before its threads start.

A worker runs a Celery pool of ``--concurrency`` threads beside the engine
thread. glibc gives each thread that allocates its own malloc arena (up to
eight per core), and every arena keeps the memory freed in it. On Linux the
worker's re-execution with OpenBLAS (:func:`mlxq.worker.blas.ensure_fast_blas`)
sets ``MALLOC_ARENA_MAX=2`` for the new process, which lowers its peak RSS at
the same speed (``benchmarks/RESULTS.md``). Where there is no re-execution,
:func:`limit_malloc_arenas` sets the same cap with ``mallopt`` before the
threads start: that bounds the arenas too (``tests/test_memory.py``), but
lowered the peak RSS less, so the environment variable is the primary means.

:func:`reuse_freed_memory` keeps glibc from handing freed memory back to the
kernel at every turn. Its defaults map each block of more than a few MiB
afresh and unmap it when it is freed, and trim a heap as soon as 64 MiB (at
most) lie free at its top: an engine step's large buffers (a prefill chunk's
activations, a decode step's logits) then cost a page fault per page each
time, which on a small VM is about 1 GB/s, slower than the work on them
(the compiled SiLU of a 1,000-token chunk: 3-5x). With blocks below 32 MiB
taken from the heaps and 512 MiB allowed free at a heap's top, they are
reused instead.

The re-execution also turns on glibc's transparent huge pages for malloc's
memory (``glibc.malloc.hugetlb=1`` in ``GLIBC_TUNABLES``, glibc 2.35 and
later, where the kernel's transparent huge pages are ``madvise`` or
``always``): a large buffer such as the KV cache is then faulted in 2 MiB at a
time rather than 4 KiB (growing a 7.5 GB cache: 7.3 s instead of 9.8), and
a decode step streams the weights through fewer TLB entries (0.5B shape, 32
rows: 283 ms instead of 371).
A ``glibc.malloc.hugetlb`` the user set wins.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = [
    "MALLOC_ARENAS", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "HUGE_PAGES", "with_huge_pages", "limit_malloc_arenas",
    "reuse_freed_memory",
]

log = logging.getLogger(__name__)

#: Arenas a worker lets glibc's malloc use (``MALLOC_ARENA_MAX`` overrides it).
MALLOC_ARENAS = 2

#: Blocks at least this large are mapped on their own (glibc's largest setting).
MMAP_THRESHOLD = 32 * 2**20
#: Free memory a heap may keep at its top.
TRIM_THRESHOLD = 512 * 2**20

#: glibc's tunable that has malloc ask for transparent huge pages.
HUGE_PAGES = "glibc.malloc.hugetlb=1"
# glibc's mallopt parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _mallopt():
    """glibc's ``mallopt``, or None (not Linux, or a C library without it such as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for threads started from now on; True if set.

    Does nothing off Linux, on a C library without ``mallopt``, or where the
    user's ``MALLOC_ARENA_MAX`` already chose.
    """
    mallopt = _mallopt()
    if mallopt is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    if mallopt(_M_ARENA_MAX, arenas) != 1:
        log.debug("mallopt(M_ARENA_MAX, %d) failed", arenas)
        return False
    return True


def reuse_freed_memory() -> bool:
    """Keep freed blocks below :data:`MMAP_THRESHOLD` for reuse (see above); True if set.

    Does nothing where glibc's ``mallopt`` is missing, or where the user's
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` already chose.
    """
    mallopt = _mallopt()
    if mallopt is None or os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def with_huge_pages(tunables: str) -> str:
    """``GLIBC_TUNABLES`` with :data:`HUGE_PAGES` added, unless it already sets ``glibc.malloc.hugetlb``."""
    if "glibc.malloc.hugetlb" in tunables:
        return tunables
    return f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES
