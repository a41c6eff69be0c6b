"""``mlxq serve`` on a real port, driven by real clients: httpx for Workers AI's REST API, the
official ``openai`` package for the Batch API; a real Redis and the session's real worker."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import openai
import pytest

from helpers import MLXQ, ROOT, clean_env, free_port, readme_blocks, run_cli, stop_process, wait_until, write_jsonl
from mlxq import Client

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(redis_url, tiny_model, tmp_path_factory):
    """``mlxq serve`` with a token, serving OpenAI batches with the tiny model; its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*MLXQ, "--redis-url", redis_url, "serve", "--port", str(port), "--model", str(tiny_model),
             "--max-body-bytes", "200000"],
            cwd=ROOT, env=clean_env(MLXQ_API_TOKEN=TOKEN), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until("mlxq serve to answer", ready, timeout=60, interval=0.1)
        yield base
    finally:
        stop_process(proc, 20)


@pytest.fixture
def http(server, redis_client):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


@pytest.fixture
def ai(server, redis_client):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0, timeout=60)


def run_path(model) -> str:
    return f"/client/v4/accounts/acct/ai/run/{model}"


# -- Workers AI ---------------------------------------------------------------------------


def test_run_answers_the_seed_output_in_cloudflares_envelope(http, worker, tiny_model, redis_url):
    r = http.post(run_path(tiny_model), json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12,
                                              "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["errors"] == [] and body["messages"] == []
    result = body["result"]
    assert set(result) == {"response", "tool_calls", "usage"} and result["tool_calls"] == []
    (job,) = Client(redis_url).jobs()  # one request, one job, through the queue
    (line,) = job_lines = list(Client(redis_url).job(job.job_id).results())
    assert result["response"] == line.result.response and result["usage"] == line.result.usage.model_dump()
    assert result["usage"]["completion_tokens"] <= 12 and len(job_lines) == 1


def test_stream_true_answers_server_sent_events(http, worker, tiny_model, redis_url):
    with http.stream("POST", run_path(tiny_model), json={"prompt": "Count", "max_tokens": 16, "seed": 7,
                                                         "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) > 2
    text = "".join(json.loads(d)["response"] for d in data[:-1])
    (job,) = Client(redis_url).jobs()
    assert text == next(Client(redis_url).job(job.job_id).results()).result.response


def test_a_client_that_leaves_a_stream_cancels_its_request(http, worker, tiny_model, redis_url):
    with http.stream("POST", run_path(tiny_model), json={"prompt": "Go on", "max_tokens": 20000, "seed": 8,
                                                         "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one event, then hang up
    client = Client(redis_url)
    (info,) = client.jobs()
    final = client.job(info.job_id).wait(timeout=60)
    line = next(client.job(info.job_id).results())
    assert final.cancelled == 1 and line.status.value == "cancelled"


def test_queue_request_batches_and_polls_with_external_references(http, worker, tiny_model):
    requests = [
        {"prompt": "One", "max_tokens": 6, "seed": 1, "external_reference": "ref-1"},
        {"messages": [{"role": "user", "content": "Two"}], "max_tokens": 6, "seed": 2},
        {"prompt": "Three", "top_k": 99, "external_reference": {"row": 3}},
    ]
    r = http.post(run_path(tiny_model), params={"queueRequest": "true"}, json={"requests": requests})
    assert r.status_code == 200, r.text
    queued = r.json()
    assert queued["result"]["status"] == "queued" and queued["result"]["model"] == str(tiny_model)
    assert [m["code"] for m in queued["messages"]] == [5006]
    assert "request 3: field 'top_k'" in queued["messages"][0]["message"]
    request_id = queued["result"]["request_id"]

    def poll():
        body = http.post(run_path(tiny_model), params={"queueRequest": "true"},
                         json={"request_id": request_id}).json()
        assert body["success"] is True
        return body["result"] if "responses" in body["result"] else None

    result = wait_until("the batch to end", poll, timeout=120, interval=0.2)
    responses = result["responses"]
    assert [x["id"] for x in responses] == [0, 1, 2]
    assert [x["external_reference"] for x in responses] == ["ref-1", None, {"row": 3}]
    assert [x["success"] for x in responses] == [True, True, False]
    assert set(responses[0]["result"]) == {"response", "tool_calls", "usage"}
    assert responses[2]["errors"][0]["code"] == 5006
    assert result["usage"]["completion_tokens"] == sum(x["result"]["usage"]["completion_tokens"]
                                                       for x in responses[:2])


def test_bad_input_gets_cloudflare_errors_and_queues_nothing(http, server, tiny_model, redis_url):
    path = run_path(tiny_model)
    cases = [
        (http.post(path, json={"prompt": "x", "temperature": 9}), 400, 5006, "field 'temperature'"),
        (http.post(path, json={"prompt": "x", "image": [1]}), 400, 5006, "text-only"),
        (http.post(path, content=b"{not json"), 400, 5006, "not valid JSON"),
        (http.post(path, content=b""), 400, 3003, "missing a body"),
        (http.post(path, json=["prompt"]), 400, 5006, "expected a JSON object"),
        (http.post(path, params={"queueRequest": "true"}, json={"prompt": "x"}), 400, 5006, '{"requests": [...]}'),
        (http.post(path, params={"queueRequest": "true"}, json={"requests": [{"prompt": ""}]}), 400, 5006,
         "request 1: field 'prompt'"),
        (http.post(path, params={"queueRequest": "true"}, json={"request_id": "nope"}), 404, 7003, "nope"),
        (http.post(path, json={"prompt": "x" * 300_000}), 413, 3006, "over the limit of 200000 bytes"),
        (http.post(path, content=iter([b'{"prompt": "', b"x" * 300_000, b'"}'])), 413, 3006, "too large"),
        (http.get(path), 405, 10405, "not allowed"),
        (http.post("/client/v4/accounts/a/ai/nowhere", json={}), 404, 7000, "No route"),
        (httpx.post(server + path, json={"prompt": "x"}), 401, 10000, "Authorization: Bearer"),
        (httpx.post(server + path, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}), 401, 10000,
         "not the server's"),
    ]
    for r, status, code, text in cases:
        body = r.json()
        assert (r.status_code, body["success"], body["result"]) == (status, False, None), r.text
        assert body["errors"][0]["code"] == code and text in body["errors"][0]["message"], r.text
    assert Client(redis_url).jobs() == []


# -- OpenAI Batch API ---------------------------------------------------------------------


def _batch_lines(n: int, bad: bool = True) -> list:
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "any", "messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 8,
                      "seed": i + 1}} for i in range(n)]
    if bad:
        rows.append({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"messages": [{"role": "user", "content": "x"}], "logprobs": True}})
    return rows


