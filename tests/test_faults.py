"""Faults, done for real: killed workers, a killed Redis, re-deliveries, limits.

Every test here runs its own ``redis-server`` (a free port, a directory in
tmp_path, an AOF fsynced on every write) and real ``mlxq worker``
subprocesses on the tiny model; nothing is mocked. It never touches the
shared Redis of the other tests.

Commands that send tasks (``submit``, ``retry``) run as subprocesses: the
Celery app of this process caches its broker connection, so pointing it at a
private Redis here could send tasks to another test's server.

Prompts: on the tiny model, greedy decoding of "story 1", "story 5",
"story 17", "story 23" and "story 31" runs over 6000 tokens without an end
token, whatever the batch around it, so with max_tokens <= 6000 these requests
reliably take seconds ("length").
"""

from __future__ import annotations

import glob
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from helpers import MLXQ, ROOT, WorkerProcess, clean_env, results_of, run_mlxq, wait_until, write_jsonl
from mlxq.jobs.defaults import DEFAULT_LEASE
from mlxq.jobs.models import JobStatus
from mlxq.jobs.store import JobInfo, JobStore, unsent_key
from redisproc import RedisProc

LONG_PROMPTS = ["story 5", "story 17", "story 31", "story 1", "story 23"]

pytestmark = pytest.mark.slow


