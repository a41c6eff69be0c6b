"""The worker's malloc arena cap (worker/memory.py), checked on glibc's own report."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# Threads that each allocate while all are alive, then glibc's malloc_info:
# one <heap nr=...> element per arena in use.
PROBE = textwrap.dedent("""
    import ctypes, sys, tempfile, threading
    from mlxq.worker.memory import limit_malloc_arenas
    print(limit_malloc_arenas() if sys.argv[1] == "limit" else None)
    barrier = threading.Barrier(8)
    def work():
        held = [bytearray(50_000) for _ in range(20)]
        barrier.wait()
        held.clear()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    libc = ctypes.CDLL(None)
    libc.fdopen.restype = ctypes.c_void_p
    with tempfile.TemporaryFile() as out:
        fp = libc.fdopen(out.fileno(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(fp))
        libc.fflush(ctypes.c_void_p(fp))
        out.seek(0)
        print(out.read().decode().count("<heap nr="))
""")


def _arenas(mode: str, **env) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    first, count = out.stdout.split()
    return first, int(count)


def test_a_worker_process_uses_at_most_two_malloc_arenas():
    first, count = _arenas("limit")
    assert first == "True" and count <= 2  # the main arena and one for all threads
    assert _arenas("none")[1] > 2  # without the cap, the threads get arenas of their own


def test_the_users_malloc_arena_max_wins():
    assert _arenas("limit", MALLOC_ARENA_MAX="4")[0] == "False"
