"""Requests as every entry point reads them: ``submit``, ``run``, ``render``, the Python client
and the HTTP server share this path.

A *source* is a path to a JSONL file (or a ``.json`` Workers AI batch body),
an open file of either kind (binary or text), or an iterable of request
objects (dicts). :func:`read_file` reads one a request at a time and enforces
the job's limits; :class:`Tally` counts what it read and refuses a source with
no request or no valid one; :func:`store_file` stores a source as a new job,
all of it or nothing.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable, Iterator, Optional, Union

from .defaults import DEFAULT_MAX_LINE_BYTES, DEFAULT_MAX_REQUESTS, DEFAULT_MAX_TOTAL_TOKENS
from .errors import InputError
from .ingest import Line, read_objects, read_requests
from .store import Entry, JobInfo, JobStore

__all__ = ["Limits", "Source", "Tally", "Stored", "source_name", "read_file", "store_file"]

#: What :func:`read_file` reads: a path, an open file, or request objects.
Source = Union[str, "os.PathLike[str]", BinaryIO, io.TextIOBase, Iterable[Any]]

#: The name errors give a source of request objects.
OBJECTS = "requests"

#: Lines stored per round trip.
_BATCH = 500
#: Invalid lines a tally keeps the message of (the rest are counted).
_SHOWN = 10


@dataclass(frozen=True)
class Limits:
    """What one job may hold; each is named in the error when it is hit."""

    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS


class _Encoded:
    """A text file read as UTF-8 bytes (what the readers take)."""

    def __init__(self, text: io.TextIOBase):
        self.text = text

    def readline(self, size: int = -1) -> bytes:
        return self.text.readline(size).encode("utf-8")

    def read(self, size: int = -1) -> bytes:
        return self.text.read(size).encode("utf-8")


def source_name(source: Source) -> str:
    """How errors name ``source``: its path, an open file's name, or ``requests``."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        return str(name) if isinstance(name, (str, os.PathLike)) else "<file>"
    return OBJECTS


def _requests(source: Source, name: str, max_line_bytes: int) -> Iterator[Line]:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fp:
            yield from read_requests(fp, name, max_line_bytes)
    elif hasattr(source, "read"):
        fp = _Encoded(source) if isinstance(source, io.TextIOBase) else source
        yield from read_requests(fp, name, max_line_bytes)
    elif isinstance(source, (bytes, bytearray, dict)) or not isinstance(source, Iterable):
        raise InputError(f"cannot read requests from {type(source).__name__}: give a path, an open file, "
                         "or an iterable of request dicts")
    else:
        yield from read_objects(source)


def read_file(source: Source, limits: Limits = Limits()) -> Iterator[Line]:
    """Every request of ``source``, parsed, in order; memory is bounded by one line (or request).

    Raises :class:`InputError` (naming the source) when it holds more than
    ``max_requests`` requests or asks for more than ``max_total_tokens`` in all.
    """
    path = source_name(source)
    total = tokens = 0
    try:
        for line in _requests(source, path, limits.max_line_bytes):
            if total >= limits.max_requests:
                raise InputError(f"more than the limit of {limits.max_requests} requests per job "
                                 "(set --max-requests to raise it, or split the file)")
            total += 1
            if line.request is not None:
                tokens += line.request.max_tokens
                if tokens > limits.max_total_tokens:
                    where = "request" if path == OBJECTS else "line"
                    raise InputError(
                        f"{where} {line.lineno}: the job's requests ask for more than the limit of "
                        f"{limits.max_total_tokens} tokens in all (sum of max_tokens; set --max-total-tokens "
                        "to raise it, or split the file)")
            yield line
    except InputError as exc:
        message = str(exc)
        if message.startswith(f"{path}:"):
            raise
        raise InputError(f"{path}: {message}") from exc


@dataclass
class Tally:
    """Counts of a file's requests, and the first few errors."""

    path: str  # the source's name (source_name)
    total: int = 0
    valid: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def invalid(self) -> int:
        return self.total - self.valid

    def add(self, error: Optional[str]) -> None:
        """Count one request: valid, or failed with ``error``."""
        self.total += 1
        if error is None:
            self.valid += 1
        elif len(self.errors) < _SHOWN:
            self.errors.append(error)

    def check(self) -> None:
        """Refuse a file without a request, or without a valid one (:class:`InputError`, exit 2)."""
        if self.total == 0:
            raise InputError(f"{self.path}: no requests in the file" if self.path != OBJECTS
                             else "no requests given")
        if self.valid == 0:
            first = f"; the first: {self.errors[0]}" if self.errors else ""
            raise InputError(f"{self.path}: none of its {self.total} requests is valid{first}")


@dataclass(frozen=True)
class Stored:
    """A file stored as a job: the job, and the file's invalid lines (the first few with their error)."""

    info: JobInfo
    invalid: int
    errors: list[str]


def store_file(store: JobStore, source: Source, model: str, limits: Limits = Limits()) -> Stored:
    """Store every request of ``source`` under a new job for ``model``, queued; nothing is left when refused."""
    job_id = store.new_job_id()
    tally = Tally(source_name(source))
    batch: list[Entry] = []

    def flush() -> None:
        for error in store.add_entries(job_id, batch):
            tally.add(error)
        batch.clear()

    try:
        for line in read_file(source, limits):
            batch.append(Entry.of(line))
            if len(batch) >= _BATCH:
                flush()
        flush()
        tally.check()
    except BaseException:
        store.discard(job_id)
        raise
    return Stored(store.finalize(job_id, model, tally.total, tally.valid), tally.invalid, tally.errors)
