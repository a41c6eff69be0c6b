"""Start a worker: load the model, start the engine, consume the model's queue."""

from __future__ import annotations

import logging
import os
import secrets
import signal
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from celery.exceptions import Reject

from mlxq.jobs.defaults import (
    DEFAULT_HEARTBEAT, DEFAULT_LEASE, DEFAULT_MAX_ATTEMPTS, DEFAULT_PREFIX_CACHE_MB, DEFAULT_QUEUE_AHEAD,
    DEFAULT_TIME_LIMIT, DEFAULT_VISIBILITY_TIMEOUT,
)
from mlxq.jobs.store import JobStore

from .app import app, configure, queue_for
from .blas import loaded_blas, loaded_openblas_core
from .engine import Engine
from .heartbeat import Heartbeat, worker_name
from .leases import LeaseKeeper
from .model import load_model
from .publisher import Publisher
from .runner import Runner, set_runner
from .tasks import enqueue, send_window

__all__ = ["backlog_for", "serve", "running_worker"]

log = logging.getLogger(__name__)


class _RejectWithoutTraceback(logging.Filter):
    """Celery logs a rejected task with a traceback. A stopping worker rejects the
    requests delivered to it so that another worker takes them (``Runner.run``):
    the warning's one line says so, and a traceback would reach ``mlxq run``'s stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], Reject):
            record.exc_info = None
            record.exc_text = None
        return True


_REJECT_FILTER = _RejectWithoutTraceback()


def _die(exc: BaseException) -> None:
    """The engine is gone: stop the worker so its supervisor restarts it."""
    log.critical("engine failed (%s); shutting the worker down", exc)
    os.kill(os.getpid(), signal.SIGTERM)


def backlog_for(concurrency: int, backlog: Optional[int] = None) -> int:
    """Requests a worker takes beyond its rows (default: a quarter of them, at least 2).

    They wait in the engine, tokenized, so that a row that frees is refilled
    at the next step instead of after Celery delivers the next message.
    """
    return max(2, concurrency // 4) if backlog is None else backlog


#: Seconds a stopping worker waits for its running requests to release themselves.
RELEASE_WAIT = 60.0


@contextmanager
def _runner(
    redis_url: str,
    model: str,
    concurrency: int,
    model_dirs: Optional[Sequence[str]] = None,
    force_cpu: bool = False,
    keep_dtype: bool = False,
    on_fatal=_die,
    lease: float = DEFAULT_LEASE,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    time_limit: float = DEFAULT_TIME_LIMIT,
    adapters_dir: Optional[str] = None,
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
    name: Optional[str] = None,
    heartbeat: float = DEFAULT_HEARTBEAT,
    queue_ahead: int = DEFAULT_QUEUE_AHEAD,
) -> Iterator[Runner]:
    """The model loaded and the engine, publisher and lease keeper running; all stopped on the way out.

    The worker is listed (``mlxq workers``, as ``name``) from the moment Redis
    answers, while its model loads too, until it stops.
    """
    logging.getLogger("celery.app.trace").addFilter(_REJECT_FILTER)  # once: the same filter object
    store = JobStore.from_url(redis_url)
    store.ping()
    beat = Heartbeat(store.workers, name or worker_name(f"-{secrets.token_hex(2)}"),
                     {"model": model, "concurrency": concurrency}, interval=heartbeat).start()
    try:
        loaded = load_model(model, model_dirs, force_cpu=force_cpu, keep_dtype=keep_dtype)
        log.info(
            "model %s (%s) on %s, dtype %s, BLAS %s, OpenBLAS kernels %s, %d requests in flight, prefix cache %s MiB",
            loaded.name, loaded.source, loaded.device, loaded.dtype, loaded_blas(), loaded_openblas_core() or "-",
            concurrency, prefix_cache_mb,
        )
        engine = Engine(loaded, width=concurrency, on_fatal=on_fatal, time_limit=time_limit,
                        adapters_dir=adapters_dir, prefix_cache_mb=prefix_cache_mb)
        runner = Runner(store, engine, Publisher(store).start(), enqueue, lease=lease, max_attempts=max_attempts)
        keeper = LeaseKeeper(store, runner.running, enqueue, lease, model=model, queue=queue_for(model),
                             send_window=send_window, ahead=queue_ahead).start()
        engine.start()
        set_runner(runner)
        beat.update(state="ready", device=loaded.device, dtype=loaded.dtype, blas=loaded_blas(),
                    stats=lambda: (len(runner.running()), engine.tokens_generated))
        try:
            yield runner
        finally:
            engine.stop()
            # Requests still running release themselves (back to the queue) on the
            # engine's stop: let them reach Redis before anything that needs it stops
            # (Celery's shutdown may return first, and ``mlxq run`` then stops its Redis).
            if not runner.wait_idle(RELEASE_WAIT):
                log.warning("requests still running after %ss: their leases bring them back", RELEASE_WAIT)
            keeper.stop()
            runner.publisher.stop()
            set_runner(None)
    finally:
        beat.stop()


def serve(
    redis_url: str, model: str, concurrency: int, loglevel: str = "INFO",
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT, events: bool = False, backlog: Optional[int] = None,
    **options,
) -> int:
    """Run a worker in this process until it is told to stop; returns its exit code."""
    with _runner(redis_url, model, concurrency, name=worker_name(), **options) as runner:
        if visibility_timeout < runner.engine.time_limit:
            log.warning("the visibility timeout (%ss) is shorter than the time limit (%ss): Celery will re-deliver "
                        "long requests (a no-op, but wasted work)", visibility_timeout, runner.engine.time_limit)
        configure(redis_url, visibility_timeout)
        app.conf.worker_send_task_events = events
        worker = app.Worker(
            pool="threads", concurrency=concurrency + backlog_for(concurrency, backlog), queues=[queue_for(model)],
            loglevel=loglevel, hostname=worker_name(), quiet=True,
        )
        worker.start()
    if runner.engine.error is not None:
        return 70
    return worker.exitcode or 0


@contextmanager
def running_worker(
    redis_url: str, model: str, concurrency: int = 4, backlog: Optional[int] = None, **kwargs
) -> Iterator[Runner]:
    """A real worker on a thread of this process (tests, ``mlxq run``)."""
    from celery.contrib.testing.worker import start_worker

    with _runner(redis_url, model, concurrency, **kwargs) as runner:
        configure(redis_url)
        with start_worker(
            app, pool="threads", concurrency=concurrency + backlog_for(concurrency, backlog), queues=[queue_for(model)],
            perform_ping_check=False, shutdown_timeout=60, loglevel="WARNING",
        ):
            try:
                yield runner
            finally:
                # Stop generating first: running requests go back to the queue at once
                # instead of Celery's shutdown waiting for them to finish.
                runner.engine.stop()
