"""Workers AI's shapes out: the output object, server-sent events, and Cloudflare's errors.

``mlxq stream --sse`` and ``mlxq serve``'s Workers AI API share them.
Cloudflare's API wraps every answer in an envelope,
``{"result", "success", "errors": [{"code", "message"}], "messages"}``.
"""

from __future__ import annotations

from typing import Any, Optional

from .events import Event
from .models import ResultLine

__all__ = ["output", "sse_data", "envelope", "failure", "kind_of", "CODES"]

#: Cloudflare's error codes, and the HTTP status each goes with: those Workers AI
#: documents (3003, 3006, 3007, 3008, 5007, 10000 from Cloudflare's API), and
#: for what it leaves unnamed, 5006 ("Bad input", what Workers AI answers a
#: request failing its schema) and 3043 (an internal error).
CODES = {
    "incomplete_request": (3003, 400),
    "bad_input": (5006, 400),
    "too_large": (3006, 413),
    "timeout": (3007, 408),
    "aborted": (3008, 408),
    "no_such_model": (5007, 400),
    "not_found": (7003, 404),
    "no_route": (7000, 404),
    "method_not_allowed": (10405, 405),
    "authentication": (10000, 401),
    "internal": (3043, 500),
}

#: mlxq's result error codes -> the kind above.
_RESULT_ERRORS = {
    "invalid_request": "bad_input",
    "timeout": "timeout",
    "cancelled": "aborted",
    "attempts_exhausted": "internal",
    "engine_error": "internal",
}


def output(line: ResultLine) -> dict[str, Any]:
    """The seed's output object of a completed request: ``response``, ``tool_calls``, and ``usage``."""
    r = line.result
    return {"response": r.response, "tool_calls": [c.model_dump() for c in r.tool_calls],
            "usage": r.usage.model_dump()}


def sse_data(ev: Event) -> Optional[dict[str, Any]]:
    """What Workers AI streams for ``ev`` as ``data: {...}``: ``{"response": delta}`` (the last with
    ``tool_calls`` when the request called tools); None when the event carries neither."""
    if not (ev.delta or ev.tool_calls):
        return None
    return {"response": ev.delta, **({"tool_calls": ev.tool_calls} if ev.tool_calls else {})}


def envelope(result: Any, messages: Optional[list] = None) -> dict[str, Any]:
    return {"result": result, "success": True, "errors": [], "messages": messages or []}


def failure(kind: str, message: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, Cloudflare's error envelope) for an error of ``kind`` (a key of :data:`CODES`)."""
    code, status = CODES[kind]
    return status, {"result": None, "success": False, "errors": [{"code": code, "message": message}],
                    "messages": []}


def kind_of(error_code: Optional[str]) -> str:
    """The kind (a key of :data:`CODES`) of a request that ended with mlxq's ``error_code``
    (None: it has no error, it was cancelled before it ran)."""
    return _RESULT_ERRORS.get(error_code or "cancelled", "internal")
