"""Read a JSONL file of requests one line at a time.

Memory is bounded by one line (``max_line_bytes``), whatever the file's size.
Each line becomes a :class:`Line`: a validated request, or an error that names
the line and the field. Blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Optional

from pydantic import ValidationError

from .defaults import DEFAULT_MAX_LINE_BYTES
from .errors import InputError
from .models import MessagesRequest, PromptRequest, Request
from .openai import from_openai, is_openai_line

__all__ = ["Line", "parse_line", "parse_object", "read_lines", "read_batch_json", "read_objects", "read_requests",
           "repeated_id", "request_from_json"]

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
    #: The line's own JSON when it is the request as validated (the seed's form, read from a
    #: file), else None: the job store keeps these bytes rather than serialising the request.
    raw: Optional[bytes] = None


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


#: One decoder for every line (``json.loads`` with an option builds a new one per call).
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _loads(text: str) -> object:
    """``json.loads(text, parse_constant=_no_constant)``, with one decoder."""
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)


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
    where = f"line {lineno}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _bad(index, lineno, where, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})")
    try:
        obj = _loads(text)
    except RecursionError:
        return _bad(index, lineno, where, "not valid JSON: nested too deeply")
    except ValueError as exc:
        return _bad(index, lineno, where, f"not valid JSON: {exc}")
    return parse_object(obj, lineno, index, where, raw)


def _bad(index: int, lineno: int, where: str, message: str, custom_id: Optional[str] = None) -> Line:
    return Line(index, lineno, custom_id or str(lineno), error=f"{where}: {message}",
                explicit_id=custom_id is not None)


def parse_object(obj: object, lineno: int, index: int, where: str, raw: Optional[bytes] = None) -> Line:
    """Validate one decoded request: Workers AI's form, or an OpenAI batch line.

    ``raw`` is the JSON ``obj`` was decoded from, if any: a valid line in the
    seed's form keeps it (:attr:`Line.raw`).
    """
    if not isinstance(obj, dict):
        return _bad(index, lineno, where, f"expected a JSON object, got {_json_type(obj)}")
    cid = obj.get("custom_id")
    custom_id = cid if isinstance(cid, str) and 0 < len(cid) <= 512 else None
    if is_openai_line(obj):
        try:
            obj = from_openai(obj)
        except ValueError as exc:
            return _bad(index, lineno, where, str(exc), custom_id)
        raw = None  # the request is the mapped body, not the line
    if "image" in obj:
        return _bad(index, lineno, where, "field 'image': this model is text-only; images are not accepted", custom_id)
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt and has_messages:
        return _bad(index, lineno, where, "give either field 'prompt' or field 'messages', not both", custom_id)
    if not has_prompt and not has_messages:
        return _bad(index, lineno, where, "missing field 'prompt' or 'messages'", custom_id)
    model = PromptRequest if has_prompt else MessagesRequest
    try:
        request = model.model_validate(obj)
    except ValidationError as exc:
        return _bad(index, lineno, where, _explain(exc), custom_id)
    except RecursionError:
        return _bad(index, lineno, where, "nested too deeply", custom_id)
    return Line(index, lineno, custom_id or str(lineno), request=request, explicit_id=custom_id is not None, raw=raw)


def _json_type(obj: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number"
    )


def read_batch_json(fp: BinaryIO, max_bytes: int) -> Iterator[Line]:
    """The requests of a Workers AI batch body, ``{"requests": [...]}``, parsed.

    A ``.json`` file is one document, so it is read whole (up to ``max_bytes``);
    JSONL is the format for files of any size. Request N is numbered like line N.
    """
    data = fp.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"a .json batch is read whole and this one is over {max_bytes} bytes; use JSONL")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"not a valid JSON document: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list):
        raise InputError('a .json batch must be an object {"requests": [...]} (use JSONL for one request per line)')
    for i, obj in enumerate(doc["requests"]):
        yield parse_object(obj, i + 1, i, f"request {i + 1}")


def read_objects(objects: Iterable[object]) -> Iterator[Line]:
    """Requests given as Python objects (decoded JSON), parsed; request N is numbered like line N.

    The same validation as a ``.json`` batch body's requests: a dict in either
    request form, or an OpenAI batch line.
    """
    for i, obj in enumerate(objects):
        yield parse_object(obj, i + 1, i, f"request {i + 1}")


def read_requests(fp: BinaryIO, name: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[Line]:
    """Requests of a file by its kind: a ``.json`` batch body, or JSONL."""
    if name.lower().endswith(".json"):
        return read_batch_json(fp, 64 * max_line_bytes)
    return read_lines(fp, max_line_bytes)


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


def repeated_id(line: Line, first: int) -> str:
    """The error of a line whose ``custom_id`` repeats that of request ``first`` (the later line fails).

    ``line`` is a :class:`Line`, or anything with its ``lineno``, ``custom_id`` and ``explicit_id``
    (the store's :class:`~mlxq.jobs.store.Entry`).
    """
    why = "" if line.explicit_id else " (its line number, as it gives none)"
    return f"line {line.lineno}: field 'custom_id': {line.custom_id!r}{why} repeats the id of request {first}"


def request_from_json(data: str | bytes) -> Request:
    """Load a request stored by :meth:`mlxq.jobs.store.JobStore.add_lines`."""
    obj = json.loads(data)
    return (PromptRequest if "prompt" in obj else MessagesRequest).model_validate(obj)
