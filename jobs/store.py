"""The Redis job store.

The keys of job ``J`` are :class:`JobKeys` (they expire after the retention):

- ``mlxq:job:J``          ``job``: hash: status, model, created_at, started_at,
                          finished_at, retention, tokens, total and one count per
                          request status
- ``mlxq:job:J:state``    ``states``: hash: index -> request status; a queued request has
                          none (absent means queued, below the job's total)
- ``mlxq:job:J:res``      ``results``: hash: index -> result line (JSON), once the request ended
- ``mlxq:job:J:req``      ``requests``: hash: index -> the request, as JSON with its custom_id
                          (:func:`stored_request`)
- ``mlxq:job:J:cid``      ``custom_ids``: hash: custom_id -> index (duplicate detection)
- ``mlxq:job:J:events``   ``events``: stream: partial results (see :mod:`mlxq.jobs.events`)
- ``mlxq:job:J:attempts`` ``attempts``: hash: index -> times the request started

and the keys of every job (they do not expire):

- ``mlxq:leases``         :data:`LEASES`: sorted set: running requests (``J:INDEX``)
                          by the time their lease lapses
- ``mlxq:jobs``           :data:`JOBS`: sorted set: job ids by creation time
- ``mlxq:unsent:MODEL``   :func:`unsent_key`: sorted set: ids of the model's jobs whose
                          Celery messages are not all sent yet, by the time their
                          sender's claim runs out (0: nobody sends for it now)

Every change of state that touches more than one key is one Lua script
(:mod:`mlxq.jobs.scripts`). Every time stored here or compared (lease lapses,
senders' claims, a job's ``created_at``/``started_at``/``finished_at``) is the
Redis server's clock: processes on other machines may keep other times.
"""

from __future__ import annotations

import functools
import inspect
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple, Optional

import redis

from .defaults import DEFAULT_LEASE, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_TOKENS, DEFAULT_RETENTION, KEY_PREFIX
from .errors import JobNotFound, StoreError
from .events import DEFAULT_STREAM_MAXLEN, EMIT_SCRIPT, Event, emit_args, events_key, parse_entries
from .ingest import Line, repeated_id, request_from_json
from . import scripts
from .models import ErrorInfo, JobStatus, Request, RequestStatus, ResultLine, model_name
from .urls import mask_url
from .workers import WorkerRegistry

__all__ = ["JobStore", "JobInfo", "JobKeys", "Start", "Entry", "connect", "stored_request", "unsent_key"]

_CHUNK = 1000
LEASES = f"{KEY_PREFIX}:leases"
JOBS = f"{KEY_PREFIX}:jobs"
#: Seconds a job's sender has to send (or renew its claim) before a worker sends for it.
SEND_GRACE = 60.0


def unsent_key(model: str) -> str:
    """The sorted set of ``model``'s jobs whose messages are not all sent."""
    return f"{KEY_PREFIX}:unsent:{model_name(model)}"


def stored_request(line: Line) -> bytes:
    """A valid line as the job store keeps it: JSON that loads back to its request, with its custom_id.

    A line in the seed's form is kept as it was read; when it gives no id (or
    ``null``), its line number is appended as ``custom_id`` (of a repeated key,
    JSON readers take the last). Other requests are serialised.
    """
    if line.raw is not None:
        if line.explicit_id:
            return line.raw
        return line.raw.rstrip()[:-1] + b',"custom_id":' + json.dumps(line.custom_id).encode() + b"}"
    body = line.request.model_dump_json(exclude_none=True)
    if line.request.custom_id is None:  # an implicit id (the line number) is stored too
        body = '{"custom_id":' + json.dumps(line.custom_id) + ("," + body[1:] if body != "{}" else "}")
    return body.encode()


def _budget(body: Optional[bytes]) -> int:
    """The ``max_tokens`` of a stored, valid request (:func:`stored_request`); 0 when it is gone."""
    return 0 if body is None else json.loads(body).get("max_tokens", DEFAULT_MAX_TOKENS)


