"""Workers you can see: heartbeat entries, ``mlxq workers``, and jobs that say when no worker serves them."""

from __future__ import annotations

import json
import subprocess

from celery import Celery

from helpers import MLXQ, ROOT, WorkerProcess, clean_env, run_cli, wait_until, write_jsonl
from mlxq.jobs.workers import WORKERS
from mlxq.worker.app import broker_url
from mlxq.worker.smallgemm import build, cpu_flags


def test_an_entry_lives_while_it_beats_and_says_how_far_its_clock_is(store, redis_client):
    registry = store.workers
    mine = lambda: [w for w in registry.live() if w.name in ("w1@a", "w2@b")]  # noqa: E731 - not other tests' workers
    now = store.clock()
    registry.beat("w1@a", {"host": "a", "pid": 1, "model": "m1", "in_flight": 3}, ttl=1, clock=now + 600)
    registry.beat("w2@b", {"host": "b", "pid": 2, "model": "./m2"}, ttl=60, clock=now)
    [w1, w2] = mine()
    assert (w1.name, w1.host, w1.pid, w1.model, w1.in_flight) == ("w1@a", "a", 1, "m1", 3)
    assert 599 < w1.clock_skew < 601 and abs(w2.clock_skew) < 1
    assert w1.started <= w1.last_seen and abs(w1.last_seen - store.clock()) < 5
    assert [w.name for w in registry.live("m1")] == ["w1@a"]
    # Gone three beats after the last: the key expired, and listing forgets the name.
    wait_until("w1's entry to expire", lambda: [w.name for w in mine()] == ["w2@b"], 10)
    assert b"w1@a" not in redis_client.smembers(WORKERS)
    registry.remove("w2@b")
    assert mine() == []


def test_a_worker_lists_itself_while_it_runs_and_leaves_when_it_stops(tmp_path, redis_client, redis_url,
                                                                      tiny_model):
    def listed(proc):  # the in-process worker of other tests may be listed too
        out = run_cli(redis_url, "workers", "--json")
        assert out.exit_code == 0, out.output
        return [w for w in json.loads(out.stdout) if w["pid"] == proc.pid]

    with WorkerProcess(redis_url, tiny_model, tmp_path / "a.log", "--heartbeat", "0.5") as stopped, \
            WorkerProcess(redis_url, tiny_model, tmp_path / "b.log", "--heartbeat", "0.5") as killed:
        for proc in (stopped, killed):
            proc.wait_ready()
            [w] = wait_until("the worker's entry", lambda: [w for w in listed(proc) if w["state"] == "ready"], 30)
            assert w["model"] == str(tiny_model) and w["name"] == f"mlxq-{proc.pid}@{w['host']}"
            assert (w["device"], w["dtype"], w["blas"], w["concurrency"], w["in_flight"]) == (
                "cpu", "float32", proc.blas(), 4, 0)
            # OpenBLAS, with the few-row matmul ahead of it where it builds (x86-64 with AVX-512 or AVX2, a C compiler).
            assert proc.blas() == ("openblas+smallgemm" if build() else "openblas")
            # OpenBLAS's vector kernels wherever the CPU has them, whatever core OpenBLAS took it for.
            if {"avx2", "fma"} <= cpu_flags():
                assert proc.openblas_kernels().lower() in ("haswell", "zen", "skylakex", "cooperlake",
                                                           "sapphirerapids"), proc.text()
        out = run_cli(redis_url, "workers")
        assert f"mlxq-{stopped.pid}@" in out.stdout and "in flight 0/4" in out.stdout
        # Celery's remote control (what Flower and `celery inspect` use) answers under the same name.
        control = Celery(broker=broker_url(redis_url))
        try:
            names = wait_until("the workers to answer a ping", lambda: (
                found := {n for reply in control.control.ping(timeout=1) for n in reply}) >= {
                    f"mlxq-{p.pid}@{w['host']}" for p in (stopped, killed)} and found, 30)
        finally:
            control.close()
        assert names >= {w["name"] for p in (stopped, killed) for w in listed(p)}
        stopped.stop()
        assert listed(stopped) == []  # a clean stop removes the entry at once
        killed.kill()
        wait_until("a killed worker's entry to expire", lambda: listed(killed) == [], 15)


def test_a_job_no_worker_serves_says_so_wherever_it_is_waited_on(tmp_path, redis_client, redis_url):
    model = "./no-such-model"
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi", "max_tokens": 2}])
    hint = f"no live worker serves model {model}; start one with: mlxq worker --model {model}"
    env = clean_env()
    waiting = subprocess.Popen([*MLXQ, "--redis-url", redis_url, "submit", str(path), "--model", model, "--wait"],
                               cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    following = None
    try:
        job = wait_until("the job id", lambda: waiting.stdout.readline().strip(), 60)
        following = subprocess.Popen([*MLXQ, "--redis-url", redis_url, "stream", job], cwd=ROOT, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        out = run_cli(redis_url, "status", job)
        assert out.exit_code == 0 and hint in out.stdout, out.output
        out = run_cli(redis_url, "status", job, "--json")
        assert json.loads(out.stdout)["workers"] == 0
        first = wait_until("submit --wait to say so", lambda: waiting.stderr.readline(), 60)
        assert first.strip() == f"mlxq: job {job}: {hint}"
        first = wait_until("stream to say so", lambda: following.stderr.readline(), 60)
        assert first.strip() == f"mlxq: job {job}: {hint}"
        assert run_cli(redis_url, "cancel", job).exit_code == 0  # nothing runs: the job ends
        assert waiting.wait(60) == 0 and following.wait(60) == 0
    finally:
        for proc in (waiting, following):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_status_counts_the_workers_of_the_jobs_model(tmp_path, redis_client, redis_url, tiny_model, worker):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi", "max_tokens": 2}])
    out = run_cli(redis_url, "submit", str(path), "--model", str(tiny_model), "--wait", "--json")
    job = json.loads(out.stdout.splitlines()[-1])["job_id"]
    # Tests clear Redis between them: the in-process worker's entry comes back at its next beat.
    status = wait_until("the worker's next beat", lambda: (
        s := json.loads(run_cli(redis_url, "status", job, "--json").stdout))["workers"] and s, 30, 0.2)
    assert status["workers"] == 1 and status["status"] == "completed"
    assert "workers: 1 live serving" in run_cli(redis_url, "status", job).stdout
