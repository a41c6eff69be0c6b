"""The Python client (``from mlxq import Client``) against a real Redis, Celery worker and MLX."""

from __future__ import annotations

import asyncio
import io
import json
import re

import pytest

from helpers import readme_blocks, results_of, run_cli, write_jsonl
from mlxq import Client, InputError, JobNotFound, JobStatus, RequestStatus, ResultLine

pytestmark = pytest.mark.slow

BAD_LINES = [
    {"prompt": "Hello", "max_tokens": 4, "seed": 1},
    {"prompt": "Hello", "temperature": 9},
    "not json",
    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 2, "custom_id": "m"},
    {"prompt": "Hi", "image": [1, 2]},
]


@pytest.fixture
def client(redis_url, redis_client):
    return Client(redis_url)


def test_a_file_validates_exactly_as_the_cli_does(client, worker, tiny_model, redis_url, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", BAD_LINES)
    job = client.submit(str(path), model=str(tiny_model))
    assert job.invalid == 3 and job.total == 5
    assert [e.split(":")[0] for e in job.errors] == ["line 2", "line 3", "line 5"]
    job.wait(timeout=120)

    cli = run_cli(redis_url, "submit", str(path), "--model", str(tiny_model), "--wait", "--json")
    assert cli.exit_code == 0, cli.output
    theirs = results_of(redis_url, json.loads(cli.stdout.splitlines()[-1])["job_id"])
    ours = [json.loads(line.model_dump_json()) for line in job.results()]
    assert [(r["status"], r["error"]) for r in ours] == [(r["status"], r["error"]) for r in theirs]
    assert [r["custom_id"] for r in ours] == ["1", "2", "3", "m", "5"]


def test_dicts_and_open_files_are_sources_too(client, worker, tiny_model, tmp_path):
    rows = [r for r in BAD_LINES if isinstance(r, dict)]
    job = client.submit(rows, model=str(tiny_model))
    assert job.errors == [
        "request 2: field 'temperature': input should be less than or equal to 5 (got 9)",
        "request 4: field 'image': this model is text-only; images are not accepted",
    ]
    path = write_jsonl(tmp_path / "r.jsonl", BAD_LINES)
    with open(path, "rb") as binary, open(path, encoding="utf-8") as text:
        from_binary = client.submit(binary, model=str(tiny_model))
        from_text = client.submit(text, model=str(tiny_model))
    assert from_binary.errors == from_text.errors and len(from_text.errors) == 3
    # an open file's kind goes by its name, as a path's does: a .json batch body, else JSONL
    (tmp_path / "b.json").write_text(json.dumps({"requests": rows[:1]}))
    with open(tmp_path / "b.json", "rb") as body:
        batch = client.submit(body, model=str(tiny_model))
    with pytest.raises(InputError, match="^<file>: none of its 1 requests is valid; the first: line 1: missing"):
        client.submit(io.BytesIO(json.dumps({"requests": rows[:1]}).encode()), model=str(tiny_model))
    for j in (job, from_binary, from_text, batch):
        assert j.wait(timeout=120).status is JobStatus.COMPLETED
    lines = list(job.results())
    assert all(isinstance(line, ResultLine) for line in lines)
    assert [line.status for line in lines] == [RequestStatus.COMPLETED, RequestStatus.FAILED,
                                               RequestStatus.COMPLETED, RequestStatus.FAILED]


def test_a_refused_source_queues_nothing(client, redis_client):
    with pytest.raises(InputError, match="none of its 2 requests is valid; the first: request 1"):
        client.submit([{"prompt": ""}, {"nope": 1}], model="m")
    with pytest.raises(InputError, match="no requests given"):
        client.submit([], model="m")
    with pytest.raises(InputError, match="more than the limit of 1 requests"):
        from mlxq import Limits
        client.submit([{"prompt": "a"}, {"prompt": "b"}], model="m", limits=Limits(max_requests=1))
    with pytest.raises(InputError, match="cannot read requests from dict"):
        client.submit({"prompt": "a"}, model="m")
    assert client.jobs() == [] and not list(redis_client.scan_iter("mlxq:job:*"))


def test_stream_replays_then_follows_and_adds_up_to_the_result(client, worker, tiny_model):
    job = client.submit([{"prompt": "Count", "max_tokens": 24, "seed": 3, "stream": True},
                         {"prompt": "Other", "max_tokens": 8, "seed": 4}], model=str(tiny_model))
    live = list(job.stream(index=0))
    assert live[-1].done and all(ev.index == 0 for ev in live) and len(live) > 2
    final = job.wait(timeout=60)
    assert final.completed == 2
    result = next(job.results()).result
    assert "".join(ev.delta for ev in live) == result.response
    # a late follower replays the same events, in sync and in asyncio code
    replay = list(job.stream())
    assert [ev.id for ev in replay if ev.index == 0] == [ev.id for ev in live]

    async def follow():
        return [ev async for ev in job.astream()]

    assert [ev.id for ev in asyncio.run(follow())] == [ev.id for ev in replay]
    assert [ev.model_dump() for ev in asyncio.run(_one(job, 1))] == [
        ev.model_dump() for ev in replay if ev.index == 1]


async def _one(job, index):
    return [ev async for ev in job.astream(index)]


def test_wait_times_out_and_cancel_ends_a_job_no_worker_serves(client):
    job = client.submit([{"prompt": "a"}, {"prompt": "b"}], model="nobody/serves-this")
    with pytest.raises(TimeoutError, match="still queued after 0.2s"):
        job.wait(timeout=0.2)
    assert job.cancel() is JobStatus.CANCELLED
    assert job.wait(timeout=5).cancelled == 2
    assert [ev for ev in job.stream()] == []
    assert job.retry() == []
    with pytest.raises(JobNotFound):
        client.job("f" * 32).status()


def test_the_readme_example_runs(worker, tiny_model, redis_url, redis_client, monkeypatch, capsys):
    (code,) = readme_blocks("From Python", "python")
    monkeypatch.setenv("MLXQ_REDIS_URL", redis_url)
    exec(compile(code.replace("@cf/qwen/qwen1.5-0.5b-chat", str(tiny_model)), "README.md", "exec"), {})
    out = capsys.readouterr().out  # the tiny model's random text may hold newlines
    job_id, errors = out.splitlines()[0].split(" ", 1)
    assert len(job_id) == 32 and "request 3: field 'temperature'" in errors
    assert re.search(r"^1 completed ", out, re.M) and re.search(r"^q2 completed ", out, re.M)
    assert out.splitlines()[-1].startswith("3 failed request 3: field 'temperature'")
