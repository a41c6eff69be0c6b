"""The whole path: CLI -> Redis -> Celery worker -> MLX engine -> results in Redis."""

from __future__ import annotations

import json
import uuid

from pathlib import Path

import yaml
from click.testing import CliRunner

from helpers import results_of, run_cli, submit_and_wait, wait_until, write_jsonl
from mlxq.cli import cli

SEED_OUTPUT = json.loads(
    next(yaml.safe_load_all((Path(__file__).parent / "data" / "seed-schema.yaml").read_text()))["json_schema"]["output"]
)


def test_mixed_file_one_result_per_line(tmp_path, redis_client, redis_url, tiny_model, worker):
    rows = [
        {"prompt": "Tell me about Redis.", "max_tokens": 12, "custom_id": "a"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "max_tokens": 9, "temperature": 0},
        {"prompt": "too hot", "temperature": 5.5},
        "this is not json",
        {"prompt": "raw prompt", "raw": True, "max_tokens": 5, "top_k": 3, "top_p": 0.5, "seed": 7,
         "repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.2},
    ]
    final = submit_and_wait(redis_url, tiny_model, write_jsonl(tmp_path / "in.jsonl", rows))
    assert final["status"] == "completed"
    counts = final["counts"]
    assert counts == {"total": 5, "queued": 0, "running": 0, "completed": 3, "failed": 2, "cancelled": 0}
    assert final["invalid"] == 2

    lines = results_of(redis_url, final["job_id"])
    assert [line["index"] for line in lines] == [0, 1, 2, 3, 4]
    assert [line["custom_id"] for line in lines] == ["a", "2", "3", "4", "5"]
    assert [line["status"] for line in lines] == ["completed", "completed", "failed", "failed", "completed"]
    assert "line 3" in lines[2]["error"]["message"] and "temperature" in lines[2]["error"]["message"]
    assert "line 4" in lines[3]["error"]["message"] and "JSON" in lines[3]["error"]["message"]
    for line, max_tokens in ((lines[0], 12), (lines[1], 9), (lines[4], 5)):
        result = line["result"]
        assert line["error"] is None
        assert set(SEED_OUTPUT["oneOf"][0]["properties"]) <= set(result)
        assert isinstance(result["response"], str) and result["tool_calls"] == []
        usage = result["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 1 <= usage["completion_tokens"] <= max_tokens
        assert result["finish_reason"] in ("stop", "length")
        if result["finish_reason"] == "length":
            assert usage["completion_tokens"] == max_tokens
    # The raw prompt goes in as-is; the chat forms get the template around them.
    assert lines[4]["result"]["usage"]["prompt_tokens"] < lines[0]["result"]["usage"]["prompt_tokens"]


def test_seeded_requests_reproduce_and_greedy_is_deterministic(tmp_path, redis_client, redis_url, tiny_model, worker):
    base = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0}
    rows = [dict(base, seed=42), dict(base, seed=42), dict(base, seed=43), dict(base, temperature=0),
            dict(base, temperature=0)]
    rows += [dict(base, seed=1000 + i) for i in range(6)]  # neighbours in the batch
    final = submit_and_wait(redis_url, tiny_model, write_jsonl(tmp_path / "s.jsonl", rows))
    texts = [line["result"]["response"] for line in results_of(redis_url, final["job_id"])]
    assert texts[0] == texts[1]
    assert texts[3] == texts[4]
    # Alone, in a job of its own, the seeded request gives the same text again.
    alone = submit_and_wait(redis_url, tiny_model, write_jsonl(tmp_path / "one.jsonl", [dict(base, seed=42)]))
    assert results_of(redis_url, alone["job_id"])[0]["result"]["response"] == texts[0]
    assert len(set(texts[5:])) > 1  # different seeds do differ


def test_bad_files_are_refused_and_nothing_is_enqueued(tmp_path, redis_client, redis_url, tiny_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    out = run_cli(redis_url, "submit", str(empty), "--model", str(tiny_model))
    assert out.exit_code == 2 and "no requests" in out.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}, "[1]"])
    out = run_cli(redis_url, "submit", str(bad), "--model", str(tiny_model))
    assert out.exit_code == 2 and "none of its 2 requests is valid" in out.stderr and "line 1" in out.stderr
    assert "Traceback" not in out.output
    # Nothing but the heartbeats of the workers of other tests.
    assert [k for k in redis_client.scan_iter("mlxq:*") if not k.startswith(b"mlxq:worker")] == []


