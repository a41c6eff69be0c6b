"""The worker's few-row matmul: built for this CPU, preloaded ahead of OpenBLAS, run by MLX.

Each check runs MLX in a subprocess preloaded as the worker's process is, and
compares its products with NumPy's in float64.
"""

from __future__ import annotations

import ctypes
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import clean_env
from mlxq.worker.blas import find_openblas
from mlxq.worker.smallgemm import build

SCRIPT = textwrap.dedent("""
    import contextlib, ctypes, json, sys
    import numpy as np
    import mlx.core as mx
    from mlxq.worker.blas import loaded_blas
    from mlxq.worker.smallgemm import decoding

    mx.set_default_device(mx.cpu)
    calls = ctypes.c_ulong.in_dll(ctypes.CDLL(sys.argv[1]), "mlxq_smallgemm_calls")
    rng = np.random.default_rng(0)
    out = {"blas": loaded_blas(), "cases": []}
    inside = decoding if sys.argv[3] == "decoding" else contextlib.nullcontext
    for m, n, k, kind in json.loads(sys.argv[2]):
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        c = rng.standard_normal((m, n), dtype=np.float32)
        want = x.astype(np.float64) @ w.astype(np.float64).T
        before = calls.value
        with inside():
            if kind == "x @ w.T":
                got = np.array(mx.array(x) @ mx.array(w).T)
            elif kind == "x @ v":  # V as it is stored (no transpose), as attention's weights times values
                got = np.array(mx.array(x) @ mx.array(np.ascontiguousarray(w.T)))
            elif kind == "batched":  # attention's scores: rows x heads x 1 query (m of them) over each one's keys
                q = mx.array(x).reshape(m // 4, 4, 1, k)
                keys = mx.array(np.broadcast_to(w, (m, n, k)).reshape(m // 4, 4, n, k))
                got = np.array(q @ keys.swapaxes(-1, -2)).reshape(m, n)
            elif kind == "addmm":  # the bias of a linear layer: alpha and beta reach the kernel
                got = np.array(mx.addmm(mx.array(c), mx.array(x), mx.array(w).T, alpha=0.5, beta=2.0))
                want = 0.5 * want + 2.0 * c
            else:  # "x.T.T @ w.T": X handed over transposed, which the kernel leaves to OpenBLAS
                got = np.array(mx.array(np.ascontiguousarray(x.T)).T @ mx.array(w).T)
            taken = calls.value - before
            # Each row alone, bit for bit as in the batch: a result does not depend on the other rows.
            if kind == "x @ w.T":
                alone = [np.array(mx.array(x[i:i + 1]) @ mx.array(w).T) for i in range(m)]
            elif kind == "x @ v":
                alone = [np.array(mx.array(x[i:i + 1]) @ mx.array(np.ascontiguousarray(w.T))) for i in range(m)]
            else:
                alone = []
        out["cases"].append({
            "case": [m, n, k, kind], "taken": taken,
            "error": float(np.abs(got - want).max() / np.sqrt(k)),
            "rows_alone_identical": all((a[0] == g).all() for a, g in zip(alone, got)),
        })
    print(json.dumps(out))
""")

OURS = [  # K from 256, any rows: tails of K (not a multiple of 16 or 8), of N (not of 6) and of M (not of 4 or 2)
    (1, 6, 256, "x @ w.T"), (3, 7, 256, "x @ w.T"), (4, 12, 300, "x @ w.T"), (5, 100, 1040, "x @ w.T"),
    (31, 1024, 1024, "x @ w.T"), (32, 97, 512, "x @ w.T"), (33, 64, 272, "x @ w.T"), (64, 130, 257, "x @ w.T"),
    (130, 70, 512, "x @ w.T"), (2, 9, 264, "x @ w.T"), (9, 11, 520, "x @ w.T"), (7, 200, 512, "addmm"),
    (18, 13, 2604, "x @ w.T"), (16, 20, 1024, "addmm"),  # several chunks of K, and one whole
]
# A decode step's attention, a row's head at a time (up to 8 queries: heads per KV head): scores over
# the keys (K of the head's size, under 256) and weights times the values (V as stored), with the tails
# of K, of N and of the vector blocks of N.
FEW = [(1, 208, 64, "x @ w.T"), (8, 64, 255, "x @ w.T"), (3, 7, 100, "x @ w.T"), (2, 5, 1, "x @ w.T"),
       (1, 64, 208, "x @ v"), (3, 70, 50, "x @ v"), (2, 200, 33, "x @ v"), (8, 5, 300, "x @ v"),
       (1, 130, 64, "x @ v")]
# More queries than that, and X handed over transposed.
OPENBLAS = [(9, 64, 64, "x @ w.T"), (9, 64, 100, "x @ v"), (8, 64, 512, "x.T.T @ w.T")]


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="module", params=["native", "avx2"])
def library(request, tmp_path_factory):
    """The kernel as built for this CPU, and its AVX2 variant where this CPU has AVX-512 (so both get tested)."""
    openblas = find_openblas(openmp_first=True)  # as the worker preloads it beside the kernel
    if openblas is None:
        pytest.skip("OpenBLAS is not installed")
    extra = []
    if request.param == "avx2":
        if "avx512f" not in _cpu_flags():
            pytest.skip("no AVX-512 here: the native build is the AVX2 one")
        extra = ["-mno-avx512f"]
    path = build(tmp_path_factory.mktemp("smallgemm"), extra_flags=extra)
    if path is None:
        pytest.skip("the few-row matmul does not build here (it needs x86-64 with AVX-512 or AVX2, and a C compiler)")
    return path, openblas


