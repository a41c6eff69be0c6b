"""Partial results over pub/sub and the replayable Stream, and ``mlxq stream``."""

from __future__ import annotations

import json
import time

from helpers import clean_env, results_of, run_cli, run_mlxq, wait_until, write_jsonl
from mlxq.jobs.events import job_channel


def _submit(redis_url, model, path) -> str:
    out = run_cli(redis_url, "submit", str(path), "--model", str(model), "--json")
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)["job_id"]


def _wait(store, job_id, timeout=120):
    wait_until(f"job {job_id} to end", lambda: store.info(job_id).status.terminal, timeout)


def _all_events(store, job_id) -> list:
    """Every event of an ended job's Stream, in order."""
    events = store.read_events(job_id, block_ms=2000)
    while more := store.read_events(job_id, events[-1].id, block_ms=300):
        events += more
    return events


def test_deltas_add_up_to_the_result_byte_for_byte(tmp_path, store, redis_url, tiny_model, worker):
    # A hot sampler over a tokenizer with multi-byte merges splits characters across tokens.
    rows = [{"prompt": f"café 日本語 🎉 {i}", "stream": True, "max_tokens": 40, "temperature": 2.0, "seed": i + 1}
            for i in range(12)]
    rows.append({"prompt": "not streamed", "max_tokens": 20})
    job_id = _submit(redis_url, tiny_model, write_jsonl(tmp_path / "s.jsonl", rows))
    _wait(store, job_id)
    events = _all_events(store, job_id)
    results = {line["index"]: line["result"] for line in results_of(redis_url, job_id)}
    assert len(results) == 13
    multibyte = 0
    for i, result in results.items():
        mine = [e for e in events if e.index == i]
        assert [e.done for e in mine].count(True) == 1 and mine[-1].done
        text = "".join(e.delta for e in mine)
        assert text.encode() == result["response"].encode()
        assert mine[-1].usage == result["usage"] and mine[-1].finish_reason == result["finish_reason"]
        multibyte += any(len(ch.encode()) > 1 for ch in text)
        if i < 12:
            assert len(mine) <= result["usage"]["completion_tokens"] + 1
    assert multibyte > 0, "no multi-byte character was generated; the test proves nothing"
    # The request without "stream" arrives whole, in its end event.
    assert len([e for e in events if e.index == 12]) == 1
    ids = [e.id for e in events]
    assert ids == sorted(ids, key=lambda x: tuple(map(int, x.split("-")))) and len(set(ids)) == len(ids)


