"""The raw phase: mlx-lm's ``batch_generate`` with what the worker uses.

float32 on the CPU, OpenBLAS preloaded (with the kernels, and malloc's huge
pages, the worker has), ``completion_batch_size=W``, the same chat rendering
and ``max_tokens``, ``make_sampler(temp=0.6)``. Only generation is timed
(after loading and a small warm-up).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from harness import (
    MB, TEMPERATURE, PhaseResult, clean_env, huge_pages_env, load_prompts, log, mapped_blas, own_peak_rss_mb,
    phase_main, run_phase,
)


def run(args: argparse.Namespace, model_dir: Path, requests_file: Path) -> PhaseResult:
    from mlxq.worker.blas import find_openblas, openblas_env

    openblas = find_openblas()
    if openblas is None:
        log("warning: OpenBLAS not found; the raw phase (like the worker) uses the reference BLAS")
    log(f"raw: batch_generate, {args.requests} requests, width {args.width}")
    env = clean_env(preload=openblas, **openblas_env(openblas), **huge_pages_env())
    return run_phase("raw", model_dir, requests_file, env, args.timeout, width=args.width, seed=args.seed)


def measure(opts: argparse.Namespace) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm import batch_generate, load
    from mlx_lm.sample_utils import make_sampler

    mx.set_default_device(mx.cpu)
    model, tokenizer = load(str(opts.model_dir))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    prompts, max_tokens, _ = load_prompts(tokenizer, opts.requests_file)
    options = {
        "sampler": make_sampler(temp=TEMPERATURE),
        "completion_batch_size": opts.width,
        "prefill_batch_size": min(opts.width, 8),
        "prefill_step_size": 512,  # the worker's slot batch prefills in chunks of 512 tokens too
    }
    mx.random.seed(opts.seed)
    batch_generate(model, tokenizer, prompts[:2], max_tokens=4, **options)
    start = time.perf_counter()
    response = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, **options)
    seconds = time.perf_counter() - start
    return {
        "requests": len(prompts), "tokens": response.stats.generation_tokens, "seconds": seconds,
        "blas": mapped_blas(), "prompt_tokens": sum(map(len, prompts)),
        "prefill_seconds": response.stats.prompt_time, "peak_rss_mb": own_peak_rss_mb(),
        "mlx_peak_mb": mx.get_peak_memory() / MB,
    }


if __name__ == "__main__":
    phase_main(measure)
