"""Run MLX's CPU backend on an optimised BLAS.

mlx's Linux wheel bundles the reference BLAS (float32 matmul at a few GFLOP/s).
Debian's OpenBLAS (``libopenblas0-pthread``), preloaded in its place, is some
40x faster. Ahead of it goes mlxq's own few-row matmul
(:mod:`mlxq.worker.smallgemm`), which takes a decode step's products where
OpenBLAS is slow. :func:`ensure_fast_blas` re-executes the process with
``LD_PRELOAD`` set when OpenBLAS is installed but not loaded; it must run
before anything imports mlx.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from typing import Optional

from .memory import MALLOC_ARENAS
from .smallgemm import LIBRARY_PREFIX, build

__all__ = ["find_openblas", "fast_blas_preload", "loaded_blas", "ensure_fast_blas"]

log = logging.getLogger(__name__)

_PATTERNS = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)
_GUARD = "MLXQ_BLAS_REEXEC"


def find_openblas(openmp_first: bool = False) -> Optional[str]:
    """The path of an installed OpenBLAS shared library, if any (its OpenMP build first if asked)."""
    patterns = sorted(_PATTERNS, key=lambda p: "openmp" not in p) if openmp_first else _PATTERNS
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if os.path.exists(path):
                return path
    return None


def fast_blas_preload() -> list[str]:
    """What the worker preloads, in order: the few-row matmul where it builds, then OpenBLAS; [] without OpenBLAS.

    With the few-row matmul, OpenBLAS's OpenMP build goes first where it is
    installed (Debian's ``libopenblas0-openmp``): both then run on one pool of
    OpenMP threads. Beside the pthreads build, each library's idle threads spin
    on the cores the other's need (a shared-prefix decode step, where attention
    also multiplies on OpenBLAS: 660 ms on the pthreads build alone, 710 with
    the few-row matmul beside it, 450-550 on the OpenMP build with it).
    """
    if find_openblas() is None:
        return []
    small = build()
    openblas = find_openblas(openmp_first=small is not None)
    return [small, openblas] if small else [openblas]


def loaded_blas() -> str:
    """Which BLAS this process has mapped: 'openblas+smallgemm', 'openblas', 'reference', or 'not loaded'."""
    if sys.platform == "darwin":
        return "accelerate"
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return "unknown"
    if "libopenblas" in text:
        return "openblas+smallgemm" if LIBRARY_PREFIX in text else "openblas"
    if "libblas" in text:
        return "reference"
    return "not loaded"


def ensure_fast_blas(disable: bool = False) -> None:
    """On Linux, re-exec this process with OpenBLAS (and the few-row matmul) preloaded when it can help."""
    if disable or not sys.platform.startswith("linux"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", "") or os.environ.get(_GUARD):
        return
    if "mlx" in sys.modules:
        log.warning("mlx is already imported; cannot switch it to OpenBLAS")
        return
    preload = fast_blas_preload()
    if not preload:
        log.warning(
            "OpenBLAS not found: MLX will use its reference BLAS, which is slow on the CPU "
            "(install it with: apt-get install libopenblas0-pthread)"
        )
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (*preload, env.get("LD_PRELOAD", "")) if p)
    env[_GUARD] = "1"
    # From the start of the new process, as the environment variable: a cap set
    # later by mallopt bounded the arenas but not the 0.5B worker's peak RSS.
    env.setdefault("MALLOC_ARENA_MAX", str(MALLOC_ARENAS))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(getattr(sys, "orig_argv", [sys.executable, *sys.argv])), env)
