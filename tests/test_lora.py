"""LoRA adapters: named in the request, found in the worker's adapters directory, a batch each."""

from __future__ import annotations

import pytest

from mlxq.jobs.models import PromptRequest
from helpers import results_of, submit_and_wait, write_jsonl
from mlxq.worker.errors import RequestRejected


def _greedy(engine, lora=None, prompt="The adapter says", n=24):
    request = PromptRequest(prompt=prompt, max_tokens=n, temperature=0, lora=lora)
    return engine.submit(engine.prepare(request, 1))


def test_zero_adapter_is_the_base_model_and_a_real_one_changes_greedy_output(worker):
    engine = worker.engine
    base = _greedy(engine).result(60).text
    # All three at once: each adapter gets its own batch, the base model its own.
    handles = [_greedy(engine, "zero"), _greedy(engine, "shift"), _greedy(engine), _greedy(engine, "team/shift2")]
    zero, shift, base_again, shift2 = (h.result(60).text for h in handles)
    assert zero == base == base_again
    assert shift != base and shift2 != base and shift != shift2
    # The same adapter alone gives the same text as beside other adapters.
    assert _greedy(engine, "shift").result(60).text == shift


def test_unknown_outside_and_broken_adapters_fail_clearly(worker):
    engine = worker.engine
    with pytest.raises(RequestRejected, match="no adapter 'nope' in the adapters directory"):
        engine.prepare(PromptRequest(prompt="x", lora="nope"), 1)
    with pytest.raises(RequestRejected, match="outside the adapters directory"):
        engine.prepare(PromptRequest(prompt="x", lora="../../etc"), 1)
    with pytest.raises(RequestRejected, match="outside the adapters directory"):
        engine.prepare(PromptRequest(prompt="x", lora="/etc"), 1)
    with pytest.raises(RequestRejected, match="cannot load adapter 'broken'"):
        _greedy(engine, "broken").result(60)
    # The engine lives on.
    assert _greedy(engine, n=3).result(60).completion_tokens >= 1


def test_lora_through_the_queue_on_both_request_forms(tmp_path, redis_client, redis_url, tiny_model, worker):
    rows = [
        {"prompt": "The adapter says", "max_tokens": 12, "temperature": 0},
        {"prompt": "The adapter says", "max_tokens": 12, "temperature": 0, "lora": "zero"},
        {"prompt": "The adapter says", "max_tokens": 12, "temperature": 0, "lora": "shift"},
        {"messages": [{"role": "user", "content": "The adapter says"}], "max_tokens": 12, "temperature": 0,
         "lora": "shift"},
        {"prompt": "x", "lora": "missing"},
    ]
    final = submit_and_wait(redis_url, tiny_model, write_jsonl(tmp_path / "l.jsonl", rows))
    lines = results_of(redis_url, final["job_id"])
    texts = [l["result"]["response"] if l["result"] else None for l in lines]
    assert texts[0] == texts[1] != texts[2]
    assert texts[2] == texts[3]  # the same prompt, as a prompt or as one user message
    assert lines[4]["status"] == "failed" and lines[4]["error"]["code"] == "invalid_request"
    assert "no adapter 'missing'" in lines[4]["error"]["message"]
