"""The stock phase: mlx-lm as pip installs it, one request after another.

mlx's bundled reference BLAS (no preload), ``stream_generate`` (what
``generate`` wraps, which also reports the token count) on the first K
requests.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from harness import TEMPERATURE, PhaseResult, clean_env, load_prompts, log, mapped_blas, phase_main, run_phase


def run(args: argparse.Namespace, model_dir: Path, requests_file: Path) -> PhaseResult:
    count = min(args.stock_requests, args.requests)
    log(f"stock: stream_generate one by one, {count} requests, no preload (slow)")
    return run_phase("stock", model_dir, requests_file, clean_env(), args.timeout, count=count)


def measure(opts: argparse.Namespace) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(opts.model_dir))
    prompts, max_tokens, seeds = (column[:opts.count] for column in load_prompts(tokenizer, opts.requests_file))
    sampler = make_sampler(temp=TEMPERATURE)
    warm_text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                              add_generation_prompt=True)
    warm = list(tokenizer.encode(warm_text, add_special_tokens=False))
    for _ in stream_generate(model, tokenizer, warm, max_tokens=2, sampler=sampler):
        pass
    tokens, prefill = 0, 0.0
    start = time.perf_counter()
    for prompt, limit, seed in zip(prompts, max_tokens, seeds):
        mx.random.seed(seed)
        for last in stream_generate(model, tokenizer, prompt, max_tokens=limit, sampler=sampler):
            pass
        tokens += last.generation_tokens
        prefill += last.prompt_tokens / last.prompt_tps if last.prompt_tps else 0.0
    seconds = time.perf_counter() - start
    return {
        "requests": len(prompts), "tokens": tokens, "seconds": seconds, "blas": mapped_blas(),
        "prompt_tokens": sum(map(len, prompts)), "prefill_seconds": prefill,
    }


if __name__ == "__main__":
    phase_main(measure)