def test_status_and_results_of_unknown_job(redis_client, redis_url):
    for command in ("status", "results", "cancel"):
        out = run_cli(redis_url, command, "0" * 32)
        assert out.exit_code == 1
        assert out.stderr.strip() == f"Error: no job {'0' * 32} (unknown, or expired after its retention)"


def test_unreachable_redis_is_one_line_and_masks_the_password(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "hi"}])
    out = CliRunner().invoke(cli, ["--redis-url", "redis://:hunter2@127.0.0.1:1/0", "submit", str(path)])
    assert out.exit_code == 1
    assert out.stderr.startswith("Error: Redis at redis://:***@127.0.0.1:1/0")
    assert "hunter2" not in out.output and "Traceback" not in out.output
    assert len(out.stderr.strip().splitlines()) == 1


def test_cancel_stops_running_and_queued_requests(tmp_path, redis_client, redis_url, tiny_model, worker):
    # Long enough (3000 tokens each) that nothing ends on its own before the cancel.
    rows = [{"prompt": f"story {i}", "max_tokens": 3000, "temperature": 0} for i in range(30)]
    out = run_cli(redis_url, "submit", str(write_jsonl(tmp_path / "c.jsonl", rows)), "--model", str(tiny_model),
                  "--json")
    job_id = json.loads(out.stdout)["job_id"]

    def status() -> dict:
        return json.loads(run_cli(redis_url, "status", job_id, "--json").stdout)

    wait_until("a request to run", lambda: status()["counts"]["running"], 60)
    out = run_cli(redis_url, "cancel", job_id)
    assert out.exit_code == 0 and out.stdout.strip() in (f"job {job_id}: cancelling", f"job {job_id}: cancelled")
    final = wait_until("the job to be cancelled", lambda: (s := status())["status"] == "cancelled" and s, 60, 0.1)
    counts = final["counts"]
    assert counts["queued"] == counts["running"] == 0
    assert counts["completed"] + counts["failed"] + counts["cancelled"] == counts["total"] == 30
    assert counts["cancelled"] >= 22  # all but the 8 that were running, at least
    lines = results_of(redis_url, job_id)
    assert len(lines) == 30
    for line in lines:
        assert line["status"] in ("completed", "cancelled")
        if line["status"] == "cancelled":
            assert line["error"]["code"] == "cancelled" and line["result"] is None
    # Requests that were generating stopped early, not after 3000 tokens.
    stopped = [line for line in lines if line["status"] == "cancelled" and "while this request ran" in line["error"]["message"]]
    assert stopped, "no running request was stopped"


def test_prompt_tokens_served_by_the_prefix_cache_are_reported(tmp_path, redis_client, redis_url, tiny_model, worker):
    # A system prompt of several cache blocks, new to the worker's cache, before five different questions.
    system = f"Rules {uuid.uuid4().hex}: " + " ".join(f"rule {i} says be kind and brief." for i in range(30))
    rows = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}],
             "max_tokens": 3, "temperature": 0} for i in range(5)]
    final = submit_and_wait(redis_url, tiny_model, write_jsonl(tmp_path / "shared.jsonl", rows))
    assert final["status"] == "completed"
    usage = [line["result"]["usage"] for line in results_of(redis_url, final["job_id"])]
    cached = [u["cached_tokens"] for u in usage]
    # One request computes the shared blocks; the others copy them (whole 32-token blocks, never the whole prompt).
    assert sorted(cached)[0] == 0 and all(c > 0 for c in sorted(cached)[1:]), cached
    assert all(c % 32 == 0 and c < u["prompt_tokens"] for c, u in zip(cached, usage))
    assert final["cached_tokens"] == sum(cached) and final["prompt_tokens"] == sum(u["prompt_tokens"] for u in usage)

    out = run_cli(redis_url, "results", final["job_id"], "--format", "openai")
    details = [json.loads(line)["response"]["body"]["usage"]["prompt_tokens_details"] for line in out.stdout.splitlines()]
    assert [d["cached_tokens"] for d in details] == cached
    out = run_cli(redis_url, "status", final["job_id"])
    share = round(100 * sum(cached) / final["prompt_tokens"])
    assert f"({sum(cached)}, {share}%, from the prefix cache)" in out.stdout, out.stdout
