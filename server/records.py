"""What the HTTP APIs keep beside the jobs: uploaded files, batches, and Workers AI's external references.

Keys (in the jobs' Redis; each expires after the retention, like a job):

- ``mlxq:http:file:F``      hash: filename, purpose, created_at, content (an uploaded file)
- ``mlxq:http:files``       sorted set: uploaded file ids by creation time
- ``mlxq:http:batch:B``     hash: an OpenAI batch (its request fields, errors, and a failed batch's state)
- ``mlxq:http:batches``     sorted set: batch ids by creation time
- ``mlxq:http:refs:J``      hash: request index -> its ``external_reference`` (JSON) in Workers AI batch J
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import redis

from mlxq.jobs.defaults import KEY_PREFIX
from mlxq.jobs.errors import StoreError
from mlxq.jobs.store import JobStore

__all__ = ["Records", "StoredFile", "BatchRecord", "HttpKeys"]


class HttpKeys:
    """The keys of :mod:`mlxq.server`'s records."""

    base = f"{KEY_PREFIX}:http"
    files = f"{base}:files"
    batches = f"{base}:batches"

    @classmethod
    def file(cls, file_id: str) -> str:
        return f"{cls.base}:file:{file_id}"

    @classmethod
    def batch(cls, batch_id: str) -> str:
        return f"{cls.base}:batch:{batch_id}"

    @classmethod
    def refs(cls, job_id: str) -> str:
        return f"{cls.base}:refs:{job_id}"


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    created_at: int
    size: int
    content: Optional[bytes] = None


@dataclass(frozen=True)
class BatchRecord:
    """An OpenAI batch's own fields; its progress is its job's."""

    id: str
    job_id: Optional[str]  # None: the batch failed validation and queued nothing
    input_file_id: str
    endpoint: str
    completion_window: str
    model: str
    created_at: int
    metadata: Optional[dict[str, str]] = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    cancelling_at: Optional[int] = None


def _wrap(method):
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self.store.where}: {exc}") from exc

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


class Records:
    """Files, batches and external references, in the job store's Redis."""

    def __init__(self, store: JobStore):
        self.store = store
        self.redis = store.redis

    @property
    def retention(self) -> int:
        return self.store.retention

    # -- files ---------------------------------------------------------------

    @_wrap
    def add_file(self, filename: str, purpose: str, content: bytes) -> StoredFile:
        now = int(time.time())
        file_id = f"file-{secrets.token_hex(12)}"
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(HttpKeys.file(file_id), mapping={"filename": filename, "purpose": purpose, "created_at": now,
                                                   "content": content})
        pipe.expire(HttpKeys.file(file_id), self.retention)
        pipe.zadd(HttpKeys.files, {file_id: time.time()})
        pipe.execute()
        return StoredFile(file_id, filename, purpose, now, len(content))

    @_wrap
    def file(self, file_id: str, content: bool = False) -> Optional[StoredFile]:
        key = HttpKeys.file(file_id)
        fields = ["filename", "purpose", "created_at"]
        filename, purpose, created = self.redis.hmget(key, fields)
        if filename is None:
            self.redis.zrem(HttpKeys.files, file_id)
            return None
        data = self.redis.hget(key, "content") if content else None
        size = len(data) if data is not None else self.redis.hstrlen(key, "content")
        return StoredFile(file_id, filename.decode(), purpose.decode(), int(created), size, data)

    @_wrap
    def file_ids(self) -> list[str]:
        return [i.decode() for i in self.redis.zrevrange(HttpKeys.files, 0, -1)]

    @_wrap
    def delete_file(self, file_id: str) -> bool:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(HttpKeys.file(file_id))
        pipe.zrem(HttpKeys.files, file_id)
        return bool(pipe.execute()[0])

    # -- batches -------------------------------------------------------------

    @_wrap
    def add_batch(self, record: BatchRecord) -> None:
        key = HttpKeys.batch(record.id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={
            "job_id": record.job_id or "", "input_file_id": record.input_file_id, "endpoint": record.endpoint,
            "completion_window": record.completion_window, "model": record.model,
            "created_at": record.created_at, "metadata": json.dumps(record.metadata),
            "errors": json.dumps(record.errors),
        })
        pipe.expire(key, self.retention)
        pipe.zadd(HttpKeys.batches, {record.id: time.time()})  # finer than created_at: the order of creation
        pipe.execute()

    @_wrap
    def batch(self, batch_id: str) -> Optional[BatchRecord]:
        h = self.redis.hgetall(HttpKeys.batch(batch_id))
        if not h:
            self.redis.zrem(HttpKeys.batches, batch_id)
            return None
        d = {k.decode(): v.decode() for k, v in h.items()}
        return BatchRecord(
            id=batch_id, job_id=d["job_id"] or None, input_file_id=d["input_file_id"], endpoint=d["endpoint"],
            completion_window=d["completion_window"], model=d["model"], created_at=int(d["created_at"]),
            metadata=json.loads(d["metadata"]), errors=json.loads(d["errors"]),
            cancelling_at=int(d["cancelling_at"]) if "cancelling_at" in d else None,
        )

    @_wrap
    def cancelling(self, batch_id: str) -> None:
        """Note when the batch was first asked to cancel."""
        self.redis.hsetnx(HttpKeys.batch(batch_id), "cancelling_at", int(time.time()))

    @_wrap
    def batch_ids(self, limit: int, after: Optional[str] = None) -> tuple[list[str], bool]:
        """Up to ``limit`` batch ids, newest first, after the batch ``after``; and whether more follow."""
        start = 0
        if after:
            rank = self.redis.zrevrank(HttpKeys.batches, after)
            if rank is None:
                return [], False
            start = rank + 1
        ids = [i.decode() for i in self.redis.zrevrange(HttpKeys.batches, start, start + limit)]
        return ids[:limit], len(ids) > limit

    # -- Workers AI ------------------------------------------------------------

    @_wrap
    def add_refs(self, job_id: str, refs: dict[int, Any]) -> None:
        if refs:
            key = HttpKeys.refs(job_id)
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(key, mapping={i: json.dumps(ref) for i, ref in refs.items()})
            pipe.expire(key, self.retention)
            pipe.execute()

    @_wrap
    def refs(self, job_id: str) -> dict[int, Any]:
        return {int(i): json.loads(v) for i, v in self.redis.hgetall(HttpKeys.refs(job_id)).items()}
