"""A request file as every command reads it: ``submit``, ``run`` and ``render`` share this path.

:func:`read_file` reads a JSONL file (or a ``.json`` Workers AI batch body)
one request at a time and enforces the job's limits; :class:`Tally` counts
what it read and refuses a file with no request or no valid one;
:func:`store_file` stores a file as a new job, all of it or nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from .defaults import DEFAULT_MAX_LINE_BYTES, DEFAULT_MAX_REQUESTS, DEFAULT_MAX_TOTAL_TOKENS
from .errors import InputError
from .ingest import Line, read_requests
from .store import JobInfo, JobStore

__all__ = ["Limits", "Tally", "Stored", "read_file", "store_file"]

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


def read_file(path: str, limits: Limits = Limits()) -> Iterator[Line]:
    """Every request of the file at ``path``, parsed, in order; memory is bounded by one line.

    Raises :class:`InputError` (naming the file) when the file holds more than
    ``max_requests`` requests or asks for more than ``max_total_tokens`` in all.
    """
    total = tokens = 0
    try:
        with open(path, "rb") as fp:
            for line in read_requests(fp, path, limits.max_line_bytes):
                if total >= limits.max_requests:
                    raise InputError(f"more than the limit of {limits.max_requests} requests per job "
                                     "(set --max-requests to raise it, or split the file)")
                total += 1
                if line.request is not None:
                    tokens += line.request.max_tokens
                    if tokens > limits.max_total_tokens:
                        raise InputError(
                            f"line {line.lineno}: the job's requests ask for more than the limit of "
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

    path: str
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
            raise InputError(f"{self.path}: no requests in the file")
        if self.valid == 0:
            first = f"; the first: {self.errors[0]}" if self.errors else ""
            raise InputError(f"{self.path}: none of its {self.total} requests is valid{first}")


@dataclass(frozen=True)
class Stored:
    """A file stored as a job: the job, and the file's invalid lines (the first few with their error)."""

    info: JobInfo
    invalid: int
    errors: list[str]


def store_file(store: JobStore, path: str, model: str, limits: Limits = Limits()) -> Stored:
    """Store every request of ``path`` under a new job for ``model``, queued; nothing is left when refused."""
    job_id = store.new_job_id()
    tally = Tally(path)
    batch: list[Line] = []

    def flush() -> None:
        for line, error in zip(batch, store.add_lines(job_id, batch)):
            tally.add(error)
        batch.clear()

    try:
        for line in read_file(path, limits):
            batch.append(line)
            if len(batch) >= _BATCH:
                flush()
        flush()
        tally.check()
    except BaseException:
        store.discard(job_id)
        raise
    return Stored(store.finalize(job_id, model, tally.total, tally.valid), tally.invalid, tally.errors)