class Entry(NamedTuple):
    """A parsed line as :meth:`JobStore.add_entries` stores it.

    Plain values only: a batch of entries holds no request objects, which
    would keep Python's garbage collector busy while a big file is stored.
    """

    index: int
    lineno: int
    custom_id: str
    explicit_id: bool
    body: Optional[bytes]  #: the request as stored (:func:`stored_request`); None for an invalid line
    error: Optional[str]

    @classmethod
    def of(cls, line: Line) -> "Entry":
        body = stored_request(line) if line.request is not None else None
        return cls(line.index, line.lineno, line.custom_id, line.explicit_id, body, line.error)


def connect(url: str) -> redis.Redis:
    """A client for ``url`` with retries on connection errors (no I/O yet)."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    try:
        return redis.Redis.from_url(
            url,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), 6),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            socket_connect_timeout=5,
            health_check_interval=30,
        )
    except ValueError as exc:
        raise StoreError(f"bad Redis URL {mask_url(url)}: {exc}") from exc


def _wrap(method):
    """Turn Redis exceptions into :class:`StoreError` naming the (masked) server."""

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def gen_wrapper(self: "JobStore", *args, **kwargs):
            try:
                yield from method(self, *args, **kwargs)
            except redis.RedisError as exc:
                raise StoreError(f"Redis at {self.where}: {exc}") from exc

        return gen_wrapper

    @functools.wraps(method)
    def wrapper(self: "JobStore", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self.where}: {exc}") from exc

    return wrapper


class JobKeys(NamedTuple):
    """The keys of one job, in the order the job scripts take them as KEYS (and name them)."""

    job: str
    states: str
    results: str
    requests: str
    custom_ids: str
    events: str
    attempts: str
    leases: str = LEASES  # shared by every job

    @classmethod
    def of(cls, job_id: str) -> "JobKeys":
        base = f"{KEY_PREFIX}:job:{job_id}"
        return cls(base, f"{base}:state", f"{base}:res", f"{base}:req", f"{base}:cid", events_key(job_id),
                   f"{base}:attempts")

    @property
    def own(self) -> tuple[str, ...]:
        """The job's own keys, which expire with it (not the shared lease set)."""
        return self[:-1]


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    status: JobStatus
    model: str
    created_at: float
    total: int
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    tokens: int = 0  # generated so far, over the job's ended requests
    prompt_tokens: int = 0  # of the completed requests
    cached_tokens: int = 0  # of those, served by a worker's prefix cache
    #: The Redis server's time when this was read: the clock of the times above.
    now: Optional[float] = field(default=None, compare=False)

    @property
    def done(self) -> int:
        return self.completed + self.failed + self.cancelled

    @property
    def cached_share(self) -> Optional[float]:
        """The share of the completed requests' prompt tokens that a prefix cache served."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "model": self.model,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "counts": {
                "total": self.total,
                "queued": self.queued,
                "running": self.running,
                "completed": self.completed,
                "failed": self.failed,
                "cancelled": self.cancelled,
            },
        }


@dataclass(frozen=True)
class Start:
    """What :meth:`JobStore.start` decided for one request."""

    run: bool
    redelivered: bool = False
    exhausted: bool = False  # it used up its attempts: record its failure


class JobStore:
    """All of mlxq's Redis state, behind methods that say what they mean."""

    def __init__(self, client: redis.Redis, retention: int = DEFAULT_RETENTION, where: str = "?"):
        self.redis = client
        self.retention = retention
        self.where = where
        self._start = client.register_script(scripts.START)
        self._finish = client.register_script(scripts.FINISH)
        self._cancel = client.register_script(scripts.CANCEL)
        self._requeue = client.register_script(scripts.REQUEUE)
        self._retry = client.register_script(scripts.RETRY)
        self._emit = client.register_script(EMIT_SCRIPT)
        self._claim_unsent = client.register_script(scripts.CLAIM_UNSENT)
        self._renew = client.register_script(scripts.RENEW)
        self._due = client.register_script(scripts.DUE)
        self.stream_maxlen = DEFAULT_STREAM_MAXLEN

    @classmethod
    def from_url(cls, url: str, retention: int = DEFAULT_RETENTION) -> "JobStore":
        return cls(connect(url), retention, where=mask_url(url))

    @functools.cached_property
    def workers(self) -> WorkerRegistry:
        """The live workers' heartbeat entries (:mod:`mlxq.jobs.workers`)."""
        return WorkerRegistry(self.redis, self.where)

    # -- keys ---------------------------------------------------------------

    @staticmethod
    def keys(job_id: str) -> JobKeys:
        return JobKeys.of(job_id)

    @staticmethod
    def member(job_id: str, index: int) -> str:
        """A request's member in the lease set."""
        return f"{job_id}:{index}"

    # -- creating a job -----------------------------------------------------

    @staticmethod
    def new_job_id() -> str:
        """128 random bits: job ids cannot be guessed."""
        return secrets.token_hex(16)

    @_wrap
    def ping(self) -> None:
        self.redis.ping()

    @_wrap
    def clock(self) -> float:
        """The Redis server's time (Unix seconds): the one clock mlxq decides by."""
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def add_lines(self, job_id: str, lines: list[Line]) -> list[Optional[str]]:
        """Store a batch of parsed lines; returns the error each line failed with (None: valid)."""
        return self.add_entries(job_id, [Entry.of(line) for line in lines])

    @_wrap
    def add_entries(self, job_id: str, entries: list[Entry]) -> list[Optional[str]]:
        """Store a batch of a new job's lines, in order; returns the error each failed with (None: valid).

        A valid line whose ``custom_id`` repeats an earlier line's fails. One
        sender stores a job before any other process can see it, so the repeats
        are found with one read per batch and everything is written in one
        command per hash.
        """
        keys = self.keys(job_id)
        first: dict[int, int] = {}  # a repeating line's index -> the index whose id it repeats
        owner: dict[str, int] = {}
        for entry in entries:
            if entry.body is not None:
                if entry.custom_id in owner:
                    first[entry.index] = owner[entry.custom_id]
                else:
                    owner[entry.custom_id] = entry.index
        if owner:
            for (custom_id, index), was in zip(list(owner.items()), self.redis.hmget(keys.custom_ids, list(owner))):
                if was is not None:
                    first[index] = int(was)
                    del owner[custom_id]
        errors: list[Optional[str]] = []
        requests: dict[int, bytes] = {}
        states: dict[int, str] = {}  # only the failed: a queued request has no state
        results: dict[int, str] = {}
        for entry in entries:
            error = repeated_id(entry, first[entry.index]) if entry.index in first else entry.error
            errors.append(error)
            if error is None:
                requests[entry.index] = entry.body
            else:
                requests[entry.index] = json.dumps({"custom_id": entry.custom_id}).encode()
                results[entry.index] = ResultLine(
                    index=entry.index, custom_id=entry.custom_id, status=RequestStatus.FAILED,
                    error=ErrorInfo(code="invalid_request", message=error),
                ).model_dump_json()
                states[entry.index] = RequestStatus.FAILED.value
        pipe = self.redis.pipeline(transaction=False)
        if owner:
            pipe.hset(keys.custom_ids, mapping=owner)
        if requests:
            pipe.hset(keys.requests, mapping=requests)
        if results:
            pipe.hset(keys.results, mapping=results)
            pipe.hset(keys.states, mapping=states)
        pipe.execute()
        return errors

    @_wrap
    def finalize(self, job_id: str, model: str, total: int, valid: int) -> JobInfo:
        """Make a fully stored job visible and queued, in one step; its sender holds the claim
        on sending its messages for :data:`SEND_GRACE` seconds."""
        now = self.clock()
        keys = self.keys(job_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            keys.job,
            mapping={
                "status": JobStatus.QUEUED.value, "model": model, "created_at": repr(now),
                "total": total, "queued": valid, "running": 0, "completed": 0,
                "failed": total - valid, "cancelled": 0, "retention": self.retention, "sent": 0,
            },
        )
        for key in keys.own:
            pipe.expire(key, self.retention)
        pipe.delete(keys.custom_ids)  # read only while storing: no need to keep it
        pipe.zadd(JOBS, {job_id: now})
        pipe.zadd(unsent_key(model), {job_id: now + SEND_GRACE})
        pipe.execute()
        return self.info(job_id)

    # -- sending a job's messages -------------------------------------------
    #
    # A job is stored and made visible in one step; its Celery messages (one
    # per request) are then sent a window at a time, in index order: the
    # sender sends the first window, and workers of the job's model send the
    # next ones as their queue runs short (mlxq.worker.leases), so the queue
    # holds a window, not the whole job. The job hash's `sent` says how far
    # the messages have gone; the job stays in its model's unsent set until
    # all have. Its score is a claim: the time (Redis's clock) until which
    # one sender sends for it, or 0 when nobody does and a worker may take it
    # on. A sender that dies with its claim (killed, or its connection lost)
    # leaves it to run out, and a worker then sends from `sent` on. A request
    # sent twice is harmless: the first delivery claims it, the other finds
    # it taken.

    @_wrap
    def sending(self, job_id: str, grace: float = SEND_GRACE, model: Optional[str] = None) -> None:
        """Renew this sender's claim on the job's sending."""
        self._renew(keys=[unsent_key(model or self.model_of(job_id) or "")], args=[grace, job_id])

    @_wrap
    def sent(self, job_id: str, model: Optional[str] = None, cursor: Optional[int] = None) -> None:
        """Every queued request of the job has its message (with ``cursor``, the job's
        total: the messages of every index below it are sent)."""
        pipe = self.redis.pipeline(transaction=True)
        if cursor is not None:
            pipe.hset(self.keys(job_id).job, "sent", cursor)
        pipe.zrem(unsent_key(model or self.model_of(job_id) or ""), job_id)
        pipe.execute()

    @_wrap
    def release(self, job_id: str, model: str, cursor: Optional[int] = None) -> None:
        """Give up the claim on a job's sending (its messages before ``cursor`` are sent):
        the next window is for a worker to send."""
        pipe = self.redis.pipeline(transaction=True)
        if cursor is not None:
            pipe.hset(self.keys(job_id).job, "sent", cursor)
        pipe.zadd(unsent_key(model), {job_id: 0}, xx=True)
        pipe.execute()

    @_wrap
    def unsent(self, job_id: str, model: Optional[str] = None) -> bool:
        """Whether the job's sender has not yet sent every message (or died trying)."""
        return self.redis.zscore(unsent_key(model or self.model_of(job_id) or ""), job_id) is not None

    @_wrap
    def claim_unsent(self, model: str, grace: float = SEND_GRACE, limit: int = 10) -> list[tuple[str, bool]]:
        """Jobs of ``model`` that nobody sends for, now claimed by the caller for ``grace``
        seconds: (job id, whether its sender died holding the claim)."""
        out = self._claim_unsent(keys=[unsent_key(model)], args=[grace, limit])
        return [(out[i].decode(), float(out[i + 1]) > 0) for i in range(0, len(out), 2)]

    @_wrap
    def next_window(self, job_id: str, limit: int) -> tuple[list[int], int, int]:
        """The job's next ``limit`` queued requests whose messages are not sent yet:
        (their indices, the cursor past them, the job's total)."""
        total, sent = self.redis.hmget(self.keys(job_id).job, ["total", "sent"])
        total = int(total or 0)
        cursor = int(sent) if sent is not None else total  # a job stored before windows: all sent
        out: list[int] = []
        while cursor < total and len(out) < limit:
            idx = list(range(cursor, min(cursor + min(_CHUNK, limit - len(out)), total)))
            out += self._queued(job_id, idx)
            cursor = idx[-1] + 1
        return out, cursor, total

    @_wrap
    def longest_first(self, job_id: str, indices: list[int]) -> list[int]:
        """``indices`` in the order their messages go out: the most ``max_tokens`` first
        (ties in index order).

        A worker fills a row as soon as one frees, so the requests that run last
        decide how long a job's final rows run nearly empty; the longest
        running first leaves short ones to fill the end.
        """
        if len(indices) < 2:
            return list(indices)
        bodies = self.redis.hmget(self.keys(job_id).requests, indices)
        return [i for _, i in sorted(zip(map(_budget, bodies), indices), key=lambda pair: -pair[0])]

    def _queued(self, job_id: str, indices: list[int]) -> list[int]:
        """Those of ``indices`` (below the job's total) that are queued: they have no state."""
        return [i for i, s in zip(indices, self.redis.hmget(self.keys(job_id).states, indices)) if s is None]

    @_wrap
    def queue_length(self, queue: str) -> int:
        """Messages waiting in a Celery queue (its Redis list)."""
        return self.redis.llen(queue)

    @_wrap
    def discard(self, job_id: str) -> None:
        self.redis.delete(*self.keys(job_id).own)

    # -- running requests ---------------------------------------------------

    @_wrap
    def start(
        self, job_id: str, index: int, lease: float = DEFAULT_LEASE, max_attempts: int = DEFAULT_MAX_ATTEMPTS
    ) -> Start:
        """Claim request ``index`` for this worker under a lease of ``lease`` seconds."""
        outcome = self._start(
            keys=self.keys(job_id),
            args=[index, lease, max_attempts, self.member(job_id, index)],
        )
        return Start(run=outcome in (1, 2), redelivered=outcome == 2, exhausted=outcome == -2)

    @_wrap
    def load_request(self, job_id: str, index: int) -> tuple[str, Request]:
        """The custom_id and request stored at ``index``."""
        data = self.redis.hget(self.keys(job_id).requests, index)
        if data is None:
            raise JobNotFound(job_id, f"job {job_id} has no request {index}")
        return json.loads(data)["custom_id"], request_from_json(data)

    @_wrap
    def finish(self, job_id: str, line: ResultLine, pipeline=None) -> bool:
        """Record a request's end once; a second call for it changes nothing."""
        usage = line.result.usage if line.result else None
        args = [line.index, line.status.value, line.model_dump_json(), self.member(job_id, line.index),
                usage.completion_tokens if usage else 0, usage.prompt_tokens if usage else 0,
                usage.cached_tokens if usage else 0]
        return self._finish(keys=self.keys(job_id), args=args, client=pipeline) == 1

    # -- leases -------------------------------------------------------------------

    @_wrap
    def renew(self, members: Iterable[str], lease: float) -> None:
        """Push back the lapse of these leases (those that still exist)."""
        members = list(members)
        if members:
            self._renew(keys=[LEASES], args=[lease, *members])

    @_wrap
    def lapsed(self, limit: int = 100) -> list[tuple[str, int]]:
        """(job_id, index) of requests whose lease has lapsed: their worker is gone."""
        members = self._due(keys=[LEASES], args=[limit])
        out = []
        for m in members:
            job_id, _, index = m.decode().rpartition(":")
            out.append((job_id, int(index)))
        return out

    @_wrap
    def requeue(self, job_id: str, index: int, release: bool = False) -> bool:
        """Put a request with a lapsed lease (or, with ``release``, one this worker
        holds) back in the queue; True if it must be sent again."""
        outcome = self._requeue(
            keys=self.keys(job_id),
            args=[index, self.member(job_id, index), "1" if release else "0"],
        )
        return outcome == 1

    @_wrap
    def retry(self, job_id: str) -> list[int]:
        """Queue the failed requests of ``job_id`` again (not those with invalid input)."""
        keys = self.keys(job_id)
        retention = self.redis.hget(keys.job, "retention") or self.retention
        out = self._retry(keys=keys, args=[int(retention)])
        if out is None:
            raise JobNotFound(job_id)
        return sorted(int(i) for i in out)

    @_wrap
    def model_of(self, job_id: str) -> Optional[str]:
        model = self.redis.hget(self.keys(job_id).job, "model")
        return model.decode() if model is not None else None

    @_wrap
    def is_cancelling(self, job_id: str) -> bool:
        status = self.redis.hget(self.keys(job_id).job, "status")
        return status is None or JobStatus(status.decode()) in (JobStatus.CANCELLING, JobStatus.CANCELLED)

    @_wrap
    def request_states(self, job_id: str, indices: Iterable[int]) -> list[Optional[str]]:
        """The status of each request (a :class:`RequestStatus` value); None for an index
        the job does not have, or a job that does not exist."""
        indices = list(indices)
        keys = self.keys(job_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys.job, "total")
        pipe.hmget(keys.states, indices)
        total, values = pipe.execute()
        total = int(total) if total is not None else 0
        return [v.decode() if v is not None else RequestStatus.QUEUED.value if 0 <= i < total else None
                for i, v in zip(indices, values)]

    # -- partial results ---------------------------------------------------------

    @_wrap
    def emit(self, events: Iterable[Event]) -> None:
        """Append and publish ``events``, in order, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            keys, args = emit_args(event, self.stream_maxlen, self.retention)
            self._emit(keys=keys, args=args, client=pipe)
        pipe.execute()

    @_wrap
    def read_events(self, job_id: str, after: str = "0-0", block_ms: Optional[int] = None) -> list[Event]:
        """Events of ``job_id`` after Stream id ``after``; waits up to ``block_ms`` for one."""
        reply = self.redis.xread({events_key(job_id): after}, count=1000, block=block_ms)
        return parse_entries(reply[0][1]) if reply else []

    # -- reading and steering a job ------------------------------------------

    @_wrap
    def info(self, job_id: str) -> JobInfo:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys(job_id).job)
        pipe.time()
        h, (seconds, micros) = pipe.execute()
        if not h or b"status" not in h:
            raise JobNotFound(job_id)
        d = {k.decode(): v.decode() for k, v in h.items()}

        def num(name: str) -> int:
            return int(d.get(name, 0))

        return JobInfo(
            job_id=job_id, status=JobStatus(d["status"]), model=d.get("model", ""),
            created_at=float(d["created_at"]), total=num("total"), queued=num("queued"),
            running=num("running"), completed=num("completed"), failed=num("failed"),
            cancelled=num("cancelled"), tokens=num("tokens"), prompt_tokens=num("prompt_tokens"),
            cached_tokens=num("cached_tokens"), started_at=float(d["started_at"]) if "started_at" in d else None,
            finished_at=float(d["finished_at"]) if "finished_at" in d else None,
            now=seconds + micros / 1e6,
        )

    @_wrap
    def cancel(self, job_id: str) -> JobStatus:
        status = self._cancel(keys=self.keys(job_id))
        if status is None:
            raise JobNotFound(job_id)
        return JobStatus(status.decode())

    @_wrap
    def queued_indices(self, job_id: str, sent_only: bool = False) -> Iterator[int]:
        """Indices of the job's queued requests, in order, a chunk at a time; with
        ``sent_only``, only those whose message has been sent (see :meth:`next_window`)."""
        total, sent = self.redis.hmget(self.keys(job_id).job, ["total", "sent"])
        if total is None:
            raise JobNotFound(job_id)
        total = int(total)
        if sent_only and sent is not None:
            total = min(total, int(sent))
        for lo in range(0, total, _CHUNK):
            yield from self._queued(job_id, list(range(lo, min(lo + _CHUNK, total))))

    @_wrap
    def results(self, job_id: str) -> Iterator[ResultLine]:
        """One line per request, in input order; unfinished ones carry no result."""
        total = self.info(job_id).total
        keys = self.keys(job_id)
        for lo in range(0, total, _CHUNK):
            idx = list(range(lo, min(lo + _CHUNK, total)))
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(keys.results, idx)
            pipe.hmget(keys.states, idx)
            stored, states = pipe.execute()
            missing = [i for i, s in zip(idx, stored) if s is None]
            ids = dict(zip(missing, self.redis.hmget(keys.requests, missing))) if missing else {}
            for i, s, st in zip(idx, stored, states):
                if s is not None:
                    yield ResultLine.model_validate_json(s)
                    continue
                status = RequestStatus(st.decode()) if st else RequestStatus.QUEUED
                error = None
                if status is RequestStatus.CANCELLED:
                    error = ErrorInfo(code="cancelled", message="the job was cancelled before this request ran")
                custom_id = json.loads(ids[i])["custom_id"] if ids.get(i) else str(i)
                yield ResultLine(index=i, custom_id=custom_id, status=status, error=error)

    @_wrap
    def unfinished_jobs(self) -> list[JobInfo]:
        """Jobs that have not ended (queued, running or cancelling)."""
        ids = self.redis.zrange(JOBS, 0, -1)
        out = []
        for raw in ids:
            try:
                info = self.info(raw.decode())
            except JobNotFound:
                continue
            if not info.status.terminal:
                out.append(info)
        return out

    @_wrap
    def list_jobs(self, limit: int = 50) -> list[JobInfo]:
        ids = self.redis.zrevrange(JOBS, 0, limit - 1)
        out = []
        for raw in ids:
            try:
                out.append(self.info(raw.decode()))
            except JobNotFound:
                self.redis.zrem(JOBS, raw)
        return out
