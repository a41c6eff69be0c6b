"""The Redis job store, against a real Redis (db 15, see conftest)."""

from __future__ import annotations

import json
import re
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mlxq.jobs.defaults import DEFAULT_MODEL, KEY_PREFIX
from mlxq.jobs.errors import JobNotFound, StoreError
from mlxq.jobs.ingest import parse_line
from mlxq.jobs.models import ErrorInfo, JobStatus, Output, RequestStatus, ResultLine, Usage
from mlxq.jobs.store import JobStore, Start, unsent_key
from mlxq.jobs.urls import mask_url

COUNTS = ("queued", "running", "completed", "failed", "cancelled")


def lines_of(payloads):
    """Parsed lines, as read_lines would give them (raw bytes pass through)."""
    out = []
    for i, p in enumerate(payloads):
        raw = p if isinstance(p, bytes) else json.dumps(p).encode()
        out.append(parse_line(raw, i + 1, i))
    return out


def make_job(store: JobStore, payloads, batches: int = 1) -> str:
    job_id = store.new_job_id()
    lines = lines_of(payloads)
    valid = 0
    size = max(1, -(-len(lines) // batches))
    for lo in range(0, len(lines), size):
        valid += store.add_lines(job_id, lines[lo:lo + size]).count(None)
    store.finalize(job_id, DEFAULT_MODEL, total=len(lines), valid=valid)
    return job_id


def prompts(n: int):
    return [{"prompt": f"p{i}"} for i in range(n)]


def done(index: int, custom_id: str, text: str = "ok") -> ResultLine:
    return ResultLine(
        index=index, custom_id=custom_id, status=RequestStatus.COMPLETED,
        result=Output(response=text, usage=Usage(prompt_tokens=2, completion_tokens=1, total_tokens=3),
                      finish_reason="stop"),
    )


def failed(index: int, custom_id: str) -> ResultLine:
    return ResultLine(index=index, custom_id=custom_id, status=RequestStatus.FAILED,
                      error=ErrorInfo(code="engine_error", message="boom"))


def counts(store: JobStore, job_id: str) -> dict:
    info = store.info(job_id)
    c = {name: getattr(info, name) for name in COUNTS}
    assert sum(c.values()) == info.total, (c, info.total)
    assert all(v >= 0 for v in c.values()), c
    return c


# -- creating --------------------------------------------------------------------


def test_finalize_makes_a_queued_job_whose_counts_add_up(store):
    job_id = make_job(store, [*prompts(3), b"not json"])
    info = store.info(job_id)
    assert info.status is JobStatus.QUEUED
    assert info.model == DEFAULT_MODEL
    assert info.total == 4
    assert counts(store, job_id) == {"queued": 3, "running": 0, "completed": 0, "failed": 1, "cancelled": 0}
    assert info.started_at is None and info.finished_at is None
    assert info.created_at > 0
    assert info.as_dict()["counts"]["total"] == 4


def test_add_lines_reports_valid_and_invalid(store):
    job_id = store.new_job_id()
    errors = store.add_lines(job_id, lines_of([*prompts(2), b"[]", {"prompt": "a", "custom_id": "1"}]))
    assert errors[:2] == [None, None]
    assert errors[2].startswith("line 3: expected a JSON object")
    assert errors[3] == "line 4: field 'custom_id': '1' repeats the id of request 0"


def test_invalid_lines_are_failed_results_with_code_invalid_request(store):
    job_id = make_job(store, [{"prompt": "a"}, b"{oops", {"custom_id": "mine", "prompt": "", "top_k": 1}])
    results = list(store.results(job_id))
    assert [r.status for r in results] == [RequestStatus.QUEUED, RequestStatus.FAILED, RequestStatus.FAILED]
    bad = results[1]
    assert bad.error.code == "invalid_request"
    assert bad.error.message.startswith("line 2: ") and "not valid JSON" in bad.error.message
    assert bad.custom_id == "2"
    assert results[2].error.code == "invalid_request"
    assert "'prompt'" in results[2].error.message
    assert results[2].custom_id == "mine"
    assert store.request_states(job_id, [0, 1, 2]) == ["queued", "failed", "failed"]


def test_stored_request_loads_back(store):
    job_id = make_job(store, [{"prompt": "hi", "top_k": 4}, {"custom_id": "m", "messages": [{"role": "u", "content": "c"}]}])
    cid, request = store.load_request(job_id, 0)
    assert cid == "1" and request.prompt == "hi" and request.top_k == 4
    cid, request = store.load_request(job_id, 1)
    assert cid == "m" and request.messages[0].content == "c"
    with pytest.raises(JobNotFound):
        store.load_request(job_id, 99)


def test_a_seed_form_line_is_stored_as_read(store, redis_client):
    lines = [
        b'{"custom_id": "x", "prompt": "hi",  "seed": 7}',  # kept byte for byte
        b'{"prompt": "no id", "top_k": 3}  ',  # its line number appended as its id
        b'{"custom_id": null, "messages": [{"role": "user", "content": "c"}]}',  # null: the line number
        json.dumps({"custom_id": "o", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": "q"}], "max_tokens": 9}}).encode(),
    ]
    job_id = make_job(store, lines)
    stored = redis_client.hmget(store.keys(job_id).requests, [0, 1, 2, 3])
    assert stored[0] == lines[0]
    parsed = lines_of(lines)
    for index, custom_id in enumerate(["x", "2", "3", "o"]):  # the request, its id set
        assert store.load_request(job_id, index) == (
            custom_id, parsed[index].request.model_copy(update={"custom_id": custom_id}))
    assert json.loads(stored[3])["max_tokens"] == 9  # an OpenAI line: its mapped request, serialised


def test_a_queued_request_has_no_state(store, redis_client):
    job_id = make_job(store, prompts(3))
    assert redis_client.exists(store.keys(job_id).states) == 0
    assert store.request_states(job_id, [0, 2, 3, -1]) == ["queued", "queued", None, None]
    assert store.request_states("0" * 32, [0]) == [None]
    store.start(job_id, 1)
    assert store.request_states(job_id, [0, 1]) == ["queued", "running"]
    assert store.requeue(job_id, 1, release=True)
    assert redis_client.hlen(store.keys(job_id).states) == 0
    assert counts(store, job_id)["queued"] == 3


def test_keys_written_after_storing_expire_with_the_job(store, redis_client):
    job_id = make_job(store, prompts(2))
    keys = store.keys(job_id)
    store.start(job_id, 0)
    assert store.finish(job_id, done(0, "1"))
    for key in (keys.states, keys.attempts, keys.results):
        assert store.retention - 5 <= redis_client.ttl(key) <= store.retention, key


def test_repeated_custom_id_fails_the_later_line(store):
    job_id = make_job(store, [
        {"custom_id": "a", "prompt": "1"},
        {"custom_id": "b", "prompt": "2"},
        {"custom_id": "a", "prompt": "3"},
    ])
    assert counts(store, job_id) == {"queued": 2, "running": 0, "completed": 0, "failed": 1, "cancelled": 0}
    results = list(store.results(job_id))
    dup = results[2]
    assert dup.status is RequestStatus.FAILED
    assert dup.error.code == "invalid_request"
    assert "line 3" in dup.error.message
    assert "custom_id" in dup.error.message and "'a'" in dup.error.message
    assert "request 0" in dup.error.message
    assert results[0].status is RequestStatus.QUEUED


def test_repeated_custom_id_across_batches(store):
    payloads = [{"custom_id": f"id{i}", "prompt": "x"} for i in range(6)] + [{"custom_id": "id4", "prompt": "y"}]
    job_id = make_job(store, payloads, batches=3)
    results = list(store.results(job_id))
    assert [r.status for r in results].count(RequestStatus.FAILED) == 1
    assert results[6].status is RequestStatus.FAILED
    assert "request 4" in results[6].error.message


def test_repeated_custom_id_within_one_batch_names_the_first(store):
    job_id = make_job(store, [{"custom_id": "z", "prompt": "x"}] * 3)
    results = list(store.results(job_id))
    assert results[0].status is RequestStatus.QUEUED
    for r in results[1:]:
        assert r.status is RequestStatus.FAILED
        assert "request 0" in r.error.message


def test_job_ids_are_32_hex_chars_and_differ():
    ids = {JobStore.new_job_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_a_jobs_keys_are_named_as_documented():
    keys = JobStore.keys("J")
    assert keys == ("mlxq:job:J", "mlxq:job:J:state", "mlxq:job:J:res", "mlxq:job:J:req", "mlxq:job:J:cid",
                    "mlxq:job:J:events", "mlxq:job:J:attempts", "mlxq:leases")
    assert (keys.job, keys.attempts, keys.leases) == ("mlxq:job:J", "mlxq:job:J:attempts", "mlxq:leases")
    assert "mlxq:leases" not in keys.own


def test_job_keys_expire_after_the_retention(store, redis_client):
    job_id = make_job(store, [{"custom_id": "c", "prompt": "a"}, b"bad"])
    for key in store.keys(job_id).own:
        if key.endswith((":events", ":attempts", ":cid")):
            continue  # not written yet (the custom ids: dropped once the job is stored)
        ttl = redis_client.ttl(key)
        assert store.retention - 5 <= ttl <= store.retention, (key, ttl)


def test_ttl_follows_the_stores_retention_and_is_renewed_at_the_end(redis_client):
    store = JobStore(redis_client, retention=1234)
    job_id = make_job(store, [{"custom_id": "c", "prompt": "a"}, b"bad"])
    key = store.keys(job_id).job
    assert 1230 <= redis_client.ttl(key) <= 1234
    redis_client.expire(key, 50)
    store.start(job_id, 0)
    assert store.finish(job_id, done(0, "c"))
    assert store.info(job_id).status is JobStatus.COMPLETED
    for key in store.keys(job_id).own:
        if not key.endswith((":events", ":cid")):  # nothing was streamed; the custom ids are gone
            assert 1230 <= redis_client.ttl(key) <= 1234, key


# -- running -----------------------------------------------------------------------


def test_start_runs_once_and_a_duplicate_delivery_does_not_run(store):
    job_id = make_job(store, prompts(2))
    assert store.start(job_id, 0) == Start(run=True, redelivered=False)
    info = store.info(job_id)
    assert info.status is JobStatus.RUNNING
    assert info.started_at is not None
    assert counts(store, job_id) == {"queued": 1, "running": 1, "completed": 0, "failed": 0, "cancelled": 0}
    # The request's lease is live: a second delivery (visibility timeout) is a no-op.
    assert store.start(job_id, 0) == Start(run=False)
    assert counts(store, job_id) == {"queued": 1, "running": 1, "completed": 0, "failed": 0, "cancelled": 0}
    assert store.finish(job_id, done(0, "1")) is True
    assert store.start(job_id, 0).run is False
    assert counts(store, job_id) == {"queued": 1, "running": 0, "completed": 1, "failed": 0, "cancelled": 0}


def test_start_of_an_invalid_line_or_unknown_job_does_not_run(store):
    job_id = make_job(store, [{"prompt": "a"}, b"bad"])
    assert store.start(job_id, 1).run is False
    assert store.start(job_id, 7).run is False
    assert store.start(job_id, 2).run is False
    assert store.start(job_id, -1).run is False
    assert store.start("0" * 32, 0).run is False
    assert counts(store, job_id)["queued"] == 1


def test_finish_twice_changes_nothing_the_second_time(store):
    job_id = make_job(store, prompts(3))
    store.start(job_id, 1)
    assert store.finish(job_id, done(1, "2", "first")) is True
    before = store.info(job_id)
    assert store.finish(job_id, done(1, "2", "second")) is False
    assert store.finish(job_id, failed(1, "2")) is False
    after = store.info(job_id)
    assert counts(store, job_id) == {"queued": 2, "running": 0, "completed": 1, "failed": 0, "cancelled": 0}
    assert after == before
    assert list(store.results(job_id))[1].result.response == "first"


def test_job_completes_when_every_request_has_ended(store):
    job_id = make_job(store, [*prompts(3), b"bad"])
    for i in range(3):
        assert store.start(job_id, i).run
        assert counts(store, job_id)["running"] == 1
        status = failed(i, str(i + 1)) if i == 1 else done(i, str(i + 1))
        assert store.finish(job_id, status)
        info = store.info(job_id)
        counts(store, job_id)
        if i < 2:
            assert info.status is JobStatus.RUNNING
            assert info.finished_at is None
    info = store.info(job_id)
    assert info.status is JobStatus.COMPLETED
    assert info.finished_at is not None and info.finished_at >= info.started_at
    assert counts(store, job_id) == {"queued": 0, "running": 0, "completed": 2, "failed": 2, "cancelled": 0}
    results = list(store.results(job_id))
    assert [r.status for r in results] == [
        RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.COMPLETED, RequestStatus.FAILED,
    ]
    assert results[1].error.code == "engine_error"
    assert results[3].error.code == "invalid_request"


def test_requests_can_run_concurrently_and_end_in_any_order(store):
    job_id = make_job(store, prompts(4))
    for i in range(4):
        assert store.start(job_id, i) == Start(run=True)
    assert counts(store, job_id)["running"] == 4
    for i in (3, 0, 2):
        assert store.finish(job_id, done(i, str(i + 1)))
        assert store.info(job_id).status is JobStatus.RUNNING
    assert store.finish(job_id, done(1, "2"))
    assert store.info(job_id).status is JobStatus.COMPLETED


def test_queued_indices_lists_only_queued(store):
    job_id = make_job(store, [*prompts(3), b"bad", *prompts(2)])
    assert list(store.queued_indices(job_id)) == [0, 1, 2, 4, 5]
    store.start(job_id, 1)
    store.start(job_id, 4)
    store.finish(job_id, done(4, "5"))
    assert list(store.queued_indices(job_id)) == [0, 2, 5]
    store.cancel(job_id)
    assert list(store.queued_indices(job_id)) == []


def test_results_and_queued_indices_span_chunks(store):
    n = 2345
    job_id = make_job(store, prompts(n), batches=5)
    store.start(job_id, 1500)
    store.finish(job_id, done(1500, "1501"))
    indices = list(store.queued_indices(job_id))
    assert len(indices) == n - 1 and 1500 not in indices and indices == sorted(indices)
    results = list(store.results(job_id))
    assert [r.index for r in results] == list(range(n))
    assert [r.custom_id for r in results[:3]] == ["1", "2", "3"]
    assert results[1500].status is RequestStatus.COMPLETED
    assert results[-1].custom_id == str(n)


def test_results_of_an_unfinished_job(store):
    job_id = make_job(store, [{"custom_id": "q", "prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    store.start(job_id, 1)
    store.start(job_id, 2)
    store.finish(job_id, done(2, "3", "hello"))
    results = list(store.results(job_id))
    assert [r.index for r in results] == [0, 1, 2]
    assert [r.custom_id for r in results] == ["q", "2", "3"]
    assert [r.status for r in results] == [RequestStatus.QUEUED, RequestStatus.RUNNING, RequestStatus.COMPLETED]
    assert results[0].result is None and results[0].error is None
    assert results[1].result is None and results[1].error is None
    assert results[2].result.response == "hello"
    assert results[2].result.usage.total_tokens == 3


# -- cancelling --------------------------------------------------------------------


def test_cancel_with_a_running_request(store):
    job_id = make_job(store, [*prompts(4), b"bad"])
    store.start(job_id, 0)
    store.finish(job_id, done(0, "1", "kept"))
    assert store.start(job_id, 1).run

    assert store.cancel(job_id) is JobStatus.CANCELLING
    assert store.info(job_id).status is JobStatus.CANCELLING
    assert store.is_cancelling(job_id)
    assert counts(store, job_id) == {"queued": 0, "running": 1, "completed": 1, "failed": 1, "cancelled": 2}
    assert store.info(job_id).finished_at is None

    # A queued request's message still arrives: it must not run, nor be finished.
    assert store.start(job_id, 2) == Start(run=False)
    assert store.finish(job_id, done(2, "3")) is False
    assert counts(store, job_id) == {"queued": 0, "running": 1, "completed": 1, "failed": 1, "cancelled": 2}

    assert store.finish(job_id, done(1, "2", "finished late")) is True
    info = store.info(job_id)
    assert info.status is JobStatus.CANCELLED
    assert info.finished_at is not None
    assert counts(store, job_id) == {"queued": 0, "running": 0, "completed": 2, "failed": 1, "cancelled": 2}

    results = list(store.results(job_id))
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    assert [r.status for r in results] == [
        RequestStatus.COMPLETED, RequestStatus.COMPLETED, RequestStatus.CANCELLED,
        RequestStatus.CANCELLED, RequestStatus.FAILED,
    ]
    assert results[0].result.response == "kept"
    assert results[1].result.response == "finished late"
    for r in results[2:4]:
        assert r.error.code == "cancelled"
        assert r.result is None
    assert [r.custom_id for r in results] == ["1", "2", "3", "4", "5"]
    assert results[4].error.code == "invalid_request"


def test_cancel_when_every_request_has_started(store):
    job_id = make_job(store, prompts(2))
    store.start(job_id, 0)
    store.start(job_id, 1)
    assert store.cancel(job_id) is JobStatus.CANCELLING
    assert counts(store, job_id) == {"queued": 0, "running": 2, "completed": 0, "failed": 0, "cancelled": 0}
    store.finish(job_id, done(0, "1"))
    assert store.info(job_id).status is JobStatus.CANCELLING
    store.finish(job_id, done(1, "2"))
    assert store.info(job_id).status is JobStatus.CANCELLED


def test_cancel_twice_while_cancelling_changes_nothing(store):
    job_id = make_job(store, prompts(3))
    store.start(job_id, 0)
    assert store.cancel(job_id) is JobStatus.CANCELLING
    before = counts(store, job_id)
    assert store.cancel(job_id) is JobStatus.CANCELLING
    assert counts(store, job_id) == before == {
        "queued": 0, "running": 1, "completed": 0, "failed": 0, "cancelled": 2,
    }


def test_cancel_with_nothing_running_is_immediate(store):
    job_id = make_job(store, prompts(3))
    assert store.cancel(job_id) is JobStatus.CANCELLED
    info = store.info(job_id)
    assert info.status is JobStatus.CANCELLED and info.finished_at is not None
    assert counts(store, job_id) == {"queued": 0, "running": 0, "completed": 0, "failed": 0, "cancelled": 3}
    assert all(store.start(job_id, i).run is False for i in range(3))
    assert [r.error.code for r in store.results(job_id)] == ["cancelled"] * 3


def test_a_running_request_cancelled_by_its_worker(store):
    job_id = make_job(store, prompts(2))
    store.start(job_id, 0)
    assert store.cancel(job_id) is JobStatus.CANCELLING
    line = ResultLine(index=0, custom_id="1", status=RequestStatus.CANCELLED,
                      error=ErrorInfo(code="cancelled", message="stopped"))
    assert store.finish(job_id, line)
    assert store.info(job_id).status is JobStatus.CANCELLED
    assert counts(store, job_id) == {"queued": 0, "running": 0, "completed": 0, "failed": 0, "cancelled": 2}


def test_cancel_of_an_ended_job_keeps_its_status(store):
    job_id = make_job(store, prompts(1))
    store.start(job_id, 0)
    store.finish(job_id, done(0, "1"))
    assert store.cancel(job_id) is JobStatus.COMPLETED
    assert store.info(job_id).status is JobStatus.COMPLETED
    assert counts(store, job_id)["completed"] == 1


# -- finding jobs --------------------------------------------------------------------


def test_unknown_job(store):
    unknown = "f" * 32
    with pytest.raises(JobNotFound):
        store.info(unknown)
    with pytest.raises(JobNotFound):
        store.cancel(unknown)
    with pytest.raises(JobNotFound):
        list(store.results(unknown))
    assert store.model_of(unknown) is None
    assert store.is_cancelling(unknown) is True


def test_list_jobs_newest_first_and_limited(store):
    ids = [make_job(store, prompts(1)) for _ in range(3)]
    listed = store.list_jobs()
    assert {i.job_id for i in listed} == set(ids)
    created = [i.created_at for i in listed]
    assert created == sorted(created, reverse=True)
    assert [i.job_id for i in listed] == list(reversed(ids))
    assert len(store.list_jobs(limit=2)) == 2
    assert store.list_jobs(limit=2)[0].job_id == ids[-1]


def test_discard_removes_a_job_and_list_jobs_forgets_it(store, redis_client):
    keep = make_job(store, prompts(1))
    gone = make_job(store, [{"custom_id": "x", "prompt": "a"}, b"bad"])
    store.discard(gone)
    assert not any(redis_client.exists(key) for key in store.keys(gone).own)
    with pytest.raises(JobNotFound):
        store.info(gone)
    assert [i.job_id for i in store.list_jobs()] == [keep]
    assert redis_client.zscore(f"{KEY_PREFIX}:jobs", gone) is None
    assert store.info(keep).total == 1


def test_discard_before_finalize(store, redis_client):
    job_id = store.new_job_id()
    store.add_lines(job_id, lines_of([{"custom_id": "a", "prompt": "x"}, b"bad"]))
    assert redis_client.exists(store.keys(job_id).requests)
    store.discard(job_id)
    assert list(redis_client.scan_iter(f"{KEY_PREFIX}:job:{job_id}*")) == []


def test_a_new_job_is_unsent_until_its_sender_says_so(store, redis_client):
    job_id = make_job(store, prompts(2))
    unsent = unsent_key(DEFAULT_MODEL)
    deadline = redis_client.zscore(unsent, job_id)
    assert deadline is not None and deadline > store.clock() + 30
    assert store.claim_unsent(DEFAULT_MODEL) == []  # its sender's claim still runs
    assert store.claim_unsent("another/model") == []
    store.sending(job_id, grace=0)
    assert store.claim_unsent(DEFAULT_MODEL, grace=60) == [(job_id, True)]  # its sender died
    assert store.claim_unsent(DEFAULT_MODEL, grace=60) == []  # one claimant at a time
    store.release(job_id, DEFAULT_MODEL, cursor=1)
    assert store.claim_unsent(DEFAULT_MODEL, grace=60) == [(job_id, False)]  # released: a worker's to send
    assert store.next_window(job_id, 10) == ([1], 2, 2)
    store.sent(job_id)
    assert redis_client.zcard(unsent) == 0
    store.sending(job_id, grace=0)  # renewing after the end adds nothing back
    assert redis_client.zcard(unsent) == 0


def test_a_job_is_sent_a_window_at_a_time_skipping_what_is_not_queued(store):
    rows = prompts(7)
    rows[2] = b"bad"
    job_id = make_job(store, rows)
    assert store.next_window(job_id, 3) == ([0, 1, 3], 4, 7)
    store.release(job_id, DEFAULT_MODEL, cursor=4)
    store.start(job_id, 4)  # a duplicate message got there first
    assert store.next_window(job_id, 3) == ([5, 6], 7, 7)
    assert list(store.queued_indices(job_id, sent_only=True)) == [0, 1, 3]
    assert list(store.queued_indices(job_id)) == [0, 1, 3, 5, 6]
    store.sent(job_id, DEFAULT_MODEL, cursor=7)  # the last window went out
    assert list(store.queued_indices(job_id, sent_only=True)) == [0, 1, 3, 5, 6]


def test_model_of(store):
    job_id = make_job(store, prompts(1))
    assert store.model_of(job_id) == DEFAULT_MODEL


# -- errors ------------------------------------------------------------------------


def test_unreachable_server_is_a_store_error_without_the_password():
    store = JobStore.from_url("redis://:s3cret@127.0.0.1:1/0")
    with pytest.raises(StoreError) as caught:
        store.ping()
    assert not isinstance(caught.value, redis.RedisError)
    message = str(caught.value)
    assert "s3cret" not in message
    assert "127.0.0.1:1" in message
    assert "***" in message


def _unreachable(url="redis://:s3cret@127.0.0.1:1/0") -> JobStore:
    """An unreachable store that fails at once (no retries, unlike from_url)."""
    client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
    return JobStore(client, where=mask_url(url))


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.info("a" * 32),
        lambda s: s.cancel("a" * 32),
        lambda s: s.start("a" * 32, 0),
        lambda s: s.finalize("a" * 32, DEFAULT_MODEL, 1, 1),
        lambda s: s.add_lines("a" * 32, lines_of(prompts(1))),
        lambda s: s.list_jobs(),
        lambda s: list(s.results("a" * 32)),
        lambda s: list(s.queued_indices("a" * 32)),
    ],
    ids=["info", "cancel", "start", "finalize", "add_lines", "list_jobs", "results", "queued_indices"],
)
def test_every_operation_on_an_unreachable_server_is_a_store_error(call):
    with pytest.raises(StoreError) as caught:
        call(_unreachable())
    assert "s3cret" not in str(caught.value)
    assert isinstance(caught.value.__cause__, redis.ConnectionError)


def test_bad_url_is_a_store_error_without_the_password():
    with pytest.raises(StoreError) as caught:
        JobStore.from_url("http://:s3cret@127.0.0.1:6379/0")
    assert "s3cret" not in str(caught.value)


def test_redis_error_while_iterating_results_is_a_store_error(store, redis_client):
    job_id = make_job(store, prompts(3))
    # The job hash is fine (info() works), but reading the results fails mid-way.
    redis_client.delete(store.keys(job_id).results)
    redis_client.set(store.keys(job_id).results, "not a hash")
    with pytest.raises(StoreError):
        list(store.results(job_id))


@pytest.mark.parametrize(
    "url,masked",
    [
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:secret@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://default:p%40ss@cache.example.com:6380/2", "rediss://default:***@cache.example.com:6380/2"),
        ("redis://:p@ss@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://:secret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("unix://:secret@/tmp/redis.sock?db=3", "unix://:***@/tmp/redis.sock?db=3"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://localhost", "redis://localhost"),
        ("redis://[::1", "<unparseable URL>"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked
    assert "secret" not in mask_url(url)


def test_mask_url_hides_a_password_given_in_the_query_string():
    assert "secret" not in mask_url("redis://host:6379/0?password=secret")
