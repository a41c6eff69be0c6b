"""The few-row matmul, two builds side by side: one token's products of a model shape, paired.

Compares ``worker/smallgemm.c`` as it is in the working tree (B) with the same
file at a git revision (A, ``--base``, default ``HEAD``; ``.`` for the working
tree's), each with extra compiler flags if given (``--base-flags``, ``--flags``). It times the products a decode step runs: every projection of
every layer and the output layer, ``--rows`` rows, with a weight of its own
per layer so that they stream from memory as in a step. It runs in one process
with OpenBLAS's OpenMP build and malloc's huge pages, as the worker has them,
calling each build's ``cblas_sgemm`` through ctypes.

The builds run in turns, A, B, then A again from a second copy of the same
build (the A/A control). The figure is the median of the turns' time ratios
over A, with their quartiles. On these shared machines one build's time varies
by up to 1.3x between runs minutes apart, while paired ratios hold within a few
percent: trust a ratio only where it is further from 1 than the control's.

    .venv/bin/python benchmarks/kernel_ab.py --base HEAD~1 --rows 32
    .venv/bin/python benchmarks/kernel_ab.py --base . --base-flags=-DKC=512 --rows 8 --turns 20
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SOURCE = REPO / "worker" / "smallgemm.c"
sys.path.append(str(REPO / "tests"))
sys.path.append(str(BENCH))


def _build(source_text: str, flags: list[str], out: Path) -> None:
    """The library built from ``source_text`` as the worker builds its own (``smallgemm.build``'s flags)."""
    from mlxq.worker.smallgemm import FLAGS, _compiler

    cc = _compiler()
    if cc is None:
        sys.exit("kernel_ab: no C compiler (cc or gcc)")
    src = out.with_suffix(".c")
    src.write_text(source_text)
    done = subprocess.run([cc, *FLAGS, *flags, "-o", str(out), str(src), "-ldl", "-lm"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"kernel_ab: compiling {out.name} failed:\n{done.stderr.strip()[-2000:]}")


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    v = sorted(values)
    return v[len(v) // 4], v[len(v) // 2], v[(3 * len(v)) // 4]


def measure(libraries: list[str], rows: int, shape: str, turns: int) -> dict:
    """Each library's time for one token's products, turn by turn (in this process)."""
    import mlx.core as mx
    import numpy as np
    from modelfactory import SHAPES
    from phase_gemm import matmul_shapes

    shapes = matmul_shapes(SHAPES[shape])  # "small" and "0.5b" have a fixed vocabulary
    rng = np.random.default_rng(0)
    # In MLX's memory, as the model's are: their alignment to cache lines matters to the kernel.
    arrays = [mx.array(rng.random((n, k), dtype=np.float32) - 0.5) for n, k in shapes]
    mx.eval(arrays)
    weights = [np.array(w, copy=False) for w in arrays]
    inputs = {k: rng.random((rows, k), dtype=np.float32) - 0.5 for k in {k for _, k in shapes}}
    outputs = [np.empty((rows, n), np.float32) for n, _ in shapes]
    flops = sum(2 * rows * n * k for n, k in shapes)
    pointer = ctypes.c_void_p
    kernels = []
    for path in libraries:
        lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
        kernels.append((lib.cblas_sgemm, ctypes.c_int.in_dll(lib, "mlxq_smallgemm_rows")))

    def one_token(sgemm, limit) -> float:
        limit.value = 1 << 30
        start = time.perf_counter()
        for w, c, (n, k) in zip(weights, outputs, shapes):
            x = inputs[k]
            sgemm(101, 111, 112, rows, n, k, ctypes.c_float(1.0), pointer(x.ctypes.data), k,
                  pointer(w.ctypes.data), k, ctypes.c_float(0.0), pointer(c.ctypes.data), n)
        seconds = time.perf_counter() - start
        limit.value = 0
        return seconds

    for sgemm, limit in kernels:  # warm-up turn
        one_token(sgemm, limit)
    times = [[one_token(sgemm, limit) for sgemm, limit in kernels] for _ in range(turns)]
    return {"flops": flops, "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--base", default="HEAD",
                        help="git revision of A's smallgemm.c, or . for the working tree's (default: HEAD)")
    parser.add_argument("--base-flags", default="", help="extra compiler flags for A")
    parser.add_argument("--flags", default="", help="extra compiler flags for B (the working tree's file)")
    parser.add_argument("--rows", type=int, default=32, help="rows of activations (default: 32)")
    parser.add_argument("--shape", default="0.5b", choices=["small", "0.5b"], help="model shape (default: 0.5b)")
    parser.add_argument("--turns", type=int, default=16, help="turns of A, B, A (default: 16)")
    parser.add_argument("--threads", type=int, default=2, help="OpenMP threads (default: 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)  # the child process's libraries
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(args.measure, args.rows, args.shape, args.turns)))
        return

    from harness import huge_pages_env
    from mlxq.worker.blas import find_openblas

    openblas = find_openblas(openmp_first=True)
    if openblas is None:
        sys.exit("kernel_ab: OpenBLAS is not installed (bash .ci/setup installs it)")
    try:
        base_text = SOURCE.read_text() if args.base == "." else subprocess.run(
            ["git", "show", f"{args.base}:worker/smallgemm.c"], cwd=REPO, check=True, capture_output=True,
            text=True).stdout
    except subprocess.CalledProcessError as exc:
        sys.exit(f"kernel_ab: git show {args.base}:worker/smallgemm.c failed: {exc.stderr.strip()}")
    with tempfile.TemporaryDirectory(prefix="mlxq-kernel-ab-") as tmp:
        a, b, again = Path(tmp, "a.so"), Path(tmp, "b.so"), Path(tmp, "a2.so")
        _build(base_text, shlex.split(args.base_flags), a)
        _build(SOURCE.read_text(), shlex.split(args.flags), b)
        shutil.copy(a, again)
        env = {**os.environ, "LD_PRELOAD": openblas, "OMP_NUM_THREADS": str(args.threads),
               **huge_pages_env()}
        done = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--shape", args.shape,
                               "--turns", str(args.turns), "--measure", str(a), str(b), str(again)],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"kernel_ab: the measurement failed:\n{done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout)
    times, flops = result["times"], result["flops"]
    report = {"rows": args.rows, "shape": args.shape, "turns": args.turns, "threads": args.threads,
              "base": args.base, "base_flags": args.base_flags, "flags": args.flags}
    for i, name in ((0, "a"), (1, "b"), (2, "a_again")):
        low, median, high = _quartiles([t[i] for t in times])
        report[f"{name}_ms"] = round(median * 1000, 1)
        report[f"{name}_gflops"] = round(flops / median / 1e9, 1)
        if i:
            q = _quartiles([t[i] / t[0] for t in times])
            report[f"{name}_over_a"] = [round(r, 3) for r in q]
    if args.json:
        print(json.dumps(report))
        return
    print(f"one token's products of the {args.shape} shape at {args.rows} rows, {args.turns} turns, "
          f"{args.threads} threads; median time (GFLOP/s):")
    print(f"  A  {args.base} {args.base_flags}: {report['a_ms']} ms ({report['a_gflops']})")
    print(f"  B  working tree {args.flags}: {report['b_ms']} ms ({report['b_gflops']})")
    print(f"  A' A built again: {report['a_again_ms']} ms ({report['a_again_gflops']})")
    for name, label in (("b", "B/A "), ("a_again", "A'/A")):
        low, median, high = report[f"{name}_over_a"]
        print(f"  {label} time ratio, median of turns {median} (quartiles {low}-{high})")


if __name__ == "__main__":
    main()
