"""``mlxq run``: one command, an embedded Redis, Ctrl-C and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

from helpers import MLXQ, ROOT, clean_env, run_mlxq, wait_until, write_jsonl
from mlxq.jobs.files import store_file
from mlxq.jobs.store import JobStore

# The suite's own process choice; the run itself works either way.
ENV = clean_env(MLXQ_NO_BLAS_SETUP="1")


def _run(*args, redis_url_arg=None):
    return run_mlxq("run", *args, redis_url=redis_url_arg, env=ENV, timeout=300)


def test_run_does_the_whole_job_with_an_embedded_redis(tmp_path, tiny_model):
    rows = [{"prompt": f"hello {i}", "max_tokens": 8} for i in range(6)] + ["not json"]
    path = write_jsonl(tmp_path / "requests.jsonl", rows)
    out = _run(str(path), "--embedded", "--data-dir", str(tmp_path / "data"), "--model", str(tiny_model),
               "--concurrency", "4")
    assert out.returncode == 0, out.stderr
    target = tmp_path / "requests.results.jsonl"
    assert out.stdout.strip() == str(target)
    lines = [json.loads(l) for l in target.read_text().splitlines()]
    assert [l["status"] for l in lines] == ["completed"] * 6 + ["failed"]
    assert "started an embedded Redis" in out.stderr and "completed 7/7 done, 1 failed" in out.stderr
    assert "Traceback" not in out.stderr
    # The server was shut down cleanly and its data persisted.
    assert not (tmp_path / "data" / "redis.sock").exists()
    assert any((tmp_path / "data" / "appendonlydir").iterdir())


def test_ctrl_c_keeps_the_job_and_resume_finishes_it(tmp_path, tiny_model):
    # The tiny model's greedy answers to these prompts run past 12000 tokens, so
    # every request takes its 3000 and the job outlasts the interruption.
    rows = [{"prompt": ("story 5", "story 31")[i % 2], "max_tokens": 3000, "temperature": 0} for i in range(12)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    data = str(tmp_path / "data")
    proc = subprocess.Popen(
        [*MLXQ, "run", str(path), "--embedded", "--data-dir", data,
         "--model", str(tiny_model), "--concurrency", "4"],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # A suite started in the background (`cmd &`) inherits SIGINT ignored: undo that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Every line of its stderr, read as it comes (none lost between two readers).
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        # Wait until it generates (a progress line with a job id), then interrupt.
        job_line = wait_until("the job's line", lambda: next(
            (l for l in list(lines) if l.startswith("mlxq: job ")), None) or proc.poll() is not None, 60)
        assert isinstance(job_line, str), "".join(lines)
        job_id = job_line.split()[2]
        store = JobStore.from_url(f"unix://{data}/redis.sock")
        wait_until("a request to generate", lambda: store.info(job_id).running, 60)
        # Known issue: in a full CI run the first SIGINT was sometimes lost (the
        # job then ran to the end); cause not found yet. Repeat it, as a user would.
        for _ in range(15):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=4)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(30)
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert f"mlxq run --resume {job_id} --data-dir {data}" in err
    assert "Traceback" not in err, err

    # Without --model: the resumed run serves the job's own model.
    out = _run("--resume", job_id, "--embedded", "--data-dir", data,
               "--concurrency", "4", "-o", str(tmp_path / "out.jsonl"))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(l["status"] == "completed" for l in lines)
    assert all(l["result"]["usage"]["completion_tokens"] >= 1 for l in lines)


def test_resume_sends_what_an_interrupted_send_left_unsent(tmp_path, tiny_model, redis_url, store):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"hi {i}", "max_tokens": 4} for i in range(5)])
    # Stored, no message sent: as a run stopped right after storing the job.
    # Its sender's claim holds for an hour, so no worker's keeper sends for it.
    info = store_file(store, str(path), str(tiny_model)).info
    store.sending(info.job_id, grace=3600)
    assert store.unsent(info.job_id)

    wrong = _run("--resume", info.job_id, "--model", "some/other-model", redis_url_arg=redis_url)
    assert wrong.returncode == 2 and f"job {info.job_id} is for model {tiny_model}" in wrong.stderr

    out = _run("--resume", info.job_id, "--concurrency", "4", "-o", str(tmp_path / "out.jsonl"),
               redis_url_arg=redis_url)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [l["status"] for l in lines] == ["completed"] * 5
    assert not store.unsent(info.job_id)


def test_run_takes_the_workers_engine_options(tmp_path, tiny_model):
    system = " ".join(f"rule {i} says be kind and brief." for i in range(30))
    rows = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}],
             "max_tokens": 2, "temperature": 0} for i in range(4)]
    path = write_jsonl(tmp_path / "shared.jsonl", rows)

    def cached(*options):
        target = tmp_path / "out.jsonl"
        # An embedded Redis: only this run's worker serves the job (not the suite's).
        out = _run(str(path), "--embedded", "--data-dir", str(tmp_path / "data"), "--model", str(tiny_model),
                   "--concurrency", "2", "-o", str(target), *options)
        assert out.returncode == 0, out.stderr
        return [json.loads(l)["result"]["usage"]["cached_tokens"] for l in target.read_text().splitlines()]

    assert cached("--prefix-cache-mb", "0", "--backlog", "0") == [0, 0, 0, 0]
    assert sum(cached("--prefix-cache-mb", "64", "--backlog", "1")) > 0
