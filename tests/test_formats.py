"""Inputs users already have (OpenAI batch lines, Workers AI batch bodies) and OpenAI output."""

from __future__ import annotations

import json

import pytest

from mlxq.jobs.ingest import parse_line
from helpers import results_of, run_cli, submit_and_wait, write_jsonl


def _chat(custom_id, body, url="/v1/chat/completions"):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _parse(obj):
    return parse_line(json.dumps(obj).encode(), 1, 0)


def test_openai_chat_body_maps_onto_the_seed_parameters():
    line = _parse(_chat("req-1", {
        "model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        ],
        "max_completion_tokens": 50, "temperature": 0.2, "top_p": 0.9, "seed": 7,
        "frequency_penalty": 0.5, "presence_penalty": 0.1, "n": 1, "user": "u1",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    }))
    assert line.error is None and line.custom_id == "req-1"
    r = line.request
    assert [m.content for m in r.messages] == ["Be brief.", "Hello there"]
    assert (r.max_tokens, r.temperature, r.top_p, r.seed) == (50, 0.2, 0.9, 7)
    assert (r.frequency_penalty, r.presence_penalty) == (0.5, 0.1)
    assert r.tools[0].function.name == "f"


def test_openai_completions_line_is_a_raw_prompt():
    line = _parse(_chat("c", {"model": "x", "prompt": "Once", "max_tokens": 5}, url="/v1/completions"))
    assert line.error is None and line.request.prompt == "Once" and line.request.raw is True


@pytest.mark.parametrize("body,field", [
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "body.n"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["\n"]}, "body.stop"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "body.logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "body.messages.0.content.0"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "body.tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": -1}, "frequency_penalty"),
])
def test_what_cannot_be_mapped_is_a_clear_error(body, field):
    line = _parse(_chat("bad", body))
    assert line.error.startswith("line 1: ") and f"'{field}'" in line.error
    assert line.custom_id == "bad"


def test_openai_url_must_be_a_generation_endpoint():
    line = _parse({"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}})
    assert "field 'url'" in line.error


def test_openai_in_openai_out_through_the_worker(tmp_path, redis_client, redis_url, tiny_model, worker):
    rows = [
        _chat("a", {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}),
        _chat("b", {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stop": "x"}),
    ]
    final = submit_and_wait(redis_url, tiny_model, write_jsonl(tmp_path / "o.jsonl", rows))
    out = run_cli(redis_url, "results", final["job_id"], "--format", "openai")
    lines = [json.loads(l) for l in out.stdout.splitlines()]
    assert [l["custom_id"] for l in lines] == ["a", "b"]
    ok, bad = lines
    assert ok["id"].startswith("batch_req_") and ok["error"] is None
    assert ok["response"]["status_code"] == 200
    body = ok["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == str(tiny_model)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 6
    assert bad["response"] is None and bad["error"]["code"] == "invalid_request" and "body.stop" in bad["error"]["message"]


def test_workers_ai_batch_body_as_a_json_file(tmp_path, redis_client, redis_url, tiny_model, worker):
    path = tmp_path / "batch.json"
    path.write_text(json.dumps({"requests": [
        {"prompt": "one", "max_tokens": 4}, {"messages": [{"role": "user", "content": "two"}], "max_tokens": 4},
        {"prompt": ""},
    ]}))
    final = submit_and_wait(redis_url, tiny_model, path)
    lines = results_of(redis_url, final["job_id"])
    assert [l["status"] for l in lines] == ["completed", "completed", "failed"]
    assert lines[2]["error"]["message"].startswith("request 3: field 'prompt'")


def test_a_json_file_that_is_not_a_batch_body_is_refused(tmp_path, redis_client, redis_url):
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps([{"prompt": "x"}]))
    out = run_cli(redis_url, "submit", str(path), "--model", "m")
    assert out.exit_code == 2
    assert out.stderr.startswith(f"Error: {path}: a .json batch must be an object")