def _run(library, cases, where="decoding"):
    path, openblas = library
    done = subprocess.run([sys.executable, "-c", SCRIPT, path, json.dumps(cases), where], capture_output=True, text=True,
                          timeout=300, env=clean_env(preload=f"{path}:{openblas}"))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_library_is_built_once_and_found_again(tmp_path):
    first = build(tmp_path)
    if first is None:
        pytest.skip("the few-row matmul does not build here")
    built = (tmp_path / first.rsplit("/", 1)[-1]).stat().st_mtime_ns
    assert build(tmp_path) == first
    assert (tmp_path / first.rsplit("/", 1)[-1]).stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [first.rsplit("/", 1)[-1]]  # no partial file left


def test_few_row_products_are_exact_and_do_not_depend_on_the_other_rows(library):
    out = _run(library, OURS + FEW + OPENBLAS)
    assert out["blas"] == "openblas+smallgemm"
    for case in out["cases"]:
        assert case["error"] < 1e-5, case
        m, n, k, kind = case["case"]
        if (m, n, k, kind) in OURS + FEW:
            assert case["taken"] == 1, case
        else:
            assert case["taken"] == 0, case
        if kind in ("x @ w.T", "x @ v") and (m, n, k, kind) in OURS + FEW:
            assert case["rows_alone_identical"], case


def test_attention_scores_batched_by_head_are_one_product_each(library):
    out = _run(library, [(12, 208, 64, "batched"), (4, 300, 128, "batched")])
    assert [c["taken"] for c in out["cases"]] == [12, 4]
    assert all(c["error"] < 1e-5 for c in out["cases"])


@pytest.mark.parametrize("skip, stride, k", [(0, 512, 300), (1, 512, 300), (4, 512, 300), (15, 512, 300),
                                           (3, 523, 300), (6, 512, 512), (1, 528, 512), (15, 1024, 1024)])
def test_any_alignment_and_row_stride_of_the_weight(library, skip, stride, k):
    """Called as cblas_sgemm directly: W's rows at every offset from a cache line, and a stride off 16 floats.

    With K and the stride multiples of 16, the blocks of K start before each row of W does, at a
    line: the memory around W's rows is NaN, which a block read past a row would carry into C.
    """
    lib = ctypes.CDLL(library[0])
    ctypes.c_int.in_dll(lib, "mlxq_smallgemm_rows").value = 64
    calls = ctypes.c_ulong.in_dll(lib, "mlxq_smallgemm_calls")
    m, n = 5, 40
    rng = np.random.default_rng(skip)
    x = rng.standard_normal((m, k), dtype=np.float32)
    wide = np.full(n * stride + 64, np.nan, dtype=np.float32)
    start = (-wide.ctypes.data // 4) % 16 + skip  # floats past a 64-byte boundary
    w = np.lib.stride_tricks.as_strided(wide[start:], (n, k), (stride * 4, 4))
    w[...] = rng.standard_normal((n, k), dtype=np.float32)
    c = np.full((m, n), np.nan, dtype=np.float32)
    f = ctypes.POINTER(ctypes.c_float)
    before = calls.value
    lib.cblas_sgemm(101, 111, 112, m, n, k, ctypes.c_float(1.0), x.ctypes.data_as(f), k,
                    wide[start:].ctypes.data_as(f), stride, ctypes.c_float(0.0), c.ctypes.data_as(f), n)
    assert calls.value == before + 1
    np.testing.assert_allclose(c, x.astype(np.float64) @ w.astype(np.float64).T, rtol=1e-5, atol=1e-4)


def test_outside_a_decode_step_every_product_goes_to_openblas(library):
    out = _run(library, [(8, 64, 512, "x @ w.T"), (1, 1024, 1024, "addmm")], where="outside")
    assert [c["taken"] for c in out["cases"]] == [0, 0]
    assert all(c["error"] < 1e-5 for c in out["cases"])


def test_it_is_not_built_when_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXQ_SMALL_GEMM", "0")
    assert build(tmp_path) is None and list(tmp_path.iterdir()) == []


def test_without_a_compiler_or_with_one_that_fails_it_warns_and_leaves_nothing(tmp_path, monkeypatch, caplog):
    flags = _cpu_flags()
    if platform.machine() != "x86_64" or ("avx512f" not in flags and not {"avx2", "fma"} <= flags):
        pytest.skip("not x86-64 Linux with AVX-512 or AVX2: the build stops before looking for a compiler")
    cache = tmp_path / "cache"
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    monkeypatch.delenv("CC", raising=False)
    with caplog.at_level("WARNING", logger="mlxq.worker.smallgemm"):
        assert build(cache) is None
    assert "no C compiler" in caplog.text and not cache.exists()
    caplog.clear()
    monkeypatch.setenv("CC", "/bin/false")  # runs, fails: --version prints nothing, compiling exits 1
    with caplog.at_level("WARNING", logger="mlxq.worker.smallgemm"):
        assert build(cache) is None
    assert "compiling smallgemm.c failed" in caplog.text and list(cache.iterdir()) == []
