"""The e2e phase: a job through a real ``mlxq worker`` (Redis, Celery, the engine), timed as a user waits for it.

The worker (``--concurrency W``) is started and warmed up first; the time is
that of ``mlxq submit FILE --wait --json`` until the job has ended. Tokens are
the sum of ``usage.completion_tokens`` in ``mlxq results``. The worker's peak
RSS (VmHWM) is read while it runs, and the largest its KV cache was from its
log as it stops.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from harness import (
    PhaseResult, connect_redis, flush_mlxq_keys, job_results, log, start_worker, submit, warm_up_requests,
    write_jsonl,
)


def run(args: argparse.Namespace, model_dir: Path, requests_file: Path, workdir: Path) -> PhaseResult:
    client = connect_redis(args.redis_url)
    log(f"e2e: flushed {flush_mlxq_keys(client)} mlxq:* keys of {args.redis_url}; starting the worker")
    with start_worker(args.redis_url, model_dir, args.width, workdir / "worker.log") as worker:
        blas = worker.blas()
        warm = submit(args.redis_url, model_dir, write_jsonl(workdir / "warmup.jsonl", warm_up_requests()),
                      worker, args.timeout)
        job_results(args.redis_url, warm["job_id"])
        log(f"e2e: worker ready (BLAS {blas}), warmed up; timing {args.requests} requests")
        start = time.perf_counter()
        job = submit(args.redis_url, model_dir, requests_file, worker, args.timeout)
        seconds = time.perf_counter() - start
        peak_rss = worker.peak_rss_mb()
    # Logged by the engine as the worker stops (the `with` has stopped it).
    kv_logged = re.search(r"peak KV cache ([\d.]+) MiB", worker.text())
    lines = job_results(args.redis_url, job["job_id"])
    usage = [line["result"]["usage"] for line in lines]
    server_s = (job.get("finished_at") or 0) - (job.get("started_at") or 0)
    return PhaseResult("e2e", len(lines), sum(u["completion_tokens"] for u in usage), seconds, blas, {
        "peak_rss_mb": peak_rss,
        "kv_peak_mb": float(kv_logged.group(1)) if kv_logged else None,
        "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
        "prompt_lengths": [u["prompt_tokens"] for u in usage],
        "server_seconds": server_s if server_s > 0 else None,
    })
