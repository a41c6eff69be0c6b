"""Shared fixtures: a real Redis database, a tiny real model, a real Celery worker.

Redis: ``MLXQ_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``). A
missing Redis is an error, not a skip. Every test starts and ends with no
``mlxq:*`` keys in that database.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis

from mlxq.jobs.store import JobStore
from modelfactory import build_adapter, build_model

REDIS_URL = os.environ.get("MLXQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _clear(client: redis.Redis) -> None:
    keys = list(client.scan_iter("mlxq:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"the tests need a Redis server at {REDIS_URL}: {exc}", pytrace=False)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    _clear(client)
    yield client
    _clear(client)


@pytest.fixture
def store(redis_client, redis_url) -> JobStore:
    return JobStore.from_url(redis_url)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A Qwen2-architecture model with random weights and a real BPE tokenizer."""
    return build_model(tmp_path_factory.mktemp("models") / "tiny", shape="tiny")


@pytest.fixture(scope="session")
def kernels_path(tmp_path_factory) -> str:
    """mlxq's C library (``worker/smallgemm.c``) built for this CPU, as the worker builds it."""
    from mlxq.worker.smallgemm import build

    path = build(tmp_path_factory.mktemp("kernels"))
    if path is None:
        pytest.skip("mlxq's C library does not build here (it needs x86-64 with AVX-512 or AVX2, and a C compiler)")
    return path


@pytest.fixture
def with_kernels(kernels_path):
    """The C library's elementwise kernels in use in this process (the worker has them preloaded)."""
    from mlxq.worker import fastmath

    before = fastmath._kernels, fastmath._looked
    fastmath.load_kernels(kernels_path)
    yield kernels_path
    fastmath._kernels, fastmath._looked = before


@pytest.fixture(params=["mlx", "c-kernels"])
def elementwise(request):
    """Softmax and SiLU in MLX's operations, and in the C kernels the worker preloads."""
    request.getfixturevalue("with_kernels" if request.param == "c-kernels" else "without_kernels")
    return request.param


@pytest.fixture
def without_kernels():
    """MLX's operations for softmax and SiLU in this process, even where an earlier test mapped the library."""
    from mlxq.worker import fastmath

    before = fastmath._kernels, fastmath._looked
    fastmath.load_kernels(None)
    yield
    fastmath._kernels, fastmath._looked = before


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, tiny_model) -> Path:
    """LoRA adapters for the tiny model: "zero" changes nothing, "shift" changes its output,
    "broken" has the wrong shapes."""
    root = tmp_path_factory.mktemp("adapters")
    build_adapter(root / "zero", tiny_model, zero=True)
    build_adapter(root / "shift", tiny_model, seed=3)
    build_adapter(root / "team" / "shift2", tiny_model, seed=4)
    build_adapter(root / "broken", tiny_model, rank=4)
    config = json.loads((root / "broken" / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 8  # the saved weights have rank 4
    (root / "broken" / "adapter_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="session")
def worker(redis_url, tiny_model, adapters_dir):
    """A real Celery worker (thread pool) in this process, serving the tiny model."""
    from mlxq.worker.service import running_worker

    # Tests clear Redis between them: a short heartbeat puts the worker's entry back soon.
    with running_worker(redis_url, str(tiny_model), concurrency=8, on_fatal=lambda exc: None,
                        adapters_dir=str(adapters_dir), heartbeat=1.0) as runner:
        yield runner
