"""Partial results: events on Redis pub/sub, and the same events in a capped Stream.

Every event is appended to the job's Stream (``mlxq:job:J:events``) and then
published, with its Stream id, on the job's channel (``mlxq:job:J:events``)
and the request's (``mlxq:job:J:events:I``). Pub/sub drops what nobody heard;
the Stream keeps it, so a late follower replays it and then follows live by
reading the Stream past the last id it saw: no gap, no duplicate.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from pydantic import BaseModel

from .defaults import KEY_PREFIX

__all__ = ["Event", "events_key", "job_channel", "request_channel", "EMIT_SCRIPT", "DEFAULT_STREAM_MAXLEN"]

#: Entries a job's Stream keeps (approximately; older ones are trimmed).
DEFAULT_STREAM_MAXLEN = 100_000


class Event(BaseModel):
    """New text of one request; the last event of a request carries ``done``.

    For a request with tools, deltas stop where a tool-call block may begin;
    the end event's ``delta`` has the rest of the final response (tool calls
    cut out) and ``tool_calls`` the calls, as in the stored result.
    """

    job_id: str
    index: int
    custom_id: str
    delta: str = ""
    done: bool = False
    status: Optional[str] = None
    finish_reason: Optional[str] = None
    usage: Optional[dict[str, int]] = None
    error: Optional[dict[str, str]] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # the end event of a request that called tools
    ts: Optional[float] = None  # Unix time the text left the engine (deltas only)
    id: Optional[str] = None  # the Stream id, set by Redis


def events_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}:events"


def job_channel(job_id: str) -> str:
    return events_key(job_id)


def request_channel(job_id: str, index: int) -> str:
    return f"{events_key(job_id)}:{index}"


# Appends an event (a JSON object without "id") to the job's Stream, then
# publishes it with its new Stream id on the job's and the request's channels.
EMIT_SCRIPT = """
local stream = KEYS[1]
local event, job_channel, request_channel, maxlen, retention = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'e', event)
if redis.call('TTL', stream) < 0 then redis.call('EXPIRE', stream, retention) end
local msg = '{"id":"' .. id .. '",' .. string.sub(event, 2)
redis.call('PUBLISH', job_channel, msg)
redis.call('PUBLISH', request_channel, msg)
return id
"""


def emit_args(event: Event, maxlen: int, retention: int) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of :data:`EMIT_SCRIPT` for ``event``."""
    body = event.model_dump_json(exclude={"id"}, exclude_none=True)
    return [events_key(event.job_id)], [
        body, job_channel(event.job_id), request_channel(event.job_id, event.index), maxlen, retention,
    ]


def parse_entries(entries: Iterable) -> list[Event]:
    """Events from an XRANGE/XREAD reply of one Stream."""
    out = []
    for entry_id, fields in entries:
        event = Event.model_validate_json(fields[b"e"])
        out.append(event.model_copy(update={"id": entry_id.decode()}))
    return out
