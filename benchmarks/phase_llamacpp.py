"""The llamacpp phase (``--llama-server BIN --llama-gguf FILE``): llama.cpp's server on the same requests.

``llama-server`` runs with ``--parallel W`` slots (continuous batching), all
cores (``--threads``, ``--threads-batch``) and a context of W x 512 tokens,
its other settings at their defaults, on a GGUF conversion of the same model
(float32 weights for a comparison at the same precision: see
``benchmarks/README.md``). Every request's prompt, rendered and tokenized as
the worker renders it, goes at once to its ``/completion`` endpoint as token
ids, with the request's ``max_tokens`` and seed at temperature 0.6 (top_k 0,
top_p 1, min_p 0: plain sampling, as in the other phases). Timed from the
first request to the last response, after a warm-up; tokens are the
responses' ``tokens_predicted``. The server's peak RSS is read as it runs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harness import TEMPERATURE, BenchError, PhaseResult, PromptCounter, last_line, log, read_jsonl
from helpers import free_port, read_vmhwm_mb, stop_process, wait_until

SLOT_CONTEXT = 512  # tokens a slot holds: the longest request is ~215 prompt + 128 new
READY_TIMEOUT = 600.0


def run(args: argparse.Namespace, model_dir: Path, requests_file: Path) -> PhaseResult:
    server, gguf = Path(args.llama_server), Path(args.llama_gguf)
    threads = os.cpu_count() or 1
    port = free_port()
    cmd = [str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(args.width), "--ctx-size", str(args.width * SLOT_CONTEXT),
           "--threads", str(threads), "--threads-batch", str(threads), "--no-webui"]
    version = subprocess.run([str(server), "--version"], capture_output=True, text=True)
    commit = re.search(r"commit (\w+)", version.stdout + version.stderr)
    label = f"llama.cpp {commit.group(1) if commit else '(version unknown)'} ({threads} threads)"
    log(f"llamacpp: {' '.join(cmd)}; {args.requests} requests")
    counter = PromptCounter(model_dir)
    requests = read_jsonl(requests_file)
    prompts = [counter.ids(r["messages"]) for r in requests]
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT)
        try:
            return _measure(args, proc, output, port, requests, prompts, label)
        finally:
            stop_process(proc, 60)


def _server_output(output) -> str:
    output.seek(0)
    return output.read().decode("utf-8", "replace")


def _measure(args: argparse.Namespace, proc: subprocess.Popen, output, port: int,
             requests: list[dict[str, Any]], prompts: list[list[int]], label: str) -> PhaseResult:
    import httpx

    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=args.timeout) as client:
        def ready() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"llama-server exited ({proc.returncode}): {last_line(_server_output(output))}")
            try:
                return client.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until("llama-server to answer", ready, READY_TIMEOUT, interval=0.2)

        def complete(prompt: list[int], max_tokens: int, seed: int) -> dict[str, Any]:
            response = client.post("/completion", json={
                "prompt": prompt, "n_predict": max_tokens, "temperature": TEMPERATURE, "top_k": 0,
                "top_p": 1.0, "min_p": 0.0, "seed": seed,
            })
            if response.status_code != 200:
                raise BenchError(f"llama-server answered {response.status_code}: {response.text[:200]}")
            return response.json()

        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            list(pool.map(complete, prompts[:2], [4, 4], [1, 2]))  # warm-up
            start = time.perf_counter()
            answers = list(pool.map(complete, prompts, [r["max_tokens"] for r in requests],
                                    [r.get("seed", args.seed) % 2**32 for r in requests]))
            seconds = time.perf_counter() - start
    peak = read_vmhwm_mb(str(proc.pid))
    return PhaseResult("llamacpp", len(answers), sum(a["tokens_predicted"] for a in answers), seconds,
                       label, {
                           "peak_rss_mb": peak,
                           "prompt_tokens": sum(a["tokens_evaluated"] for a in answers),
                           "prompt_lengths": [len(p) for p in prompts],
                           "completion_lengths": [a["tokens_predicted"] for a in answers],
                       })
