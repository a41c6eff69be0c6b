"""Run one request of a job: claim it, hand it to the engine, record its end once."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Iterable, Optional, TypeVar

from celery.exceptions import Reject

from mlxq.jobs.defaults import DEFAULT_CANCEL_POLL, DEFAULT_LEASE, DEFAULT_MAX_ATTEMPTS
from mlxq.jobs.errors import EngineError, StoreError
from mlxq.jobs.events import Event
from mlxq.jobs.models import ErrorInfo, Output, RequestStatus, ResultLine, Usage, random_seed
from mlxq.jobs.store import JobStore

from .engine import Engine, Generation, StepEvent
from .errors import EngineStopped, RequestRejected
from .publisher import Publisher
from .tools import extract_tool_calls, first_marker, has_tools, stream_tail

__all__ = ["Runner", "current_runner", "set_runner"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_runner: Optional["Runner"] = None


def set_runner(runner: Optional["Runner"]) -> None:
    global _runner
    _runner = runner


def current_runner() -> "Runner":
    if _runner is None:
        raise EngineError("this process has no engine: start workers with `mlxq worker`")
    return _runner


def stopped_tail(generation: Generation, markers: tuple[str, ...]) -> str:
    """The end event's delta for a request stopped before its end (cancelled,
    timed out): the text no step carried, less any tool call its deltas held
    back (``markers``), as no result parses it out."""
    text = generation.text
    streamed = len(text) - len(generation.tail)
    return text[streamed:max(streamed, first_marker(text, markers))]


class Runner:
    """Glue between Celery's task threads, the job store and the engine."""

    def __init__(
        self,
        store: JobStore,
        engine: Engine,
        publisher: Publisher,
        send: Callable[[str, Iterable[int], str], int],
        lease: float = DEFAULT_LEASE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        cancel_poll: float = DEFAULT_CANCEL_POLL,
        redis_patience: float = 300.0,
    ):
        self.store = store
        self.engine = engine
        self.publisher = publisher
        self.send = send
        self.lease = lease
        self.max_attempts = max_attempts
        self.cancel_poll = cancel_poll
        self.redis_patience = redis_patience
        self._running: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._cancel_seen: dict[str, tuple[float, bool]] = {}  # job -> (checked at, cancelling)
        engine.on_step = self.on_step

    def running(self) -> list[str]:
        """Lease members of the requests this worker is running now."""
        with self._lock:
            return [self.store.member(j, i) for j, i in self._running]

    def on_step(self, steps: list[StepEvent]) -> None:
        """Called by the engine thread: hand each step's new text to the publisher."""
        now = time.time()
        self.publisher.put(
            Event(job_id=s.handle.tag[0], index=s.handle.tag[1], custom_id=s.handle.tag[2], delta=s.delta, ts=now)
            for s in steps
        )

    def _patiently(self, what: str, fn: Callable[[], T]) -> T:
        """Call ``fn``, retrying with backoff while Redis is unreachable (a restart)."""
        deadline = time.monotonic() + self.redis_patience
        delay = 0.2
        while True:
            try:
                return fn()
            except StoreError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s: %s; retrying in %.1fs", what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request runs here (each has ended or been released); False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._running:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def run(self, job_id: str, index: int) -> str:
        if not self.engine.accepting:
            # Shutting down: hand the message back to the broker for another worker.
            raise Reject("the worker is shutting down", requeue=True)
        claim = self._patiently("claiming a request", lambda: self.store.start(
            job_id, index, self.lease, self.max_attempts))
        if not (claim.run or claim.exhausted):
            return "skipped"
        custom_id, request = self._patiently("loading a request", lambda: self.store.load_request(job_id, index))
        line = ResultLine(index=index, custom_id=custom_id, status=RequestStatus.FAILED)
        if claim.exhausted:
            return self._end(job_id, line, error=ErrorInfo(
                code="attempts_exhausted",
                message=f"gave up after {self.max_attempts} attempts: its worker died each time",
            ))
        if claim.redelivered:
            log.warning("request %s of job %s: its worker died; running it again", index, job_id)
        with self._lock:
            self._running.add((job_id, index))
        try:
            return self._generate(job_id, line, request)
        finally:
            with self._lock:
                self._running.discard((job_id, index))

    def _generate(self, job_id: str, line: ResultLine, request) -> str:
        try:
            prepared = self.engine.prepare(request, request.seed or random_seed())
        except RequestRejected as exc:
            return self._end(job_id, line, error=ErrorInfo(code="invalid_request", message=str(exc)))
        except Exception as exc:  # a tokenizer or template bug fails this request alone
            log.exception("preparing request %s of job %s failed", line.index, job_id)
            return self._end(job_id, line, error=ErrorInfo(code="engine_error", message=f"{type(exc).__name__}: {exc}"))
        try:
            generation = self._wait(job_id, self.engine.submit(prepared, tag=(job_id, line.index, line.custom_id)))
        except EngineStopped:
            return self._release(job_id, line.index)
        except EngineError as exc:
            return self._end(job_id, line, error=ErrorInfo(code="engine_error", message=str(exc)))
        if generation.finish_reason == "cancelled":
            return self._end(
                job_id, line.model_copy(update={"status": RequestStatus.CANCELLED}),
                error=ErrorInfo(code="cancelled", message="the job was cancelled while this request ran"),
                tail=stopped_tail(generation, prepared.stream_stops),
            )
        if generation.finish_reason == "timeout":
            return self._end(job_id, line, tail=stopped_tail(generation, prepared.stream_stops), error=ErrorInfo(
                code="timeout",
                message=f"stopped after the time limit of {self.engine.time_limit:g}s "
                        f"({generation.completion_tokens} tokens generated)",
            ))
        # Tool calls leave the response only for requests with tools or functions.
        response, tool_calls = extract_tool_calls(request, generation.text, self.engine.loaded.tokenizer)
        output = Output(
            response=response,
            tool_calls=tool_calls,
            usage=Usage(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                total_tokens=generation.prompt_tokens + generation.completion_tokens,
                cached_tokens=generation.cached_tokens,
            ),
            finish_reason=generation.finish_reason,
        )
        tail = generation.tail
        if request.stream and has_tools(request):
            # Its deltas stopped before any tool call: end with the rest of the response.
            tail = stream_tail(generation.text[:len(generation.text) - len(tail)], response)
        return self._end(
            job_id, line.model_copy(update={"status": RequestStatus.COMPLETED, "result": output}),
            tail=tail,
        )

    def _wait(self, job_id: str, handle) -> Generation:
        while True:
            try:
                return handle.result(timeout=self.cancel_poll)
            except FutureTimeout:
                try:
                    cancelling = self._cancelling(job_id)
                except StoreError:
                    continue  # Redis is restarting: keep generating
                if cancelling and not handle.cancelled.is_set():
                    self.engine.cancel(handle)

    def _release(self, job_id: str, index: int) -> str:
        """The worker is stopping: put the request back in the queue, unharmed."""
        if self._patiently("releasing a request", lambda: self.store.requeue(job_id, index, release=True)):
            model = self.store.model_of(job_id)
            if model is not None:
                self.send(job_id, [index], model)
        log.info("request %s of job %s: released for another worker", index, job_id)
        return "released"

    def _cancelling(self, job_id: str) -> bool:
        """Whether ``job_id`` is being cancelled: one look at Redis per job per poll
        interval, shared by every request of that job running here."""
        now = time.monotonic()
        with self._lock:
            seen = self._cancel_seen.get(job_id)
        if seen is not None and now - seen[0] < self.cancel_poll:
            return seen[1]
        cancelling = self.store.is_cancelling(job_id)
        with self._lock:
            self._cancel_seen[job_id] = (now, cancelling)
            if len(self._cancel_seen) > 1024:  # forget jobs no longer looked at
                cutoff = now - 10 * self.cancel_poll
                self._cancel_seen = {j: v for j, v in self._cancel_seen.items() if v[0] > cutoff}
        return cancelling

    def _end(self, job_id: str, line: ResultLine, error: Optional[ErrorInfo] = None, tail: str = "") -> str:
        """Store the result once, then publish the request's end event."""
        if error is not None:
            line = line.model_copy(update={"error": error})
        if not self._patiently("storing a result", lambda: self.store.finish(job_id, line)):
            log.info("request %s of job %s had already ended; result kept", line.index, job_id)
            return "skipped"
        result = line.result
        self.publisher.put([Event(
            job_id=job_id, index=line.index, custom_id=line.custom_id, delta=tail, done=True,
            status=line.status.value,
            finish_reason=result.finish_reason if result else None,
            usage=result.usage.model_dump() if result else None,
            error=line.error.model_dump() if line.error else None,
            tool_calls=[c.model_dump() for c in result.tool_calls] if result and result.tool_calls else None,
        )])
        return line.status.value
