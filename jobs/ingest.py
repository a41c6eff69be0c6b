"""Read a JSONL file of requests one line at a time.

Memory is bounded by one line (``max_line_bytes``), whatever the file's size.
Each line becomes a :class:`Line`: a validated request, or an error that names
the line and the field. Blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional

from pydantic import ValidationError

from .defaults import DEFAULT_MAX_LINE_BYTES
from .models import MessagesRequest, PromptRequest, Request

__all__ = ["Line", "parse_line", "read_lines", "request_from_json"]

_CHUNK = 1 << 16


@dataclass(frozen=True)
class Line:
    """One non-blank input line, parsed."""

    index: int
    lineno: int
    custom_id: str
    request: Optional[Request] = None
    error: Optional[str] = None
    explicit_id: bool = False


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# Union members that pydantic names in an error's path; they are not fields.
_UNION_MEMBERS = {"FunctionTool", "Tool"}


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if str(p) not in _UNION_MEMBERS]
    return ".".join(parts) or "(line)"


def _describe(err: dict) -> str:
    field = _field(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"field '{field}': unknown field"
    if kind == "missing":
        return f"field '{field}': required"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"field '{field}': {err['msg'][0].lower()}{err['msg'][1:]} (got {shown})"


def _explain(exc: ValidationError) -> str:
    seen: list[str] = []
    for err in exc.errors(include_url=False):
        text = _describe(err)
        if text not in seen:
            seen.append(text)
    more = f" (and {len(seen) - 3} more)" if len(seen) > 3 else ""
    return "; ".join(seen[:3]) + more


def parse_line(raw: bytes, lineno: int, index: int) -> Line:
    """Validate one line of input; never raises for bad input."""

    def bad(message: str, custom_id: Optional[str] = None) -> Line:
        return Line(
            index, lineno, custom_id or str(lineno), error=f"line {lineno}: {message}",
            explicit_id=custom_id is not None,
        )

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})")
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        return bad("not valid JSON: nested too deeply")
    except ValueError as exc:
        return bad(f"not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return bad(f"expected a JSON object, got {_json_type(obj)}")

    cid = obj.get("custom_id")
    custom_id = cid if isinstance(cid, str) and 0 < len(cid) <= 512 else None
    if "image" in obj:
        return bad("field 'image': this model is text-only; images are not accepted", custom_id)
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt and has_messages:
        return bad("give either field 'prompt' or field 'messages', not both", custom_id)
    if not has_prompt and not has_messages:
        return bad("missing field 'prompt' or 'messages'", custom_id)
    model = PromptRequest if has_prompt else MessagesRequest
    try:
        request = model.model_validate(obj)
    except ValidationError as exc:
        return bad(_explain(exc), custom_id)
    except RecursionError:
        return bad("nested too deeply", custom_id)
    return Line(index, lineno, custom_id or str(lineno), request=request, explicit_id=custom_id is not None)


def _json_type(obj: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number"
    )


def read_lines(fp: BinaryIO, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[Line]:
    """Yield every non-blank line of a binary file, parsed, in order."""
    index = 0
    lineno = 0
    while True:
        raw = fp.readline(max_line_bytes + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            # Too long: skip the rest of it without holding it in memory.
            while True:
                rest = fp.readline(_CHUNK)
                if not rest or rest.endswith(b"\n"):
                    break
            yield Line(
                index, lineno, str(lineno),
                error=f"line {lineno}: longer than the limit of {max_line_bytes} bytes "
                "(set --max-line-bytes to raise it)",
            )
            index += 1
            continue
        if not raw.strip():
            continue
        yield parse_line(raw.rstrip(b"\r\n"), lineno, index)
        index += 1


def request_from_json(data: str | bytes) -> Request:
    """Load a request stored by :meth:`jobs.store.JobStore.add_lines`."""
    obj = json.loads(data)
    return (PromptRequest if "prompt" in obj else MessagesRequest).model_validate(obj)
