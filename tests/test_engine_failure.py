"""The engine thread dying mid-batch: no hang, every request and stream ends, the worker is told."""

from __future__ import annotations

import threading

import mlx.core as mx

from helpers import wait_until
from mlxq.jobs.ingest import parse_line
from mlxq.worker.engine import Engine
from mlxq.worker.model import load_model
from mlxq.worker.publisher import Publisher
from mlxq.worker.runner import Runner


def test_engine_death_fails_in_flight_requests_ends_streams_and_signals(store, redis_url, tiny_model):
    loaded = load_model(str(tiny_model))  # a model of this test's own: it is about to be broken
    died = threading.Event()
    engine = Engine(loaded, width=4, on_fatal=lambda exc: died.set())
    runner = Runner(store, engine, Publisher(store).start(), send=lambda *a: 0, lease=30)
    engine.start()
    job_id = store.new_job_id()
    lines = [parse_line(f'{{"prompt": "p{i}", "max_tokens": 5000, "stream": true}}'.encode(), i + 1, i)
             for i in range(3)]
    store.add_lines(job_id, lines)
    store.finalize(job_id, str(tiny_model), 3, 3)
    outcomes = {}
    threads = [threading.Thread(target=lambda i=i: outcomes.__setitem__(i, runner.run(job_id, i))) for i in range(3)]
    for t in threads:
        t.start()
    wait_until("all three to generate", lambda: len({e.index for e in store.read_events(job_id)}) == 3, 120, 0.01)
    # A real failure inside MLX on the engine thread: a weight of the wrong shape.
    loaded.model.model.layers[0].mlp.down_proj.weight = mx.zeros((3, 3))
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a request hangs after the engine died"
    assert died.wait(5) and engine.error is not None and not engine.accepting
    assert outcomes == {0: "failed", 1: "failed", 2: "failed"}
    info = store.info(job_id)
    assert info.status.value == "completed" and info.failed == 3 and info.running == 0
    for line in store.results(job_id):
        assert line.error.code == "engine_error"
    runner.publisher.stop()
    events = store.read_events(job_id)
    assert sorted(e.index for e in events if e.done) == [0, 1, 2]
    assert all(e.status == "failed" for e in events if e.done)
    assert store.redis.zcard("mlxq:leases") == 0 or not any(
        m.decode().startswith(job_id) for m in store.redis.zrange("mlxq:leases", 0, -1))
