"""Cloudflare's Workers AI REST API: ``POST /client/v4/accounts/{account_id}/ai/run/{model}``.

- A body in the seed's input schema is a one-request job: the answer is the
  seed's output in Cloudflare's envelope, or with ``"stream": true`` server-sent
  events, ``data: {"response": ...}`` then ``data: [DONE]``. A client that goes
  away cancels its request.
- ``?queueRequest=true`` with ``{"requests": [...]}`` queues a batch (each request
  may carry ``external_reference``) and answers its ``request_id``; the same
  call with ``{"request_id": ...}`` answers ``queued`` or ``running``, then the
  responses. A client that goes away cancels nothing of a batch.

The account id is not checked: mlxq has no accounts.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlxq.client import Job
from mlxq.jobs.errors import InputError, JobNotFound
from mlxq.jobs.ingest import read_objects
from mlxq.jobs.models import JobStatus, RequestStatus, ResultLine
from mlxq.jobs.workers_ai import CODES, envelope, failure, kind_of, output, sse_data

__all__ = ["routes"]

PATH = "/client/v4/accounts/{account_id}/ai/run/{model:path}"


def routes() -> list[Route]:
    return [Route(PATH, run, methods=["POST"])]


def _error(kind: str, message: str) -> JSONResponse:
    status, body = failure(kind, message)
    return JSONResponse(body, status_code=status)


async def _json(request: Request) -> Any:
    data = await request.body()
    if not data:
        raise _Refused("incomplete_request", "Request is missing a body: send a JSON object")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Refused("bad_input", f"Bad input: the body is not valid JSON: {exc}") from exc


class _Refused(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


async def run(request: Request) -> Response:
    model = request.path_params["model"]
    try:
        if not model.strip("/"):
            raise _Refused("no_such_model", "No such model: give one after /ai/run/")
        body = await _json(request)
        if request.query_params.get("queueRequest", "").lower() in ("true", "1"):
            return await _queued(request, model, body)
        return await _one(request, model, body)
    except _Refused as exc:
        return _error(exc.kind, str(exc))


# -- one request ----------------------------------------------------------------


async def _one(request: Request, model: str, body: Any) -> Response:
    line = next(read_objects([body]))
    if line.error is not None:
        raise _Refused("bad_input", f"Bad input: {line.error.removeprefix('request 1: ')}")
    client = request.app.state.client
    job: Job = await run_in_threadpool(client.submit, [body], model)
    if line.request.stream:
        return StreamingResponse(_events(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if not await _until_ended(job, request):
        await run_in_threadpool(job.cancel)
        return Response(status_code=499)  # nobody reads it: the client has gone
    result: ResultLine = await run_in_threadpool(lambda: next(job.results()))
    if result.status is RequestStatus.COMPLETED:
        return JSONResponse(envelope(output(result)))
    return _error(kind_of(result.error.code if result.error else None), result.error.message if result.error else f"the request {result.status.value}")


async def _until_ended(job: Job, request: Request) -> bool:
    """Wait for the job's one request to end; False if the client went away first."""
    left = False
    async with anyio.create_task_group() as tg:

        async def follow() -> None:
            async for _ in job.astream(0):
                pass
            tg.cancel_scope.cancel()

        async def watch() -> None:
            nonlocal left
            while not await request.is_disconnected():
                await anyio.sleep(0.25)
            left = True
            tg.cancel_scope.cancel()

        tg.start_soon(follow)
        tg.start_soon(watch)
    return not left


async def _events(job: Job) -> AsyncIterator[str]:
    """Workers AI's server-sent events of the job's one request; a client that leaves cancels it."""
    ended = False
    try:
        async for ev in job.astream(0):
            data = sse_data(ev)
            if data is not None:
                yield f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
            if ev.done:
                ended = True
                if ev.error:
                    # After a 200 has been sent, the error can only be an event of its own.
                    code, _ = CODES[kind_of(ev.error.get("code"))]
                    data = {"response": "", "error": {"code": code, "message": ev.error.get("message", "")}}
                    yield f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
        ended = True
        yield "data: [DONE]\n\n"
    finally:
        if not ended:
            job.cancel()


# -- the asynchronous batch (queueRequest) --------------------------------------


async def _queued(request: Request, model: str, body: Any) -> Response:
    if isinstance(body, dict) and "request_id" in body and "requests" not in body:
        return await run_in_threadpool(_poll, request, body["request_id"])
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise _Refused("bad_input", 'Bad input: a queued request (?queueRequest=true) sends {"requests": [...]} '
                                    'to queue a batch, or {"request_id": "..."} to poll one')
    refs: dict[int, Any] = {}
    requests = []
    for i, item in enumerate(body["requests"]):
        if isinstance(item, dict) and "external_reference" in item:
            item = dict(item)
            refs[i] = item.pop("external_reference")
        requests.append(item)
    client = request.app.state.client
    try:
        job: Job = await run_in_threadpool(client.submit, requests, model)
    except InputError as exc:
        raise _Refused("bad_input", f"Bad input: {str(exc).removeprefix('requests: ')}") from exc
    await run_in_threadpool(request.app.state.records.add_refs, job.id, refs)
    messages = [{"code": 5006, "message": f"Bad input: {e}"} for e in job.errors]
    return JSONResponse(envelope({"status": "queued", "request_id": str(uuid.UUID(job.id)), "model": model},
                                 messages))


def _poll(request: Request, request_id: Any) -> Response:
    try:
        job_id = uuid.UUID(str(request_id)).hex
        job = request.app.state.client.job(job_id)
        info = job.status()
    except (ValueError, JobNotFound):
        return _error("not_found", f"No batch with request_id {request_id!r} (unknown, or expired)")
    head = {"request_id": str(request_id), "model": info.model}
    if not info.status.terminal:
        status = "queued" if info.status is JobStatus.QUEUED else "running"
        return JSONResponse(envelope({"status": status, **head}))
    refs = request.app.state.records.refs(job_id)
    responses = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0}
    for line in job.results():
        item: dict[str, Any] = {"id": line.index, "result": {}, "success": False,
                                "external_reference": refs.get(line.index)}
        if line.status is RequestStatus.COMPLETED:
            item.update(result=output(line), success=True)
            for k in usage:
                usage[k] += getattr(line.result.usage, k)
        else:
            code, _ = CODES[kind_of(line.error.code if line.error else None)]
            item["errors"] = [{"code": code, "message": line.error.message if line.error else line.status.value}]
        responses.append(item)
    return JSONResponse(envelope({"responses": responses, "usage": usage, **head, "status": "completed"}))
