"""The gemm phase: the machine's practical float32 matmul rate on the model's own shapes.

In a process like the worker's (its few-row matmul and OpenBLAS preloaded, the same threads, MLX on
the CPU), it times the model's projections (attention q, k, v, o; MLP gate, up,
down) and its output layer, each as a product of ``rows x in`` activations with
the weight, at 512 rows (``gemm_gflops``: the peak a step could reach, on
OpenBLAS) and at the decode width (``gemm_gflops_at_width``: what a decode step
of that many rows can reach at best, on the few-row matmul as a decode step
runs them). The weights are random: a product's speed does not
depend on the values.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from harness import PhaseResult, clean_env, huge_pages_env, log, mapped_blas, phase_main, run_phase

PEAK_ROWS = 512


def matmul_shapes(config: dict[str, Any]) -> list[tuple[int, int]]:
    """``(out, in)`` of every weight a token goes through once (the embedding lookup is not a product)."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    inter = config["intermediate_size"]
    layer = [(heads * head_dim, hidden), (kv, hidden), (kv, hidden), (hidden, heads * head_dim),
             (inter, hidden), (inter, hidden), (hidden, inter)]
    return layer * config["num_hidden_layers"] + [(config["vocab_size"], hidden)]


def matmul_params(config: dict[str, Any]) -> int:
    return sum(o * i for o, i in matmul_shapes(config))


def run(args: argparse.Namespace, model_dir: Path, requests_file: Path) -> PhaseResult:
    from mlxq.worker.blas import fast_blas_env

    log(f"gemm: the model's matmul shapes at {PEAK_ROWS} and {args.width} rows")
    return run_phase("gemm", model_dir, requests_file, clean_env(**fast_blas_env(), **huge_pages_env()), args.timeout,
                     width=args.width)


def measure(opts: argparse.Namespace) -> dict[str, Any]:
    from mlxq.worker.memory import limit_malloc_arenas, reuse_freed_memory

    limit_malloc_arenas()  # as the worker's process does
    reuse_freed_memory()
    import mlx.core as mx

    from mlxq.worker.smallgemm import decoding

    mx.set_default_device(mx.cpu)
    config = json.loads((opts.model_dir / "config.json").read_text())
    distinct = sorted(set(matmul_shapes(config)))
    weights = {shape: mx.random.normal(shape) * 0.02 for shape in distinct}
    mx.eval(list(weights.values()))
    params = matmul_params(config)

    def rate(rows: int) -> tuple[float, float]:
        inputs = {i: mx.random.normal((rows, i)) for i in {i for _, i in distinct}}
        mx.eval(list(inputs.values()))
        for shape in distinct:  # warm up
            mx.eval(inputs[shape[1]] @ weights[shape].T)
        start = time.perf_counter()
        for shape in matmul_shapes(config):  # one token's worth of products, in the model's order
            mx.eval(inputs[shape[1]] @ weights[shape].T)
        seconds = time.perf_counter() - start
        return 2 * params * rows / seconds / 1e9, seconds

    best_peak, seconds = max(rate(PEAK_ROWS) for _ in range(3))
    with decoding():  # as a decode step runs them
        at_width = max(rate(opts.width) for _ in range(3))[0]
    return {"requests": 0, "tokens": 0, "seconds": seconds, "blas": mapped_blas(),
            "gemm_gflops": best_peak, "gemm_gflops_at_width": at_width, "matmul_params": params}


if __name__ == "__main__":
    phase_main(measure)
