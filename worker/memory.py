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
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["MALLOC_ARENAS", "limit_malloc_arenas"]

log = logging.getLogger(__name__)

#: Arenas a worker lets glibc's malloc use (``MALLOC_ARENA_MAX`` overrides it).
MALLOC_ARENAS = 2

_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for threads started from now on; True if set.

    Does nothing off Linux, on a C library without ``mallopt``, or where the
    user's ``MALLOC_ARENA_MAX`` already chose.
    """
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_ARENA_MAX, arenas) != 1:
        log.debug("mallopt(M_ARENA_MAX, %d) failed", arenas)
        return False
    return True
