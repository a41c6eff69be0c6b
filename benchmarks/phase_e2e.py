"""The e2e phase: a job through a real ``mlxq worker`` (Redis, Celery, the engine), timed as a user waits for it.

The worker (``--concurrency W``) is started and warmed up first; the time is
that of ``mlxq submit FILE --wait --json`` until the job has ended. Tokens are
the sum of ``usage.completion_tokens`` in ``mlxq results``. The worker's peak
RSS (VmHWM) is read while it runs; the largest its KV cache and prefix cache
were, the prompt tokens its prefix cache served and the mean number of rows it
decoded per step (up to the last request it admitted) come from its log as it
stops.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Sequence

from harness import (
    PhaseResult, connect_redis, flush_mlxq_keys, job_results, log, start_worker, submit, warm_up_requests,
    write_jsonl,
)


def run(args: argparse.Namespace, model_dir: Path, requests_file: Path, workdir: Path,
        worker_args: Sequence[str] = (), name: str = "e2e") -> PhaseResult:
    client = connect_redis(args.redis_url)
    log(f"{name}: flushed {flush_mlxq_keys(client)} mlxq:* keys of {args.redis_url}; "
        f"starting the worker {' '.join(worker_args)}")
    with start_worker(args.redis_url, model_dir, args.width, workdir / f"{name}-worker.log", *worker_args) as worker:
        blas = worker.blas()
        warm = submit(args.redis_url, model_dir, write_jsonl(workdir / "warmup.jsonl", warm_up_requests()),
                      worker, args.timeout)
        job_results(args.redis_url, warm["job_id"])
        log(f"{name}: worker ready (BLAS {blas}), warmed up; timing {args.requests} requests")
        start = time.perf_counter()
        job = submit(args.redis_url, model_dir, requests_file, worker, args.timeout)
        seconds = time.perf_counter() - start
        peak_rss = worker.peak_rss_mb()
    # Logged by the engine as the worker stops (the `with` has stopped it).
    text = worker.text()
    kv_logged = re.search(r"peak KV cache ([\d.]+) MiB", text)
    prefix_logged = re.search(r"peak prefix cache ([\d.]+) MiB", text)
    cached = re.search(r"(\d+) prompt tokens from the prefix cache", text)
    rows = re.search(r"mean rows ([\d.]+) of (\d+)", text)
    lines = job_results(args.redis_url, job["job_id"])
    usage = [line["result"]["usage"] for line in lines]
    server_s = (job.get("finished_at") or 0) - (job.get("started_at") or 0)
    return PhaseResult(name, len(lines), sum(u["completion_tokens"] for u in usage), seconds, blas, {
        "peak_rss_mb": peak_rss,
        "kv_peak_mb": float(kv_logged.group(1)) if kv_logged else None,
        "prefix_peak_mb": float(prefix_logged.group(1)) if prefix_logged else None,
        "cached_tokens": int(cached.group(1)) if cached else None,
        "mean_rows": float(rows.group(1)) if rows else None,
        "responses": [line["result"]["response"] for line in lines],
        "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
        "prompt_lengths": [u["prompt_tokens"] for u in usage],
        "completion_lengths": [u["completion_tokens"] for u in usage],
        "width": args.width,
        "server_seconds": server_s if server_s > 0 else None,
    })
