"""The lease keeper against a real Redis, sending real Celery messages to it."""

from __future__ import annotations

import base64
import json

import pytest

from mlxq.jobs.defaults import DEFAULT_MODEL
from mlxq.worker.app import configure, queue_for
from mlxq.worker.leases import LeaseKeeper
from mlxq.worker.tasks import enqueue, send_window

from helpers import wait_until
from test_store import make_job, prompts


@pytest.fixture
def queue(redis_client, redis_url):
    """The default model's Celery queue in the test database, empty."""
    configure(redis_url)
    name = queue_for(DEFAULT_MODEL)
    redis_client.delete(name)
    yield name
    redis_client.delete(name)


def take_messages(redis_client, queue: str) -> list[tuple[str, int]]:
    """Pop every message of ``queue`` (as a worker's broker connection would): their (job, index)."""
    out = []
    while (raw := redis_client.rpop(queue)) is not None:
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append((args[0], args[1]))
    return out


def first_sending(keeper: LeaseKeeper, redis_client, queue: str) -> list[tuple[str, int]]:
    """Let ``keeper`` look until a lapsed lease makes it send; what it sent."""

    def looked() -> list[tuple[str, int]]:
        keeper.tick()
        return take_messages(redis_client, queue)

    return wait_until("the keeper to see a lapsed lease", looked, timeout=30)


def test_a_dead_workers_taken_messages_are_sent_again_with_its_requeued_requests(store, redis_client, queue):
    """A job sent whole in its first window; a worker takes all its messages, starts two
    requests, and dies: one look by another worker's keeper sends all six again."""
    job_id = make_job(store, prompts(6))
    assert send_window(store, job_id, DEFAULT_MODEL, 200) == 6
    assert sorted(take_messages(redis_client, queue)) == [(job_id, i) for i in range(6)]
    assert store.start(job_id, 1, lease=0.2).run
    assert store.start(job_id, 4, lease=0.2).run
    keeper = LeaseKeeper(store, running=lambda: [], send=enqueue, lease=30.0, model=DEFAULT_MODEL)
    assert sorted(first_sending(keeper, redis_client, queue)) == [(job_id, i) for i in range(6)]
    assert list(store.queued_indices(job_id)) == list(range(6))
    keeper.tick()  # the leases were taken back once: nothing more to send
    assert take_messages(redis_client, queue) == []


def test_requests_after_the_sent_window_are_left_to_the_next_window(store, redis_client, queue):
    """Only requests whose message went out are sent again; the rest wait for ``feed``."""
    job_id = make_job(store, prompts(6))
    assert send_window(store, job_id, DEFAULT_MODEL, 3) == 3
    take_messages(redis_client, queue)
    assert store.start(job_id, 0, lease=0.2).run
    keeper = LeaseKeeper(store, running=lambda: [], send=enqueue, lease=30.0, model=DEFAULT_MODEL)
    assert sorted(first_sending(keeper, redis_client, queue)) == [(job_id, 0), (job_id, 1), (job_id, 2)]


def test_a_window_goes_out_longest_first(store, redis_client, queue):
    """Within a window, a worker takes the requests with the most ``max_tokens`` first (the
    schema's default, 256, when a line gives none), ties in index order."""
    budgets = [16, 200, None, 16, 64, 200]
    job_id = make_job(store, [{"prompt": f"p{i}", **({"max_tokens": n} if n else {})}
                              for i, n in enumerate(budgets)])
    assert send_window(store, job_id, DEFAULT_MODEL, 4) == 4
    assert take_messages(redis_client, queue) == [(job_id, i) for i in (2, 1, 0, 3)]
    assert send_window(store, job_id, DEFAULT_MODEL, 4) == 2
    assert take_messages(redis_client, queue) == [(job_id, 5), (job_id, 4)]
