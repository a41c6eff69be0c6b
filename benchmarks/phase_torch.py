"""The torch phase (``--torch``): PyTorch on the CPU with transformers ``generate``, measured in the same run.

Static batches of W in request order, left-padded, sampling at temperature
0.6 (top_p 1, top_k 0), all CPU threads. Each batch runs until its longest
``max_tokens``; a row's tokens count up to its own ``max_tokens`` or its first
end token, as mlxq's usage does. Needs ``pip install torch==2.13.0 transformers``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Sequence

from harness import TEMPERATURE, PhaseResult, clean_env, load_prompts, log, own_peak_rss_mb, phase_main, run_phase


def run(args: argparse.Namespace, model_dir: Path, requests_file: Path) -> PhaseResult:
    log(f"torch: transformers generate, {args.requests} requests, static batches of {args.width}")
    return run_phase("torch", model_dir, requests_file, clean_env(), args.timeout, width=args.width, seed=args.seed)


def measure(opts: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(opts.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(opts.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(opts.model_dir), dtype=torch.float32).eval()
    prompts, max_tokens, _ = load_prompts(tokenizer, opts.requests_file)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    pad = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None else min(eos)

    def run_batch(batch: Sequence[list[int]], limits: Sequence[int]) -> int:
        longest = max(map(len, batch))
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(limits), min_new_tokens=0,
                                 do_sample=True, temperature=TEMPERATURE, top_p=1.0, top_k=0, pad_token_id=pad)
        count = 0
        for row, limit in zip(out[:, longest:].tolist(), limits):
            row = row[:limit]
            ends = [i for i, t in enumerate(row) if t in eos]
            count += ends[0] + 1 if ends else len(row)
        return count

    run_batch(prompts[:2], [4, 4])
    tokens = 0
    start = time.perf_counter()
    for lo in range(0, len(prompts), opts.width):
        tokens += run_batch(prompts[lo:lo + opts.width], max_tokens[lo:lo + opts.width])
    seconds = time.perf_counter() - start
    return {
        "requests": len(prompts), "tokens": tokens, "seconds": seconds,
        "blas": f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "prompt_tokens": sum(map(len, prompts)), "peak_rss_mb": own_peak_rss_mb(),
    }


if __name__ == "__main__":
    phase_main(measure)
