"""OpenAI's Batch API: ``/v1/files`` and ``/v1/batches``, so the ``openai`` SDK only changes its base URL.

A batch is an mlxq job of the server's model. Its status maps mlxq's:
queued and running are ``in_progress``, then ``completed``, ``cancelling``,
``cancelled``; a file refused whole (no valid line, over a limit) is a
``failed`` batch that queued nothing; a batch whose job has passed its
retention is ``expired``. mlxq validates as it queues, so ``validating`` and
``finalizing`` pass within the create call and are never seen. Lines that
fail validation fail alone: they are in the batch's ``errors`` (the first
ten) and in its error file. The output file holds the completed requests'
lines, the error file the others', as ``mlxq results --format openai``.
"""

from __future__ import annotations

import io
import json
import secrets
import time
from typing import Any, Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxq.client import Job
from mlxq.jobs.errors import InputError, JobNotFound
from mlxq.jobs.models import JobStatus
from mlxq.jobs.openai import CHAT, COMPLETIONS
from mlxq.jobs.store import JobInfo

from .records import BatchRecord, Records, StoredFile

__all__ = ["routes", "error"]

#: The only completion window OpenAI offers; mlxq has no deadline of its own.
WINDOW = "24h"
_WINDOW_SECONDS = 24 * 3600
_OUTPUT, _ERRORS = "-output", "-errors"


