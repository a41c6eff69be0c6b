"""Set up a process that is to run a worker, before it imports MLX or starts a thread."""

from __future__ import annotations

from .blas import ensure_fast_blas
from .memory import limit_malloc_arenas, reuse_freed_memory

__all__ = ["prepare_worker_process"]


def prepare_worker_process(blas_setup: bool = True) -> None:
    """On Linux: re-execute with OpenBLAS preloaded where that helps (and malloc capped
    at two arenas), else cap the arenas in this process; then let malloc reuse freed
    blocks rather than return them. ``mlxq worker`` and ``mlxq run``."""
    ensure_fast_blas(disable=not blas_setup)
    limit_malloc_arenas()
    reuse_freed_memory()