def _wait_batch(ai, batch_id):
    return wait_until("the batch to end", lambda: (b := ai.batches.retrieve(batch_id)).status in (
        "completed", "failed", "cancelled", "expired") and b, timeout=120, interval=0.2)


def test_the_openai_sdk_round_trip(ai, worker, redis_client, tmp_path):
    path = write_jsonl(tmp_path / "batch.jsonl", _batch_lines(3))
    upload = ai.files.create(file=open(path, "rb"), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == path.stat().st_size and upload.filename == "batch.jsonl"
    assert ai.files.retrieve(upload.id).id == upload.id
    assert ai.files.content(upload.id).content == path.read_bytes()
    batch = ai.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"project": "mlxq"})
    assert batch.status == "in_progress" and batch.metadata == {"project": "mlxq"}
    assert batch.request_counts.total == 4
    (error,) = batch.errors.data
    assert error.line == 4 and "body.logprobs" in error.message
    done = _wait_batch(ai, batch.id)
    assert done.status == "completed" and done.completed_at and done.output_file_id and done.error_file_id
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)
    out = [json.loads(x) for x in ai.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == ["r0", "r1", "r2"]
    assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["object"] == "chat.completion"
               for o in out)
    (err,) = [json.loads(x) for x in ai.files.content(done.error_file_id).text.splitlines()]
    assert err["custom_id"] == "bad" and err["error"]["code"] == "invalid_request"
    assert ai.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert ai.files.delete(upload.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        ai.files.retrieve(upload.id)


def test_batches_list_pages_and_cancel(ai, worker, tiny_model, tmp_path):
    slow = [{"custom_id": f"s{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [{"role": "user", "content": "Go"}], "max_tokens": 20000}} for i in range(12)]
    upload = ai.files.create(file=("slow.jsonl", "".join(json.dumps(r) + "\n" for r in slow).encode()),
                             purpose="batch")
    ids = [ai.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                             completion_window="24h").id for _ in range(3)]
    for batch_id in ids:
        assert ai.batches.cancel(batch_id).status in ("cancelling", "cancelled")
    page = ai.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    rest = ai.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in rest.data] == ids[:1] and not rest.has_more
    done = _wait_batch(ai, ids[0])
    assert done.status == "cancelled" and done.cancelled_at and done.request_counts.failed >= 1
    assert done.error_file_id and done.request_counts.total == 12


def test_bad_batch_input_gets_openai_errors_and_queues_nothing(ai, server, redis_url, tmp_path):
    good = ai.files.create(file=("ok.jsonl", b'{"prompt": "x"}\n'), purpose="batch")
    empty = ai.files.create(file=("none.jsonl", b'{"nope": 1}\nnot json\n'), purpose="batch")
    create = dict(endpoint="/v1/chat/completions", completion_window="24h")
    refusals = [
        (lambda: ai.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune"), openai.BadRequestError, "purpose"),
        (lambda: ai.files.create(file=("x.jsonl", b"x" * 300_000), purpose="batch"), openai.APIStatusError,
         "over the limit"),
        (lambda: ai.batches.create(input_file_id="file-nope", **create), openai.NotFoundError, "file-nope"),
        (lambda: ai.batches.create(input_file_id=good.id, endpoint="/v1/embeddings", completion_window="24h"),
         openai.BadRequestError, "endpoint"),
        (lambda: ai.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="1h"),
         openai.BadRequestError, "completion_window"),
        (lambda: ai.batches.create(input_file_id=good.id, metadata={"k": 1}, **create), openai.BadRequestError,
         "metadata"),
        (lambda: ai.batches.retrieve("batch_nope"), openai.NotFoundError, "batch_nope"),
        (lambda: ai.batches.cancel("batch_nope"), openai.NotFoundError, "batch_nope"),
        (lambda: ai.files.content("file-nope"), openai.NotFoundError, "file-nope"),
        (lambda: ai.batches.list(limit=1000), openai.BadRequestError, "limit"),
        (lambda: openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).batches.list(),
         openai.AuthenticationError, "not the server's"),
    ]
    for call, error, text in refusals:
        with pytest.raises(error) as caught:
            call()
        assert text in caught.value.message and caught.value.body["type"], caught.value.body
    r = httpx.post(f"{server}/v1/batches", content=b"[", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{server}/v1/nowhere", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    # a file with no valid line: a failed batch that queued nothing
    failed = ai.batches.create(input_file_id=empty.id, **create)
    assert failed.status == "failed" and failed.failed_at and failed.errors.data[0].code == "invalid_file"
    assert "none of its 2 requests is valid" in failed.errors.data[0].message
    assert ai.batches.retrieve(failed.id).status == "failed"
    assert Client(redis_url).jobs() == []


# -- the command and the README -----------------------------------------------------------


def test_serve_without_a_token_keeps_to_loopback(redis_url, redis_client):
    out = run_cli(redis_url, "serve", "--host", "0.0.0.0")
    assert out.exit_code == 2 and "set MLXQ_API_TOKEN" in out.output


def test_the_readme_examples_run(server, worker, tiny_model, redis_client, tmp_path):
    shell, python = readme_blocks("Over HTTP", "sh")[0], readme_blocks("Over HTTP", "python")[0]
    port = server.rsplit(":", 1)[1]

    def adapt(text: str) -> str:
        return text.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("@cf/qwen/qwen1.5-0.5b-chat",
                                                                             str(tiny_model))

    commands = "\n".join(line for line in adapt(shell).splitlines() if not line.startswith("mlxq serve"))
    env = clean_env(MLXQ_API_TOKEN=TOKEN)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answer, end = json.JSONDecoder().raw_decode(out.stdout)
    assert answer["success"] is True and answer["result"]["usage"]["completion_tokens"] <= 32
    events = out.stdout[end:]
    assert re.match(r'data: \{"response": ', events) and events.rstrip().endswith("data: [DONE]")
    run = subprocess.run([sys.executable, "-c", adapt(python)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    status, *lines = run.stdout.strip().splitlines()
    assert status.startswith("completed") and "completed=2" in status
    assert [json.loads(x)["custom_id"] for x in lines] == ["haiku", "mlx"]