def test_pubsub_subscriber_sees_events_live_and_the_result_is_stored_first(
        tmp_path, store, redis_client, redis_url, tiny_model, worker):
    rows = [{"prompt": f"live {i}", "stream": True, "max_tokens": 30, "temperature": 0} for i in range(3)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    # Subscribe to every job's channel before the job exists (its id is not known yet).
    pubsub = redis_client.pubsub()
    pubsub.psubscribe("mlxq:job:*:events")
    assert pubsub.get_message(timeout=2)["type"] == "psubscribe"
    job_id = _submit(redis_url, tiny_model, path)
    ends, deltas = 0, 0
    deadline = time.time() + 60
    while ends < 3:
        assert time.time() < deadline
        msg = pubsub.get_message(timeout=1)
        # Pub/sub is not per database: another suite on this server publishes here too.
        if not msg or msg["type"] != "pmessage" or msg["channel"].decode() != job_channel(job_id):
            continue
        event = json.loads(msg["data"])
        assert event["job_id"] == job_id and event["id"] and event["custom_id"] == str(event["index"] + 1)
        if event["done"]:
            ends += 1
            # The result is in Redis by the time its end event arrives.
            assert redis_client.hget(store.keys(job_id).results, event["index"]) is not None
            assert event["status"] == "completed" and event["usage"]["completion_tokens"] >= 1
        else:
            deltas += 1
    assert deltas > 3
    pubsub.close()


def test_stream_command_replays_a_finished_job(tmp_path, store, redis_url, tiny_model, worker):
    rows = [{"prompt": "one", "stream": True, "max_tokens": 15, "temperature": 0},
            {"prompt": "two", "max_tokens": 10, "temperature": 0}, {"prompt": ""}]
    job_id = _submit(redis_url, tiny_model, write_jsonl(tmp_path / "r.jsonl", rows))
    _wait(store, job_id)
    results = results_of(redis_url, job_id)

    out = run_cli(redis_url, "stream", job_id)
    assert out.exit_code == 0
    # The request without "stream" arrives whole; the streamed one ends with its marker.
    two = results[1]["result"]
    assert f"[1] {two['response']}  <{two['finish_reason']}, {two['usage']['completion_tokens']} tokens>" in out.stdout
    one = results[0]["result"]
    assert f"  <{one['finish_reason']}, {one['usage']['completion_tokens']} tokens>" in out.stdout
    assert out.stdout.count("[0] ") >= 1

    out = run_cli(redis_url, "stream", job_id, "--index", "0", "--sse")
    assert out.exit_code == 0
    blocks = out.stdout.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    assert all(b.startswith("data: {") for b in blocks[:-2])
    assert "".join(json.loads(b[6:])["response"] for b in blocks[:-2]) == results[0]["result"]["response"]

    out = run_cli(redis_url, "stream", job_id, "--index", "2")
    assert out.exit_code == 1 and "line 3" in out.stderr
    out = run_cli(redis_url, "stream", job_id, "--sse")
    assert out.exit_code == 2 and "--index" in out.stderr


def test_stream_started_late_has_no_gap_and_no_duplicate(tmp_path, store, redis_url, tiny_model, worker):
    rows = [{"prompt": f"long {i}", "stream": True, "max_tokens": 4000, "temperature": 1.0, "seed": 9 + i}
            for i in range(8)]
    job_id = _submit(redis_url, tiny_model, write_jsonl(tmp_path / "l.jsonl", rows))
    wait_until("the job to be under way", lambda: store.read_events(job_id), 60, 0.02)
    launched = time.time()
    proc = run_mlxq("stream", job_id, "--index", "3", "--sse", env=clean_env(MLXQ_REDIS_URL=redis_url))
    assert proc.returncode == 0, proc.stderr
    _wait(store, job_id)
    # The follower joined a running job: it had to replay, then follow live.
    assert store.info(job_id).finished_at > launched + 1.0
    blocks = proc.stdout.split("\n\n")
    streamed = "".join(json.loads(b[6:])["response"] for b in blocks[:-2])
    assert streamed == results_of(redis_url, job_id)[3]["result"]["response"]


def test_a_streamed_request_with_tools_adds_up_to_its_response(tmp_path, store, redis_url, tiny_model, worker):
    # Deltas of a request with tools are held back where a tool call may begin
    # (worker.tools.streamable); the end event completes the parsed response.
    tool = {"name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    rows = [{"messages": [{"role": "user", "content": f"<tool_call> weather {i}?"}], "tools": [tool],
             "stream": True, "max_tokens": 30, "temperature": 1.5, "seed": i + 1} for i in range(6)]
    job_id = _submit(redis_url, tiny_model, write_jsonl(tmp_path / "t.jsonl", rows))
    _wait(store, job_id)
    events = _all_events(store, job_id)
    results = {line["index"]: line["result"] for line in results_of(redis_url, job_id)}
    assert len(results) == 6
    for i, result in results.items():
        mine = [e for e in events if e.index == i]
        assert mine[-1].done and [e.done for e in mine].count(True) == 1
        assert "".join(e.delta for e in mine) == result["response"]
        assert (mine[-1].tool_calls or []) == result["tool_calls"]
        assert all("<tool_call>" not in e.delta for e in mine if not e.done)
    assert any(len(e.delta) > 0 for e in events if not e.done), "nothing was streamed before the end"


def test_sse_and_human_output_show_the_tool_calls_of_an_end_event(capsys):
    from mlxq.cli.stream import _Human, _sse
    from mlxq.jobs.events import Event

    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    end = Event(job_id="j", index=0, custom_id="a", delta="Let me check.", done=True, status="completed",
                finish_reason="stop", usage={"completion_tokens": 9}, tool_calls=calls)
    _sse(end)
    assert json.loads(capsys.readouterr().out.removeprefix("data: ")) == {"response": "Let me check.",
                                                                          "tool_calls": calls}
    _sse(end.model_copy(update={"delta": ""}))
    assert json.loads(capsys.readouterr().out.removeprefix("data: "))["response"] == ""
    _Human()(end)
    assert capsys.readouterr().out == '[0] Let me check.  <stop, 9 tokens, calls get_weather({"city": "Paris"})>\n'