def long_rows(n: int, max_tokens: int) -> list[dict]:
    return [{"prompt": LONG_PROMPTS[i % len(LONG_PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
            for i in range(n)]


class Cluster:
    """A private Redis and the workers of one test; everything dies at teardown."""

    def __init__(self, tmp_path: Path, model: Path):
        self.tmp = tmp_path
        self.model = model
        self.redis = RedisProc(tmp_path / "redis").start()
        self.url = self.redis.url
        self.store = JobStore.from_url(self.url)
        self.workers: list[WorkerProcess] = []

    def worker(self, name: str, *args: str, ready: bool = True, env: Optional[dict] = None) -> WorkerProcess:
        # A short lease, so that a killed worker's requests come back soon; a later --lease wins.
        w = WorkerProcess(self.url, self.model, self.tmp / f"worker-{name}.log", "--lease", "2", *args,
                          name=f"worker {name}", env=env)
        self.workers.append(w)
        return w.wait_ready() if ready else w

    def cli(self, *args: str, timeout: float = 60, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        return run_mlxq(*args, redis_url=self.url, timeout=timeout, env=env)

    def submit(self, rows: list, name: str = "in.jsonl", env: Optional[dict] = None) -> str:
        path = write_jsonl(self.tmp / name, rows)
        out = self.cli("submit", str(path), "--model", str(self.model), "--json", env=env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["job_id"]

    def info(self, job: str) -> JobInfo:
        return self.store.info(job)

    def wait_running(self, job: str, at_least: int = 1, timeout: float = 30) -> JobInfo:
        return wait_until(f"{at_least} running requests",
                          lambda: (i := self.info(job)).running >= at_least and i, timeout)

    def wait_done(self, job: str, timeout: float = 90) -> JobInfo:
        return wait_until(f"job {job} to end",
                          lambda: (i := self.info(job)).status in (JobStatus.COMPLETED, JobStatus.CANCELLED) and i,
                          timeout, 0.1)

    def attempts(self, job: str) -> dict[int, int]:
        raw = self.store.redis.hgetall(self.store.keys(job).attempts)
        return {int(k): int(v) for k, v in raw.items()}

    def done_events(self, job: str, total: int) -> dict[int, int]:
        """How many end events each request published (once each when it ended once)."""
        def counts():
            out: dict[int, int] = {}
            for _, fields in self.store.redis.xrange(self.store.keys(job).events):
                event = json.loads(fields[b"e"])
                if event.get("done"):
                    out[event["index"]] = out.get(event["index"], 0) + 1
            return out

        # The end event follows the stored result, from the worker's publisher thread.
        wait_until("every request's end event", lambda: sum(counts().values()) >= total, 15, 0.1)
        return counts()

    def close(self) -> None:
        for w in self.workers:
            try:
                w.kill()
            except Exception:  # noqa: BLE001 - teardown kills everything it can
                pass
        self.store.redis.close()
        self.redis.kill()
        # Shown by pytest only when the test failed.
        for w in self.workers:
            print(f"\n===== {w.name} (pid {w.pid}, exit {w.proc.returncode}) =====\n{w.text()}")
        print(f"\n===== redis-server (port {self.redis.port}) =====\n{self.redis.log_text()[-5000:]}")


@pytest.fixture
def cluster(tmp_path, tiny_model):
    c = Cluster(tmp_path, tiny_model)
    try:
        yield c
    finally:
        c.close()


def assert_all_completed(c: Cluster, job: str, total: int) -> list[dict]:
    """The job completed; every request has one completed result; the counts are exact."""
    info = c.info(job)
    assert info.status is JobStatus.COMPLETED
    assert (info.total, info.completed, info.queued, info.running, info.failed, info.cancelled) == (
        total, total, 0, 0, 0, 0)
    lines = results_of(c.url, job)
    assert [line["index"] for line in lines] == list(range(total))
    for line in lines:
        assert line["status"] == "completed" and line["error"] is None, line
        usage = line["result"]["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert c.store.redis.hlen(c.store.keys(job).results) == total
    assert c.done_events(job, total) == {i: 1 for i in range(total)}
    return lines


# -- 1 ---------------------------------------------------------------------------------------


def test_sigkilled_worker_requests_run_again_on_another(cluster):
    a = cluster.worker("A")
    b = cluster.worker("B")
    total = 12
    job = cluster.submit(long_rows(total, 3000))
    # Four on each worker (prefetch one per thread), four still queued.
    cluster.wait_running(job, at_least=8)
    a.kill()
    info = cluster.wait_done(job, timeout=100)
    lines = assert_all_completed(cluster, job, total)
    assert all(line["result"]["finish_reason"] == "length" and line["result"]["usage"]["completion_tokens"] == 3000
               for line in lines), ("a re-run request was cut short", [(l["index"], l["result"]["finish_reason"], l["result"]["usage"]) for l in lines])
    attempts = cluster.attempts(job)
    assert max(attempts.values()) == 2, attempts
    assert sum(1 for n in attempts.values() if n == 2) >= 1
    assert "re-queued" in b.text()
    assert b.alive
    assert info.finished_at is not None


# -- 2 ---------------------------------------------------------------------------------------


def test_redis_killed_and_restarted_mid_job(cluster):
    w = cluster.worker("W", "--lease", "5")
    total = 10
    # Each takes a few seconds: those running when Redis dies end while it is
    # down, and their results wait in the worker until it is back.
    job = cluster.submit(long_rows(total, 2000))
    cluster.wait_running(job)
    cluster.redis.kill()

    # The user asks while Redis is down: one line, exit 1, no traceback.
    out = cluster.cli("status", job)
    assert out.returncode == 1, out
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"Error: Redis at {cluster.url}") and "Traceback" not in out.stderr

    wait_until("a result to wait for Redis", lambda: "storing a result" in w.text(), 30, 0.1)
    cluster.redis.start()  # same port, same directory: the AOF brings everything back
    cluster.wait_done(job, timeout=90)
    assert_all_completed(cluster, job, total)
    assert w.alive, "the worker died instead of reconnecting"
    attempts = cluster.attempts(job)
    assert attempts == {i: 1 for i in range(total)}, attempts


def test_submit_killed_while_sending_loses_no_request(cluster):
    """``mlxq submit`` killed after storing its job, before it sent its first window.

    The job stays in its model's unsent set; once its sender's claim has run
    out, a worker's lease keeper sends the queued requests, a window at a
    time. Every request runs once: those whose first message did go out are
    not run twice.
    """
    total = 600
    path = write_jsonl(cluster.tmp / "many.jsonl",
                       [{"prompt": f"hi {i}", "max_tokens": 1, "temperature": 0} for i in range(total)])
    r = cluster.store.redis
    proc = subprocess.Popen(
        [*MLXQ, "--redis-url", cluster.url, "submit", str(path), "--model", str(cluster.model)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        job = wait_until("the job to be stored", lambda: [i.decode() for i in r.zrange("mlxq:jobs", 0, -1)], 60,
                         0.001)[0]
    finally:
        proc.kill()
        proc.wait(10)
    sent = r.llen(f"mlxq:{cluster.model}")
    assert sent < total, f"submit sent all {sent} messages before it was killed"
    unsent = unsent_key(str(cluster.model))
    assert r.zscore(unsent, job) is not None

    r.zadd(unsent, {job: 1})  # as if its sender's claim (60 s) had run out
    w = cluster.worker("W")
    cluster.wait_done(job, timeout=240)
    assert_all_completed(cluster, job, total)
    assert cluster.attempts(job) == {i: 1 for i in range(total)}
    assert re.search(rf"job {job}: its sender stopped before sending every request; sent its \d+ queued", w.text())
    assert r.zcard(unsent) == 0


def test_a_job_larger_than_the_queue_window_is_sent_as_the_workers_need_it(cluster):
    """The queue holds a window of messages, not the job: workers send the next ones."""
    w = cluster.worker("W", "--queue-ahead", "4")
    total = 30
    path = write_jsonl(cluster.tmp / "in.jsonl", [{"prompt": f"hi {i}", "max_tokens": 2, "temperature": 0}
                                                  for i in range(total)])
    out = cluster.cli("submit", str(path), "--model", str(cluster.model), "--json", "--queue-ahead", "4")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)["job_id"]
    r, queue = cluster.store.redis, f"mlxq:{cluster.model}"
    longest = 0

    def ended():
        nonlocal longest
        longest = max(longest, r.llen(queue))
        return cluster.info(job).status is JobStatus.COMPLETED

    wait_until("the job to end", ended, 120, 0.02)
    assert_all_completed(cluster, job, total)
    assert cluster.attempts(job) == {i: 1 for i in range(total)}
    assert longest <= 4, longest
    assert r.zcard(unsent_key(str(cluster.model))) == 0
    assert "its sender stopped" not in w.text()


# -- 3 ---------------------------------------------------------------------------------------


def test_attempts_are_bounded(cluster):
    first = cluster.worker("first", "--max-attempts", "1", "--lease", "1")
    job = cluster.submit(long_rows(1, 6000))
    cluster.wait_running(job)
    first.kill()
    second = cluster.worker("second", "--max-attempts", "1", "--lease", "1")
    info = cluster.wait_done(job, timeout=40)
    assert info.status is JobStatus.COMPLETED
    assert (info.total, info.failed, info.completed, info.queued, info.running) == (1, 1, 0, 0, 0)
    [line] = results_of(cluster.url, job)
    assert line["status"] == "failed" and line["result"] is None
    assert line["error"]["code"] == "attempts_exhausted", line
    assert "1 attempts" in line["error"]["message"]
    assert "re-queued" in second.text()
    assert cluster.attempts(job) == {0: 2}  # the second start was refused, not run
    assert cluster.done_events(job, 1) == {0: 1}


# -- 4 ---------------------------------------------------------------------------------------


def test_time_limit_fails_only_the_long_request(cluster, tiny_model):
    context = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    long_tokens = min(30000, context - 100)
    cluster.worker("W", "--time-limit", "1")
    started = time.monotonic()
    job = cluster.submit([
        {"prompt": "story 5", "max_tokens": long_tokens, "temperature": 0},
        {"prompt": "short", "max_tokens": 8, "temperature": 0},
    ])
    info = cluster.wait_done(job, timeout=30)
    assert time.monotonic() - started < 30
    assert info.status is JobStatus.COMPLETED
    assert (info.total, info.completed, info.failed, info.queued, info.running) == (2, 1, 1, 0, 0)
    long, short = results_of(cluster.url, job)
    assert long["status"] == "failed" and long["error"]["code"] == "timeout", long
    assert "time limit of 1s" in long["error"]["message"]
    assert short["status"] == "completed" and 1 <= short["result"]["usage"]["completion_tokens"] <= 8


# -- 5 ---------------------------------------------------------------------------------------


def test_visibility_timeout_redelivery_is_a_no_op(cluster):
    opts = ("--visibility-timeout", "2", "--time-limit", "1000", "--lease", "30")
    w1 = cluster.worker("W1", *opts)
    total = 4
    # Long enough that the requests still run when the duplicates arrive (about
    # 10 s after the start), on a machine twice as fast as this one too; the
    # tiny model's greedy answers to these two prompts run past 12000 tokens.
    job = cluster.submit([{"prompt": p, "max_tokens": 12000, "temperature": 0}
                          for p in ("story 5", "story 31", "story 5", "story 31")])
    cluster.wait_running(job, at_least=total)
    # W1 holds the four messages unacknowledged. Once they are older than the
    # visibility timeout, a worker whose consumer starts restores them to the
    # queue (kombu's restore_visible at poll init): a duplicate delivery.
    broker = cluster.store.redis
    wait_until("the messages to pass the visibility timeout",
               lambda: (old := broker.zrange("unacked_index", 0, 0, withscores=True))
               and old[0][1] < time.time() - 2.5 and broker.zcard("unacked_index") == total, 20, 0.1)
    w2 = cluster.worker("W2", *opts)

    def skipped():
        return w1.succeeded().count("skipped") + w2.succeeded().count("skipped") >= total

    wait_until("the re-delivered tasks to be skipped", skipped, 30, 0.1)
    # They were skipped while the requests still ran: the duplicates saw live leases.
    assert cluster.store.request_states(job, range(total)) == ["running"] * total
    cluster.wait_done(job, timeout=900)
    lines = assert_all_completed(cluster, job, total)
    assert all(line["result"]["usage"]["completion_tokens"] == 12000 for line in lines)
    assert cluster.attempts(job) == {i: 1 for i in range(total)}
    # Celery logs a task's outcome after the task has stored its result.
    wait_until("W1 to log its four tasks", lambda: w1.succeeded().count("completed") == total, 30, 0.1)
    assert "completed" not in w2.succeeded()
    assert "re-queued" not in w1.text() + w2.text()


# -- 6 ---------------------------------------------------------------------------------------


def test_two_workers_share_one_job(cluster):
    w1 = cluster.worker("W1")
    w2 = cluster.worker("W2")
    total = 40
    job = cluster.submit([{"prompt": f"question {i}", "max_tokens": 48, "temperature": 0} for i in range(total)])
    cluster.wait_done(job, timeout=60)
    assert_all_completed(cluster, job, total)
    assert cluster.attempts(job) == {i: 1 for i in range(total)}
    wait_until("the workers to log every task",
               lambda: w1.succeeded().count("completed") + w2.succeeded().count("completed") >= total, 30, 0.1)
    done1, done2 = w1.succeeded().count("completed"), w2.succeeded().count("completed")
    assert done1 > 0 and done2 > 0, (done1, done2)
    assert done1 + done2 == total


# -- 7 ---------------------------------------------------------------------------------------


def test_retry_reruns_failed_requests_but_not_invalid_ones(cluster):
    hurried = cluster.worker("hurried", "--time-limit", "1")
    rows = long_rows(2, 2500) + [{"prompt": "short", "max_tokens": 4, "temperature": 0}, {"prompt": "x", "top_k": 99}]
    job = cluster.submit(rows)
    info = cluster.wait_done(job, timeout=30)
    assert (info.completed, info.failed) == (1, 3)
    before = results_of(cluster.url, job)
    assert [line["status"] for line in before] == ["failed", "failed", "completed", "failed"]
    assert [(line["error"] or {}).get("code") for line in before] == ["timeout", "timeout", None, "invalid_request"]

    hurried.stop(30)  # a warm shutdown: nothing is running
    cluster.worker("patient")
    out = cluster.cli("retry", job)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"job {job}: 2 failed requests queued again"
    assert out.stderr == ""
    info = cluster.wait_done(job, timeout=60)
    assert info.status is JobStatus.COMPLETED
    assert (info.total, info.completed, info.failed, info.queued, info.running) == (4, 3, 1, 0, 0)
    after = results_of(cluster.url, job)
    for line in after[:2]:
        assert line["status"] == "completed" and line["error"] is None
        assert line["result"]["finish_reason"] == "length" and line["result"]["usage"]["completion_tokens"] == 2500
    assert after[2] == before[2]  # the completed one was left alone
    assert after[3] == before[3]  # invalid input is not retried
    assert cluster.attempts(job) == {0: 1, 1: 1, 2: 1}

    # Nothing left to retry (the invalid line never is): a no-op that says so.
    out = cluster.cli("retry", job)
    assert out.returncode == 0 and out.stdout.strip() == f"job {job}: 0 failed requests queued again"
    assert cluster.info(job).status is JobStatus.COMPLETED
    # An unknown job: one line, exit 1.
    out = cluster.cli("retry", "0" * 32)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == f"Error: no job {'0' * 32} (unknown, or expired after its retention)"


# -- 8 ---------------------------------------------------------------------------------------


def skewed_clock(offset: str) -> dict[str, str]:
    """An environment whose processes see the wall clock ``offset`` off (libfaketime: "+10m",
    "-10m"); their monotonic clock, which timed waits use, stays true."""
    found = sorted(glob.glob("/usr/lib/*-linux-gnu/faketime/libfaketime.so.1")
                   + glob.glob("/usr/lib*/faketime/libfaketime.so.1"))
    if not found:
        if sys.platform.startswith("linux"):
            pytest.fail("the clock-skew test needs libfaketime: apt-get install faketime (.ci/setup does)",
                        pytrace=False)
        pytest.skip("libfaketime is a Linux tool here")
    return clean_env(preload=found[0], FAKETIME=offset, DONT_FAKE_MONOTONIC="1")


@pytest.mark.parametrize("lease", [DEFAULT_LEASE, 2.0], ids=["default-lease", "short-lease"])
def test_clocks_minutes_apart_run_every_request_once(cluster, lease):
    """One worker's wall clock runs 10 minutes ahead, the submitter's 10 minutes behind.

    Leases and senders' claims are timed by the Redis server's clock, so the
    fast worker never takes the other's live requests for dead ones, and no
    worker takes the sender's claim for a dead sender's.
    """
    on_time = cluster.worker("on-time", "--lease", f"{lease:g}")
    ahead = cluster.worker("ahead", "--lease", f"{lease:g}", env=skewed_clock("+10m"))
    # The clock is off indeed: the worker's heartbeat says by how much.
    out = cluster.cli("workers", "--json")
    skews = {w["pid"]: w["clock_skew"] for w in json.loads(out.stdout)}
    assert abs(skews[on_time.pid]) < 5 and 595 < skews[ahead.pid] < 605, skews
    total = 24
    job = cluster.submit(long_rows(total, 400), env=skewed_clock("-10m"))
    cluster.wait_done(job, timeout=180)
    assert_all_completed(cluster, job, total)
    assert cluster.attempts(job) == {i: 1 for i in range(total)}
    wait_until("the workers to log every task",
               lambda: on_time.succeeded().count("completed") + ahead.succeeded().count("completed") >= total,
               30, 0.1)
    assert on_time.succeeded().count("completed") > 0 and ahead.succeeded().count("completed") > 0
    logs = on_time.text() + ahead.text()
    assert "re-queued" not in logs and "running it again" not in logs
    assert "its sender stopped" not in logs