def routes() -> list[Route]:
    return [
        Route("/v1/files", upload, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", get_file, methods=["GET"]),
        Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
    ]


def error(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    """OpenAI's error shape."""
    kind = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


class _Refused(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.response = error(status, message, param, code)


def _refusing(endpoint):
    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except _Refused as exc:
            return exc.response

    wrapper.__name__ = endpoint.__name__
    return wrapper


def _records(request: Request) -> Records:
    return request.app.state.records


# -- files ------------------------------------------------------------------


def _file_object(f: StoredFile, retention: int) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.size, "created_at": f.created_at,
            "expires_at": f.created_at + retention, "filename": f.filename, "purpose": f.purpose,
            "status": "processed", "status_details": None}


@_refusing
async def upload(request: Request) -> Response:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise _Refused(400, "Upload a file as multipart/form-data with the fields 'file' and 'purpose'")
    async with request.form(max_files=1, max_fields=8) as form:
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose != "batch":
            raise _Refused(400, f"'purpose' must be 'batch' (got {purpose!r}): mlxq keeps batch input files only",
                           "purpose")
        if upload is None or isinstance(upload, str):
            raise _Refused(400, "Missing the 'file' field: the JSONL file of batch requests", "file")
        content = await upload.read()
        filename = upload.filename or "upload.jsonl"
    stored = await run_in_threadpool(_records(request).add_file, filename, purpose, content)
    return JSONResponse(_file_object(stored, _records(request).retention))


def _output_of(file_id: str) -> Optional[tuple[str, str]]:
    """(job id, which) of an output or error file's id."""
    for which in (_OUTPUT, _ERRORS):
        if file_id.startswith("file-") and file_id.endswith(which):
            return file_id[len("file-"):-len(which)], which
    return None


def _output_file(request: Request, file_id: str) -> tuple[dict[str, Any], bytes]:
    """A batch's output or error file: its object and content, made from the job's results."""
    job_id, which = _output_of(file_id)
    job: Job = request.app.state.client.job(job_id)
    try:
        info = job.status()
    except JobNotFound:
        raise _Refused(404, f"No such file: {file_id!r}", code="not_found") from None
    if not info.status.terminal:
        raise _Refused(404, f"No such file yet: {file_id!r} is written when its batch ends", code="not_found")
    ok = which == _OUTPUT
    lines = [json.dumps(obj, ensure_ascii=False) + "\n" for obj in job.openai_results()
             if (obj["response"] is not None) == ok]
    content = "".join(lines).encode()
    created = int(info.finished_at or info.created_at)
    obj = {"id": file_id, "object": "file", "bytes": len(content), "created_at": created,
           "expires_at": created + _records(request).retention, "filename": f"batch_{job_id}{which}.jsonl",
           "purpose": "batch_output", "status": "processed", "status_details": None}
    return obj, content


def _input_file(request: Request, file_id: str, content: bool = False) -> StoredFile:
    found = _records(request).file(file_id, content)
    if found is None:
        raise _Refused(404, f"No such file: {file_id!r}", code="not_found")
    return found


@_refusing
async def get_file(request: Request) -> Response:
    file_id = request.path_params["file_id"]

    def find() -> dict[str, Any]:
        if _output_of(file_id):
            return _output_file(request, file_id)[0]
        return _file_object(_input_file(request, file_id), _records(request).retention)

    return JSONResponse(await run_in_threadpool(find))


@_refusing
async def file_content(request: Request) -> Response:
    file_id = request.path_params["file_id"]

    def read() -> bytes:
        if _output_of(file_id):
            return _output_file(request, file_id)[1]
        return _input_file(request, file_id, content=True).content

    return Response(await run_in_threadpool(read), media_type="application/octet-stream")


@_refusing
async def list_files(request: Request) -> Response:
    def objects() -> list[dict[str, Any]]:
        records = _records(request)
        found = (records.file(i) for i in records.file_ids())
        return [_file_object(f, records.retention) for f in found if f is not None]

    data = await run_in_threadpool(objects)
    return JSONResponse({"object": "list", "data": data, "has_more": False,
                         "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


@_refusing
async def delete_file(request: Request) -> Response:
    file_id = request.path_params["file_id"]
    if _output_of(file_id):
        raise _Refused(400, f"{file_id!r} is a batch's output: it is kept with its batch, for the server's retention")
    if not await run_in_threadpool(_records(request).delete_file, file_id):
        raise _Refused(404, f"No such file: {file_id!r}", code="not_found")
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


# -- batches ----------------------------------------------------------------


def _batch_object(record: BatchRecord, info: Optional[JobInfo], now: Optional[float] = None) -> dict[str, Any]:
    created = record.created_at
    obj: dict[str, Any] = {
        "id": record.id, "object": "batch", "endpoint": record.endpoint, "model": record.model,
        "errors": {"object": "list", "data": record.errors} if record.errors else None,
        "input_file_id": record.input_file_id, "completion_window": record.completion_window,
        "status": "in_progress", "output_file_id": None, "error_file_id": None,
        "created_at": created, "in_progress_at": None, "expires_at": created + _WINDOW_SECONDS,
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": record.cancelling_at, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": record.metadata,
    }
    if record.job_id is None:
        obj.update(status="failed", failed_at=created)
        return obj
    if info is None:
        obj.update(status="expired", expired_at=record.created_at + _WINDOW_SECONDS)
        return obj
    obj["in_progress_at"] = created
    obj["request_counts"] = {"total": info.total, "completed": info.completed,
                             "failed": info.failed + info.cancelled}
    ended = int(info.finished_at) if info.finished_at else None
    if info.status is JobStatus.COMPLETED:
        obj.update(status="completed", finalizing_at=ended, completed_at=ended)
    elif info.status is JobStatus.CANCELLING:
        obj.update(status="cancelling", cancelling_at=record.cancelling_at or int(now or time.time()))
    elif info.status is JobStatus.CANCELLED:
        obj.update(status="cancelled", cancelling_at=record.cancelling_at or ended, cancelled_at=ended)
    if info.status.terminal:
        if info.completed:
            obj["output_file_id"] = f"file-{info.job_id}{_OUTPUT}"
        if info.failed + info.cancelled:
            obj["error_file_id"] = f"file-{info.job_id}{_ERRORS}"
    return obj


def _batch(request: Request, batch_id: str) -> dict[str, Any]:
    record = _records(request).batch(batch_id)
    if record is None:
        raise _Refused(404, f"No such batch: {batch_id!r}", code="not_found")
    info = None
    if record.job_id is not None:
        try:
            info = request.app.state.client.job(record.job_id).status()
        except JobNotFound:
            pass
    return _batch_object(record, info)


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Refused(400, f"The body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _Refused(400, "The body must be a JSON object")
    return body


def _check_create(body: dict[str, Any]) -> None:
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            raise _Refused(400, f"Missing required parameter: '{name}' (a string)", name, "missing_required_parameter")
    if body["endpoint"] not in (CHAT, COMPLETIONS):
        raise _Refused(400, f"Invalid 'endpoint' {body['endpoint']!r}: mlxq runs {CHAT} and {COMPLETIONS}",
                       "endpoint", "invalid_value")
    if body["completion_window"] != WINDOW:
        raise _Refused(400, f"Invalid 'completion_window' {body['completion_window']!r}: only '{WINDOW}' is supported",
                       "completion_window", "invalid_value")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and len(metadata) <= 16
        and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items())
    ):
        raise _Refused(400, "Invalid 'metadata': at most 16 string keys (up to 64 characters) with string values "
                            "(up to 512 characters)", "metadata", "invalid_value")


@_refusing
async def create_batch(request: Request) -> Response:
    body = await _json_body(request)
    _check_create(body)
    config = request.app.state.config

    def create() -> dict[str, Any]:
        records = _records(request)
        stored = _input_file(request, body["input_file_id"], content=True)
        if stored.purpose != "batch":
            raise _Refused(400, f"File {stored.id!r} was not uploaded with purpose 'batch'", "input_file_id")
        source = io.BytesIO(stored.content)
        source.name = stored.id  # JSONL, and errors name the file
        fields = dict(input_file_id=stored.id, endpoint=body["endpoint"], completion_window=WINDOW,
                      model=config.model, created_at=int(time.time()), metadata=body.get("metadata"))
        try:
            job: Job = request.app.state.client.submit(source, config.model)
        except InputError as exc:
            record = BatchRecord(id=f"batch_{secrets.token_hex(16)}", job_id=None,
                                 errors=[{"code": "invalid_file", "message": str(exc), "param": None, "line": None}],
                                 **fields)
            records.add_batch(record)
            return _batch_object(record, None)
        errors = [{"code": "invalid_request", "message": e, "param": None, "line": _line_of(e)} for e in job.errors]
        record = BatchRecord(id=f"batch_{job.id}", job_id=job.id, errors=errors, **fields)
        records.add_batch(record)
        return _batch_object(record, job.status())

    return JSONResponse(await run_in_threadpool(create))


def _line_of(message: str) -> Optional[int]:
    head = message.split(":", 1)[0].split()
    return int(head[1]) if len(head) == 2 and head[0] == "line" and head[1].isdigit() else None


@_refusing
async def get_batch(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(_batch, request, request.path_params["batch_id"]))


@_refusing
async def list_batches(request: Request) -> Response:
    raw = request.query_params.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise _Refused(400, f"Invalid 'limit' {raw!r}: an integer from 1 to 100", "limit", "invalid_value")
    after = request.query_params.get("after")

    def page() -> dict[str, Any]:
        ids, more = _records(request).batch_ids(int(raw), after)
        data = []
        for batch_id in ids:
            try:
                data.append(_batch(request, batch_id))
            except _Refused:  # expired between the listing and the look
                continue
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    return JSONResponse(await run_in_threadpool(page))


@_refusing
async def cancel_batch(request: Request) -> Response:
    batch_id = request.path_params["batch_id"]

    def cancel() -> dict[str, Any]:
        record = _records(request).batch(batch_id)
        if record is None:
            raise _Refused(404, f"No such batch: {batch_id!r}", code="not_found")
        if record.job_id is not None:
            try:
                status = request.app.state.client.job(record.job_id).cancel()
            except JobNotFound:
                status = None
            if status is not None and status is not JobStatus.COMPLETED:
                _records(request).cancelling(batch_id)
        return _batch(request, batch_id)

    return JSONResponse(await run_in_threadpool(cancel))
