"""Run one request of a job: claim it, hand it to the engine, record its end once."""

from __future__ import annotations

import logging
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Optional

from jobs.defaults import DEFAULT_CANCEL_POLL
from jobs.errors import EngineError
from jobs.events import Event
from jobs.models import ErrorInfo, Output, RequestStatus, ResultLine, Usage
from jobs.store import JobStore

from .engine import Engine, Generation, RequestRejected, StepEvent
from .publisher import Publisher
from .sampling import random_seed

__all__ = ["Runner", "current_runner", "set_runner"]

log = logging.getLogger(__name__)

_runner: Optional["Runner"] = None


def set_runner(runner: Optional["Runner"]) -> None:
    global _runner
    _runner = runner


def current_runner() -> "Runner":
    if _runner is None:
        raise EngineError("this process has no engine: start workers with `mlxq worker`")
    return _runner


class Runner:
    """Glue between Celery's task threads, the job store and the engine."""

    def __init__(
        self, store: JobStore, engine: Engine, publisher: Publisher, cancel_poll: float = DEFAULT_CANCEL_POLL
    ):
        self.store = store
        self.engine = engine
        self.publisher = publisher
        self.cancel_poll = cancel_poll
        engine.on_step = self.on_step

    def on_step(self, steps: list[StepEvent]) -> None:
        """Called by the engine thread: hand each step's new text to the publisher."""
        self.publisher.put(
            Event(job_id=s.handle.tag[0], index=s.handle.tag[1], custom_id=s.handle.tag[2], delta=s.delta)
            for s in steps
        )

    def run(self, job_id: str, index: int) -> str:
        claim = self.store.start(job_id, index)
        if not claim.run:
            return "skipped"
        custom_id, request = self.store.load_request(job_id, index)
        line = ResultLine(index=index, custom_id=custom_id, status=RequestStatus.FAILED)
        try:
            prepared = self.engine.prepare(request, request.seed or random_seed())
        except RequestRejected as exc:
            return self._end(job_id, line, error=ErrorInfo(code="invalid_request", message=str(exc)))
        try:
            generation = self._wait(job_id, self.engine.submit(prepared, tag=(job_id, index, custom_id)))
        except EngineError as exc:
            return self._end(job_id, line, error=ErrorInfo(code="engine_error", message=str(exc)))
        if generation.finish_reason == "cancelled":
            return self._end(
                job_id, line.model_copy(update={"status": RequestStatus.CANCELLED}),
                error=ErrorInfo(code="cancelled", message="the job was cancelled while this request ran"),
                tail=generation.tail,
            )
        output = Output(
            response=generation.text,
            usage=Usage(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                total_tokens=generation.prompt_tokens + generation.completion_tokens,
            ),
            finish_reason=generation.finish_reason,
        )
        return self._end(
            job_id, line.model_copy(update={"status": RequestStatus.COMPLETED, "result": output}),
            tail=generation.tail,
        )

    def _wait(self, job_id: str, handle) -> Generation:
        while True:
            try:
                return handle.result(timeout=self.cancel_poll)
            except FutureTimeout:
                if not handle.cancelled.is_set() and self.store.is_cancelling(job_id):
                    self.engine.cancel(handle)

    def _end(self, job_id: str, line: ResultLine, error: Optional[ErrorInfo] = None, tail: str = "") -> str:
        """Store the result once, then publish the request's end event."""
        if error is not None:
            line = line.model_copy(update={"error": error})
        if not self.store.finish(job_id, line):
            log.info("request %s of job %s had already ended; result kept", line.index, job_id)
            return line.status.value
        result = line.result
        self.publisher.put([Event(
            job_id=job_id, index=line.index, custom_id=line.custom_id, delta=tail, done=True,
            status=line.status.value,
            finish_reason=result.finish_reason if result else None,
            usage=result.usage.model_dump() if result else None,
            error=line.error.model_dump() if line.error else None,
        )])
        return line.status.value
