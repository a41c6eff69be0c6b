"""The few-row matmul (``smallgemm.c``) that the worker preloads ahead of OpenBLAS.

A decode step multiplies a few rows of activations by every weight of the
model. OpenBLAS repacks the weight on every such call; ``smallgemm.c`` reads it
in place. It also runs the step's attention products (one call per row's
head, where OpenBLAS's set-up per call cost more than the product). It takes a
product only inside :func:`decoding`, which the engine wraps around each decode
step; prompt processing stays with OpenBLAS. The library also holds the vector
softmax and SiLU that :mod:`mlxq.worker.fastmath` calls, in prompt processing
and decode steps alike, and a sampler's weights (:mod:`mlxq.worker.sampling`).

:func:`build` compiles it once per machine with the system's C compiler
(``$CC``, else ``cc`` or ``gcc``) for the CPU it runs on, cached under
``$XDG_CACHE_HOME/mlxq`` (``~/.cache/mlxq``) by a hash of the source, the
compiler and the CPU: for AVX-512 where the CPU has it, else for AVX2 and FMA.
Without a compiler, OpenMP or AVX2, or with ``MLXQ_SMALL_GEMM=0``, the worker
logs why and uses OpenBLAS alone, and MLX's operations for softmax and SiLU.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

__all__ = ["SOURCE", "LIBRARY_PREFIX", "build", "cpu_flags", "loaded_path", "decoding"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("smallgemm.c")
LIBRARY_PREFIX = "libmlxq-smallgemm-"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlxq"


def _cpu() -> tuple[str, set[str]]:
    """This CPU's model name and feature flags, from /proc/cpuinfo."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu_flags() -> set[str]:
    """This CPU's feature flags, from /proc/cpuinfo (empty where it cannot be read)."""
    return _cpu()[1]


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(cache_dir: Optional[Path] = None, extra_flags: Sequence[str] = ()) -> Optional[str]:
    """The path of the library built for this machine (built now if not cached), or None with a warning.

    ``extra_flags`` go to the compiler after the usual ones (``-mno-avx512f``
    builds the AVX2 kernel on a CPU with AVX-512).
    """
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if os.environ.get("MLXQ_SMALL_GEMM", "1") == "0":
        log.info("MLXQ_SMALL_GEMM=0: every matmul goes to OpenBLAS")
        return None
    model, flags = _cpu()
    if "avx512f" not in flags and not {"avx2", "fma"} <= flags:
        log.warning("neither AVX-512 nor AVX2 and FMA on this CPU: decode steps' matmuls stay with OpenBLAS")
        return None
    if not SOURCE.is_file():
        log.warning("%s is missing from the installation: decode steps' matmuls stay with OpenBLAS", SOURCE)
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler (cc, gcc or $CC): decode steps' matmuls stay with OpenBLAS, "
                    "about 1.2x slower (install one with: apt-get install gcc)")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("the C compiler %s does not run (%s): decode steps' matmuls stay with OpenBLAS", cc, exc)
        return None
    key = hashlib.sha256("\0".join(
        [SOURCE.read_text(), cc, version, " ".join([*FLAGS, *extra_flags]), model, " ".join(sorted(flags))]).encode()).hexdigest()[:16]
    directory = cache_dir or _cache_dir()
    target = directory / f"{LIBRARY_PREFIX}{key}.so"
    if target.exists():
        return str(target)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=target.name, suffix=".partial", dir=directory)
        os.close(fd)
    except OSError as exc:
        log.warning("cannot write %s (%s): decode steps' matmuls stay with OpenBLAS", directory, exc)
        return None
    try:
        done = subprocess.run([cc, *FLAGS, *extra_flags, "-o", partial, str(SOURCE), "-ldl", "-lm"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            log.warning("compiling %s failed: decode steps' matmuls stay with OpenBLAS\n%s", SOURCE.name,
                        done.stderr.strip()[-2000:])
            return None
        os.replace(partial, target)  # atomic: workers building side by side each get a whole file
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("compiling %s failed (%s): decode steps' matmuls stay with OpenBLAS", SOURCE.name, exc)
        return None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    log.info("built %s for this CPU: %s", SOURCE.name, target)
    return str(target)


def loaded_path() -> Optional[str]:
    """The path of the library if this process has it mapped (preloaded), else None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if LIBRARY_PREFIX in path:
                    return path
    except OSError:
        pass
    return None


_rows: Optional[ctypes.c_int] = None
_looked = False


@contextmanager
def decoding() -> Iterator[None]:
    """Products evaluated inside go to the few-row matmul, whatever their rows; outside, to OpenBLAS.

    The engine evaluates each decode step inside it, from one thread: a product
    of a step then sums each row in the same order whatever the batch holds.
    Without the library preloaded it does nothing.
    """
    global _rows, _looked
    if not _looked:
        path = loaded_path()
        _rows = ctypes.c_int.in_dll(ctypes.CDLL(path), "mlxq_smallgemm_rows") if path else None
        _looked = True
    if _rows is None:
        yield
        return
    _rows.value = 1 << 30
    try:
        yield
    finally:
        _rows.value = 0
