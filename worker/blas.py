"""Run MLX's CPU backend on an optimised BLAS.

mlx's Linux wheel bundles the reference BLAS (float32 matmul at a few GFLOP/s).
Debian's OpenBLAS (``libopenblas0-pthread``), preloaded in its place, is some
40x faster. Ahead of it goes mlxq's own few-row matmul
(:mod:`mlxq.worker.smallgemm`), which takes a decode step's products where
OpenBLAS is slow. :func:`ensure_fast_blas` re-executes the process with
``LD_PRELOAD`` set when OpenBLAS is installed but not loaded; it must run
before anything imports mlx.

OpenBLAS's Debian build picks its kernels for the CPU when it loads. A CPU newer
than the build (Debian 12's OpenBLAS 0.3.21 on Intel's Emerald Rapids) is taken
for a Pentium 4 ("Prescott"), whose SSE3 kernels multiply about 4.5x slower than
its AVX-512 ones. :func:`openblas_env` then names the right kernels with
``OPENBLAS_CORETYPE``, unless the user has set it.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
from typing import Optional

from .memory import MALLOC_ARENAS, with_huge_pages
from .smallgemm import LIBRARY_PREFIX, build, cpu_flags

__all__ = [
    "find_openblas", "fast_blas_preload", "fast_blas_env", "openblas_core", "coretype_for", "openblas_env",
    "loaded_blas", "loaded_openblas_core", "ensure_fast_blas",
]

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
# OpenBLAS's cores whose single-precision kernels use AVX2 or AVX-512: the rest are older (SSE).
_VECTOR_CORES = {"haswell", "zen", "skylakex", "cooperlake", "sapphirerapids"}
_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}  # what OpenBLAS's SkylakeX kernels need


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


def openblas_core(path: str) -> Optional[str]:
    """The core OpenBLAS at ``path`` takes this CPU for ('Haswell', 'SkylakeX', 'Prescott'...), if it says."""
    try:
        lib = ctypes.CDLL(path)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        name = lib.openblas_get_corename()
    except (OSError, AttributeError):
        return None
    return name.decode(errors="replace").strip() if name else None


def coretype_for(core: Optional[str], flags: set[str]) -> Optional[str]:
    """The OpenBLAS core to name for a CPU with ``flags`` that OpenBLAS takes for ``core``:
    SkylakeX where it has AVX-512, Haswell where it has AVX2 and FMA, if ``core`` is an
    older one (without AVX2); else None."""
    if core is None or core.lower() in _VECTOR_CORES:
        return None
    return "SkylakeX" if _AVX512 <= flags else "Haswell" if {"avx2", "fma"} <= flags else None


def openblas_env(path: Optional[str]) -> dict[str, str]:
    """``{"OPENBLAS_CORETYPE": core}`` where OpenBLAS at ``path`` takes this CPU for an older
    one (:func:`coretype_for`) and the user has not set the variable, else ``{}``."""
    flags = cpu_flags()
    if not path or "OPENBLAS_CORETYPE" in os.environ or not {"avx2", "fma"} <= flags:
        return {}  # without AVX2 there are no better kernels to name: OpenBLAS is not loaded to ask
    core = openblas_core(path)
    choice = coretype_for(core, flags)
    if choice is None:
        return {}
    log.info("OpenBLAS takes this CPU for %s; its %s kernels are used instead (OPENBLAS_CORETYPE)", core, choice)
    return {"OPENBLAS_CORETYPE": choice}


def fast_blas_env() -> dict[str, str]:
    """What a process needs in its environment to multiply as the worker does: ``LD_PRELOAD``
    (:func:`fast_blas_preload`) and :func:`openblas_env`'s; ``{}`` without OpenBLAS."""
    preload = fast_blas_preload()
    return {"LD_PRELOAD": ":".join(preload), **openblas_env(preload[-1])} if preload else {}


def loaded_blas() -> str:
    """Which BLAS this process has mapped: 'openblas+smallgemm', 'openblas', 'reference', or 'not loaded'."""
    if sys.platform == "darwin":
        return "accelerate"
    text = _maps()
    if text is None:
        return "unknown"
    if "libopenblas" in text:
        return "openblas+smallgemm" if LIBRARY_PREFIX in text else "openblas"
    if "libblas" in text:
        return "reference"
    return "not loaded"


def loaded_openblas_core() -> Optional[str]:
    """The core whose kernels the OpenBLAS this process has mapped uses, if it has one mapped."""
    paths = [line.split()[-1] for line in (_maps() or "").splitlines() if "libopenblas" in line]
    return openblas_core(paths[0]) if paths else None


def _maps() -> Optional[str]:
    """This process's memory map (``/proc/self/maps``), or None where it cannot be read."""
    try:
        with open("/proc/self/maps") as maps:
            return maps.read()
    except OSError:
        return None


def ensure_fast_blas(disable: bool = False) -> None:
    """On Linux, re-exec this process with OpenBLAS (and the few-row matmul) preloaded when it can help."""
    if disable or not sys.platform.startswith("linux"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", "") or os.environ.get(_GUARD):
        return
    if "mlx" in sys.modules:
        log.warning("mlx is already imported; cannot switch it to OpenBLAS")
        return
    blas_env = fast_blas_env()
    if not blas_env:
        log.warning(
            "OpenBLAS not found: MLX will use its reference BLAS, which is slow on the CPU "
            "(install it with: apt-get install libopenblas0-pthread)"
        )
        return
    env = dict(os.environ)
    env.update(blas_env, LD_PRELOAD=":".join(p for p in (blas_env["LD_PRELOAD"], env.get("LD_PRELOAD", "")) if p))
    env[_GUARD] = "1"
    # From the start of the new process, as the environment variable: a cap set
    # later by mallopt bounded the arenas but not the 0.5B worker's peak RSS.
    env.setdefault("MALLOC_ARENA_MAX", str(MALLOC_ARENAS))
    env["GLIBC_TUNABLES"] = with_huge_pages(env.get("GLIBC_TUNABLES", ""))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(getattr(sys, "orig_argv", [sys.executable, *sys.argv])), env)
