"""mlxq from Python: :class:`Client` queues requests, :class:`Job` follows and steers a job.

The ``mlxq`` command is built on this module (one path for both), and so is
``mlxq serve``. The client composes the rooms: it validates and stores with
:mod:`mlxq.jobs` and sends the first window of its Celery messages (one per
request) with :func:`mlxq.worker.tasks.send_window` (imported when it first
sends, so creating a client or reading a job imports neither Celery nor MLX);
the model's workers send the rest.

    from mlxq import Client

    job = Client().submit("requests.jsonl", model="@cf/qwen/qwen1.5-0.5b-chat")
    job.wait(progress=True)
    for line in job.results():
        print(line.custom_id, line.status.value)
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Optional, TextIO, Union

from .jobs.defaults import DEFAULT_MODEL, DEFAULT_QUEUE_AHEAD, DEFAULT_REDIS_URL, DEFAULT_RETENTION
from .jobs.errors import JobNotFound, StoreError
from .jobs.events import Event, events_key, parse_entries
from .jobs.files import Limits, Source, Stored, store_file
from .jobs.models import JobStatus, RequestStatus, ResultLine
from .jobs.openai import to_openai
from .jobs.progress import summary
from .jobs.store import JobInfo, JobKeys, JobStore
from .jobs.workers import WorkerInfo

__all__ = ["Client", "Job"]

#: How long one read of a job's event Stream blocks before the job's state is looked at.
_BLOCK_MS = 1000
#: After a job (or request) ended, how long to wait for more of its last events.
_TAIL_MS = 300

Progress = Union[bool, Callable[[JobInfo], None]]

#: One broker per process: Celery's app is configured once, for the first client that sends.
_sending = threading.Lock()


class Client:
    """A connection to mlxq's Redis: queue jobs, find them again.

    ``redis_url`` defaults to ``MLXQ_REDIS_URL``, else ``redis://localhost:6379/0``
    (the CLI's default). Jobs and their results are kept ``retention`` seconds
    after they end. Nothing is sent to Redis until a method needs it.
    """

    def __init__(self, redis_url: Optional[str] = None, *, retention: int = DEFAULT_RETENTION):
        self.redis_url = redis_url or os.environ.get("MLXQ_REDIS_URL") or DEFAULT_REDIS_URL
        self.store = JobStore.from_url(self.redis_url, retention)

    def __repr__(self) -> str:
        return f"Client({self.store.where!r})"

    def ping(self) -> None:
        """Raise :class:`mlxq.StoreError` unless Redis answers."""
        self.store.ping()

    def submit(self, source: Source, model: Optional[str] = None, *, limits: Limits = Limits(),
               ahead: int = DEFAULT_QUEUE_AHEAD) -> "Job":
        """Validate ``source`` and queue its requests for ``model``; returns the job.

        ``source`` is a path to a JSONL file (or a ``.json`` Workers AI batch
        body), an open file of either, or an iterable of request dicts (either
        seed form, or OpenAI batch lines). Validation is ``mlxq submit``'s:
        a bad request fails alone with an error naming its line (or, for dicts,
        ``request N``) and field, the others run; :attr:`Job.invalid` and
        :attr:`Job.errors` say which. A source with no valid request, or over a
        limit, raises :class:`mlxq.InputError` and queues nothing.

        ``model`` defaults to ``MLXQ_MODEL``, else ``@cf/qwen/qwen1.5-0.5b-chat``.
        The first ``ahead`` requests are sent to the model's queue now; the
        model's workers send the rest as their queue runs short.
        """
        model = model or os.environ.get("MLXQ_MODEL") or DEFAULT_MODEL
        stored = store_file(self.store, source, model, limits)
        job = Job(self, stored.info.job_id, stored)
        self._send_window(job.id, model, ahead)
        return job

    def job(self, job_id: str) -> "Job":
        """The job ``job_id`` (not looked up until used: :meth:`Job.status` raises :class:`mlxq.JobNotFound`)."""
        return Job(self, job_id)

    def jobs(self, limit: int = 50) -> list[JobInfo]:
        """The newest ``limit`` jobs, newest first."""
        return self.store.list_jobs(limit)

    def workers(self, model: Optional[str] = None) -> list[WorkerInfo]:
        """The live workers (serving ``model``, if given), from their heartbeats (``mlxq workers``)."""
        return self.store.workers.live(model)

    def _send_window(self, job_id: str, model: str, limit: int) -> int:
        """The next ``limit`` messages of a job this client holds the sending claim of."""
        from .worker.app import configure
        from .worker.tasks import send_window

        with _sending:
            configure(self.redis_url)
            return send_window(self.store, job_id, model, limit)

    def _send(self, job_id: str, indices: Iterable[int], model: str) -> int:
        """One Celery message per request index to ``model``'s queue."""
        from .worker.app import configure
        from .worker.tasks import enqueue

        # As the CLI always has: (re)configure Celery's app for this Redis before each sending.
        # (Skipping it when the URL is unchanged made an in-process worker, `mlxq run`'s, take
        # more deliveries while it stopped: Ctrl-C then logged rejected tasks.)
        with _sending:
            configure(self.redis_url)
            return enqueue(job_id, indices, model)


class Job:
    """One job: its state, results and events. Get one from :meth:`Client.submit` or :meth:`Client.job`."""

    def __init__(self, client: Client, job_id: str, stored: Optional[Stored] = None):
        self.client = client
        self.id = job_id
        #: Invalid requests of the submitted source (they fail alone), and the first few errors.
        self.invalid = stored.invalid if stored else 0
        self.errors: list[str] = list(stored.errors) if stored else []
        self._total = stored.info.total if stored else None

    @property
    def total(self) -> int:
        """How many requests the job has (valid or not)."""
        if self._total is None:
            self._total = self.status().total
        return self._total

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    @property
    def store(self) -> JobStore:
        return self.client.store

    # -- state -------------------------------------------------------------

    def status(self) -> JobInfo:
        """The job's status and request counts (they always add up to the total)."""
        return self.store.info(self.id)

    def wait(self, timeout: Optional[float] = None, progress: Progress = False, interval: float = 0.5) -> JobInfo:
        """Block until the job has ended (completed or cancelled); returns its final state.

        ``progress=True`` prints a line like ``mlxq status --watch`` on stderr
        every 2 s; a callable is called with the job's state at every look.
        Raises :class:`TimeoutError` after ``timeout`` seconds.
        """
        show = _PlainProgress() if progress is True else (progress or None)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.status()
            if show is not None:
                show(info)
            if info.status.terminal:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} is still {info.status.value} after {timeout:g}s")
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))

    def cancel(self) -> JobStatus:
        """Queued requests never start, running ones stop at the next engine step; returns the job's status."""
        return self.store.cancel(self.id)

    def retry(self) -> list[int]:
        """Queue the failed requests again (not those whose input was invalid); returns their indices."""
        indices = self.store.retry(self.id)
        if indices:
            self.client._send(self.id, indices, self.status().model)
        return indices

    def resume(self) -> int:
        """Send the next window of messages an interrupted submit left unsent (``mlxq run --resume``);
        returns how many (the model's workers send the rest)."""
        model = self.status().model
        if not self.store.unsent(self.id, model):
            return 0
        self.store.sending(self.id, model=model)
        return self.client._send_window(self.id, model, DEFAULT_QUEUE_AHEAD)

    # -- results -----------------------------------------------------------

    def results(self) -> Iterator[ResultLine]:
        """One typed line per request, in input order (unfinished ones carry no result)."""
        return self.store.results(self.id)

    def openai_results(self) -> Iterator[dict[str, Any]]:
        """OpenAI Batch API output lines, in input order (``mlxq results --format openai``)."""
        info = self.status()
        created = int(info.finished_at or info.created_at)
        for line in self.results():
            yield to_openai(line, info.model, created, self.id)

    def write_results(self, out: TextIO, fmt: str = "mlxq") -> int:
        """Write the results as JSONL (``fmt`` ``mlxq`` or ``openai``); returns the count."""
        n = 0
        if fmt == "openai":
            for obj in self.openai_results():
                out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                n += 1
            return n
        for line in self.results():
            out.write(line.model_dump_json() + "\n")
            n += 1
        return n

    # -- events ------------------------------------------------------------

    def _ended(self, index: Optional[int]) -> bool:
        if index is None:
            return self.status().status.terminal
        state = self.store.request_states(self.id, [index])[0]
        if state is None:
            self.status()  # raises JobNotFound for a job that is gone
            raise JobNotFound(self.id, f"job {self.id} has no request {index}")
        return RequestStatus(state).terminal

    def stream(self, index: Optional[int] = None,
               watch: Optional[Callable[[JobInfo], None]] = None) -> Iterator[Event]:
        """The job's events (or request ``index``'s): first those already sent, then live ones, no gap
        and no duplicate, until the job (or the request) has ended.

        A request's last event has ``done``; requests with ``"stream": true``
        send their text token by token, the others whole in their last event.
        ``watch`` is called with the job's state whenever no event came for a
        second (``mlxq stream`` says then when no worker serves the job).
        """
        last, ending = "0-0", False
        while True:
            # Once it has ended, wait only a moment for the last events (its end is stored first).
            events = self.store.read_events(self.id, last, block_ms=_TAIL_MS if ending else _BLOCK_MS)
            last, wanted, finished = _take(events, last, index)
            yield from wanted
            if finished:
                return
            if not events:
                if ending:
                    return
                if watch is not None:
                    watch(self.status())
                ending = self._ended(index)

    async def astream(self, index: Optional[int] = None) -> AsyncIterator[Event]:
        """:meth:`stream` for asyncio: the same events, read with ``redis.asyncio``."""
        import redis
        import redis.asyncio as aredis

        keys = JobKeys.of(self.id)
        client = aredis.Redis.from_url(self.client.redis_url)

        async def ended() -> bool:
            if index is None:
                status = await client.hget(keys.job, "status")
                if status is None:
                    raise JobNotFound(self.id)
                return JobStatus(status.decode()).terminal
            total, state = await client.hget(keys.job, "total"), await client.hget(keys.states, index)
            if state is None and not 0 <= index < int(total or 0):
                raise JobNotFound(self.id, f"job {self.id} has no request {index}")
            return state is not None and RequestStatus(state.decode()).terminal  # none: queued

        async def read(after: str, block_ms: int) -> list[Event]:
            reply = await client.xread({events_key(self.id): after}, count=1000, block=block_ms)
            return parse_entries(reply[0][1]) if reply else []

        last, ending = "0-0", False
        try:
            while True:
                events = await read(last, _TAIL_MS if ending else _BLOCK_MS)
                last, wanted, finished = _take(events, last, index)
                for ev in wanted:
                    yield ev
                if finished:
                    return
                if not events:
                    if ending:
                        return
                    ending = await ended()
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self.store.where}: {exc}") from exc
        finally:
            await client.aclose()


def _take(events: list[Event], last: str, index: Optional[int]) -> tuple[str, list[Event], bool]:
    """From a batch read after ``last``: the new position, the events a follower of
    ``index`` (None: every request) sees, and whether its request has ended."""
    wanted: list[Event] = []
    for ev in events:
        last = ev.id
        if index is None or ev.index == index:
            wanted.append(ev)
            if index is not None and ev.done:
                return last, wanted, True
    return last, wanted, False


class _PlainProgress:
    """``Job.wait(progress=True)``: a summary line on stderr every ``every`` s, and at the end."""

    def __init__(self, out: TextIO = None, every: float = 2.0):
        self.out = out
        self.every = every
        self.last_key = None
        self.last_time = 0.0

    def __call__(self, info: JobInfo) -> None:
        now = time.monotonic()
        key = (info.status, info.done, info.tokens)
        if info.status.terminal or (key != self.last_key and now - self.last_time >= self.every):
            print(summary(info), file=self.out or sys.stderr, flush=True)
            self.last_key, self.last_time = key, now
