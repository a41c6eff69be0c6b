"""Full rows: a worker holds --backlog requests ready beyond its --concurrency rows (real worker, tiny model)."""

from __future__ import annotations

import json
import re

import pytest

from helpers import WorkerProcess, run_mlxq, wait_until, write_jsonl
from mlxq.jobs.models import JobStatus
from mlxq.jobs.store import JobStore
from redisproc import RedisProc

pytestmark = pytest.mark.slow


@pytest.fixture
def private_redis(tmp_path):
    """A Redis of this test's own: no other worker (the session's in-process one) takes its requests."""
    server = RedisProc(tmp_path / "redis").start()
    try:
        yield server.url
    finally:
        server.kill()


def test_a_worker_holds_its_backlog_ready_and_keeps_its_rows_full(private_redis, tiny_model, tmp_path):
    redis_url = private_redis
    store = JobStore.from_url(redis_url)
    rows = [{"prompt": f"story {i % 5 * 6 + 1}", "max_tokens": 60, "temperature": 0} for i in range(16)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with WorkerProcess(redis_url, tiny_model, tmp_path / "worker.log", "--backlog", "3", concurrency=2) as worker:
        worker.wait_ready(120)
        out = run_mlxq("submit", str(path), "--model", str(tiny_model), "--json", redis_url=redis_url)
        assert out.returncode == 0, out.stderr
        job = json.loads(out.stdout)["job_id"]
        seen = []

        def status():
            info = store.info(job)
            seen.append(info.running)
            return info

        # Two rows decode and three requests wait in the engine, tokenized: five are running.
        wait_until("rows and backlog to fill", lambda: status().running == 5, 120, 0.02)
        wait_until("the job to end", lambda: status().status == JobStatus.COMPLETED, 300, 0.02)
        assert max(seen) == 5
        worker.stop()
        logged = re.search(r"mean rows ([\d.]+) of 2", worker.text())
        assert logged, worker.text()[-2000:]
        # While requests were still coming, a freed row was refilled from the backlog at once.
        assert float(logged.group(1)) >= 1.5
        # The job's time in the engine, by kind (benchmarks/phase_e2e.py reads it).
        split = re.search(r"prompt processing ([\d.]+) s in (\d+) batches, decoding ([\d.]+) s in (\d+) steps, "
                          r"of these growing the KV cache ([\d.]+) s", worker.text())
        assert split, worker.text()[-2000:]
        prefill, batches, decode, steps, growth = (float(x) for x in split.groups())
        assert prefill > 0 and batches >= 1 and decode > 0 and steps >= 1
        assert 0 <= growth <= prefill + decode
