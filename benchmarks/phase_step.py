"""The step phase: where a decode step's time goes, in a process like the worker's.

The first ``--width`` requests are prefilled into a slot batch (the worker's
engine: its few-row matmul and OpenBLAS preloaded, float32, the compiled SiLU), which then decodes
``STEPS`` steps at the standard workload's temperature. Timed apart, on the
same rows: the whole step (``decode_step_ms``), the model's forward pass alone
(``decode_forward_ms``), attention alone (as the step runs it, on every
layer's keys and values, ``decode_attention_ms``) and sampling (``decode_sampling_ms``).
The matmuls' share is set against the gemm phase's rate at the same width.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from harness import (
    TEMPERATURE, PhaseResult, clean_env, huge_pages_env, load_prompts, log, mapped_blas, phase_main, run_phase,
)

STEPS = 8


def run(args: argparse.Namespace, model_dir: Path, requests_file: Path) -> PhaseResult:
    from mlxq.worker.blas import fast_blas_env

    log(f"step: a decode step of {args.width} rows, in parts")
    return run_phase("step", model_dir, requests_file, clean_env(**fast_blas_env(), **huge_pages_env()), args.timeout,
                     width=args.width, seed=args.seed)


def measure(opts: argparse.Namespace) -> dict[str, Any]:
    from mlxq.worker.memory import limit_malloc_arenas, reuse_freed_memory

    limit_malloc_arenas()  # as the worker's process does
    reuse_freed_memory()
    import mlx.core as mx
    import numpy as np

    from mlxq.worker.model import load_model
    from mlxq.worker.sampling import make_request_sampler, sample
    from mlxq.worker.slots import SlotBatch, slot_attention
    from mlxq.worker.smallgemm import decoding

    loaded = load_model(str(opts.model_dir), force_cpu=True)
    model = loaded.model
    prompts, max_tokens, seeds = load_prompts(loaded.tokenizer, opts.requests_file)
    prompts, seeds = prompts[:opts.width], seeds[:opts.width]
    batch = SlotBatch(model, width=len(prompts))
    batch.insert(prompts, [make_request_sampler(TEMPERATURE, None, None, s) for s in seeds],
                 max_tokens=max_tokens[:len(prompts)])
    while batch.waiting:
        batch.next()
    batch.next()
    rows = batch.rows

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(STEPS):
            fn()
        return (time.perf_counter() - start) / STEPS * 1000

    step_ms = timed(batch.next)

    def forward():
        with decoding():  # as the engine's step runs it
            logits = batch.forward()
            mx.eval(logits)
        return logits

    forward_ms = timed(forward)
    logits = forward()
    sampling_ms = timed(lambda: sample(np.array(logits, copy=False), [r.sampler for r in rows]))
    # Attention as the step runs it (slot_attention, over the caches as forward left them).
    first = batch.caches[0]
    fetch = first._fetch
    heads, head_dim = model.layers[0].self_attn.n_heads, first.keys.shape[-1]
    queries = mx.random.normal((len(rows), heads, 1, head_dim))
    mask = first.make_mask(1)
    mx.eval(queries, mask)

    def attention():
        mx.eval([slot_attention(queries, c.keys[:len(rows), :, :fetch], c.values[:len(rows), :, :fetch], cache=c,
                                scale=head_dim ** -0.5, mask=mask) for c in batch.caches])

    with decoding():  # as the step runs it
        attention_ms = timed(attention)
    return {"requests": len(rows), "tokens": 0, "seconds": step_ms / 1000, "blas": mapped_blas(),
            "decode_step_ms": step_ms, "decode_forward_ms": forward_ms, "decode_attention_ms": attention_ms,
            "decode_sampling_ms": sampling_ms, "decode_context": fetch}


if __name__ == "__main__":
    phase_main(measure)
