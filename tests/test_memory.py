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


# Allocates and fills three 11 MB blocks, then frees them, five times (from a
# thread, as MLX's stream allocates a prefill chunk's activations), then prints
# the page faults of the last four rounds.
REUSE_PROBE = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from mlxq.worker.memory import limit_malloc_arenas, reuse_freed_memory
    limit_malloc_arenas()
    print(reuse_freed_memory() if sys.argv[1] == "reuse" else None)
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, faults = 11 * 2**20, []
    def work():
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            blocks = [libc.malloc(size) for _ in range(3)]
            for block in blocks:
                ctypes.memset(block, 1, size)
            for block in blocks:
                libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(sum(faults[1:]))
""")


def _faults(mode: str, **env) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", REUSE_PROBE, mode], capture_output=True, text=True, check=True,
                         env={**environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    first, count = out.stdout.split()
    return first, int(count)


def test_a_worker_reuses_freed_blocks_instead_of_faulting_them_in_again():
    pages = 3 * 11 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # a round's
    first, faults = _faults("reuse")
    assert first == "True" and faults < pages // 10, faults  # the blocks' pages stay mapped
    assert _faults("none")[1] >= 3 * pages  # glibc's defaults: given back and faulted in again
    assert _faults("reuse", MALLOC_TRIM_THRESHOLD_="0")[0] == "False"  # the user's setting wins


# A worker's process (re-executed as `mlxq worker` is) allocates a 64 MiB buffer through
# MLX and prints its GLIBC_TUNABLES and how much of its memory sits in huge pages.
HUGE_PROBE = textwrap.dedent("""
    import os
    from mlxq.worker.process import prepare_worker_process
    prepare_worker_process()
    import mlx.core as mx
    mx.set_default_device(mx.cpu)
    buffer = mx.zeros((64 << 20) // 4)
    mx.eval(buffer)
    with open("/proc/self/smaps_rollup") as rollup:
        huge = [line.split()[1] for line in rollup if line.startswith("AnonHugePages")]
    print(os.environ.get("GLIBC_TUNABLES"), huge[0])
""")


def test_a_worker_process_gets_huge_pages_for_large_buffers():
    mode = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.isfile(mode) or "[never]" in open(mode).read():
        pytest.skip("this kernel's transparent huge pages are off")
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("MALLOC_", "MLXQ_")) and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", HUGE_PROBE], capture_output=True, text=True, check=True,
                         env=environ, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    tunables, huge_kb = out.stdout.split()[-2:]
    assert "glibc.malloc.hugetlb=1" in tunables
    assert int(huge_kb) >= 32 * 1024, out.stdout  # most of the 64 MiB in 2 MiB pages


def test_the_users_huge_page_setting_wins():
    from mlxq.worker.memory import HUGE_PAGES, with_huge_pages

    assert with_huge_pages("") == HUGE_PAGES
    assert with_huge_pages("glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"
    assert with_huge_pages("glibc.malloc.check=3") == f"glibc.malloc.check=3:{HUGE_PAGES}"
