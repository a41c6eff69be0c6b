"""The e2e phase: a job through a real ``mlxq worker`` (Redis, Celery, the engine), timed as a user waits for it.

The worker (``--concurrency W``; ``workers`` of them, for the shared-prefix
workload's ``--workers``) is started and warmed up first; the time is that of
``mlxq submit FILE --wait --json`` until the job has ended. Tokens are
the sum of ``usage.completion_tokens`` in ``mlxq results``. The worker's peak
RSS (VmHWM) is read while it runs; the largest its KV cache and prefix cache
were, the prompt tokens its prefix cache served, the mean number of rows it
decoded per step (up to the last request it admitted) and the engine's time in
prompt processing, in decode steps and, within them, in growing the KV cache
come from its log as it stops; with several workers, the figures are summed
(peak RSS, caches, times) or averaged (rows). ``cached_tokens`` is the job's
own count (``mlxq status``); ``cached_tokens_by_worker`` lists each worker's
logged total, which includes the warm-up's.
"""

from __future__ import annotations

import argparse
import re
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Sequence

from harness import (
    PhaseResult, connect_redis, flush_mlxq_keys, job_results, log, start_worker, submit, warm_up_requests,
    write_jsonl,
)


class Workers:
    """Several workers as one, for :func:`harness.submit`'s health checks."""

    def __init__(self, workers):
        self.workers = list(workers)

    def check_healthy(self) -> None:
        for worker in self.workers:
            worker.check_healthy()


def run(args: argparse.Namespace, model_dir: Path, requests_file: Path, workdir: Path,
        worker_args: Sequence[str] = (), name: str = "e2e", workers: int = 1) -> PhaseResult:
    client = connect_redis(args.redis_url)
    log(f"{name}: flushed {flush_mlxq_keys(client)} mlxq:* keys of {args.redis_url}; "
        f"starting {workers} worker(s) {' '.join(worker_args)}")
    with ExitStack() as stack:
        started = [stack.enter_context(start_worker(args.redis_url, model_dir, args.width,
                                                    workdir / f"{name}-worker{i}.log", *worker_args))
                   for i in range(workers)]
        group = Workers(started)
        blas = started[0].blas()
        warm = submit(args.redis_url, model_dir,
                      write_jsonl(workdir / "warmup.jsonl", warm_up_requests(2 * workers)), group, args.timeout)
        job_results(args.redis_url, warm["job_id"])
        log(f"{name}: {workers} worker(s) ready (BLAS {blas}), warmed up; timing {args.requests} requests")
        start = time.perf_counter()
        job = submit(args.redis_url, model_dir, requests_file, group, args.timeout)
        seconds = time.perf_counter() - start
        peaks = [w.peak_rss_mb() for w in started]
    # Logged by each engine as its worker stops (the `with` has stopped them).
    texts = [w.text() for w in started]

    def logged(pattern: str, cast=float) -> list:
        found = [re.search(pattern, text) for text in texts]
        return [cast(m.group(1)) for m in found if m]

    def total(values: list) -> Optional[float]:
        return sum(values) if values else None

    rows = logged(r"mean rows ([\d.]+) of \d+")
    found = [re.search(r"prompt processing ([\d.]+) s in (\d+) batches, decoding ([\d.]+) s in (\d+) steps, "
                       r"of these growing the KV cache ([\d.]+) s", text) for text in texts]
    sums = [sum(float(m.group(i)) for m in found if m) for i in range(1, 6)] if any(found) else None
    cached = logged(r"(\d+) prompt tokens from the prefix cache", int)
    lines = job_results(args.redis_url, job["job_id"])
    usage = [line["result"]["usage"] for line in lines]
    server_s = (job.get("finished_at") or 0) - (job.get("started_at") or 0)
    return PhaseResult(name, len(lines), sum(u["completion_tokens"] for u in usage), seconds, blas, {
        "peak_rss_mb": total([p for p in peaks if p is not None]),
        "kv_peak_mb": total(logged(r"peak KV cache ([\d.]+) MiB")),
        "prefix_peak_mb": total(logged(r"peak prefix cache ([\d.]+) MiB")),
        "cached_tokens": job.get("cached_tokens"),
        "cached_tokens_by_worker": cached,
        "mean_rows": sum(rows) / len(rows) if rows else None,
        # Engine time by kind (summed over workers): prompt batches and decode steps, and
        # within them the KV cache's growth.
        "engine": None if sums is None else {
            "prefill_s": round(sums[0], 2), "prefill_batches": int(sums[1]), "decode_s": round(sums[2], 2),
            "decode_steps": int(sums[3]), "kv_growth_s": round(sums[4], 2)},
        "workers": workers,
        "responses": [line["result"]["response"] for line in lines],
        "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
        "prompt_lengths": [u["prompt_tokens"] for u in usage],
        "completion_lengths": [u["completion_tokens"] for u in usage],
        "width": args.width,
        "server_seconds": server_s if server_s > 0 else None,
    })
