"""This worker's heartbeat: its entry in Redis, which ``mlxq workers`` lists.

A thread writes the entry every ``interval`` seconds with a time to live of
three intervals (see :mod:`mlxq.jobs.workers`): a worker that dies, hangs or
loses Redis drops out of the list by itself; one that stops cleanly removes
its entry at once. The entry is written from the start, while the model
loads ("loading"), so a worker that takes minutes to download its model is
seen.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Optional

from mlxq.jobs.defaults import DEFAULT_HEARTBEAT
from mlxq.jobs.errors import StoreError
from mlxq.jobs.workers import WorkerRegistry

__all__ = ["Heartbeat", "worker_name"]

log = logging.getLogger(__name__)

#: Beats over which "recent tokens/s" is measured (about half a minute by default).
_WINDOW = 6


def worker_name(suffix: str = "") -> str:
    """``mlxq-PID@HOST``: the Celery node name of an ``mlxq worker``, so Flower shows the same
    name (``suffix`` after the pid tells apart workers that share a process)."""
    return f"mlxq-{os.getpid()}{suffix}@{socket.gethostname()}"


class Heartbeat:
    """Writes ``fields`` (updated with :meth:`update`) and the counters of ``stats`` every ``interval`` s."""

    def __init__(self, registry: WorkerRegistry, name: str, fields: dict[str, Any],
                 interval: float = DEFAULT_HEARTBEAT):
        self.registry = registry
        self.name = name
        self.interval = interval
        self._fields = {"host": socket.gethostname(), "pid": os.getpid(), "state": "loading", **fields}
        self._stats: Optional[Callable[[], tuple[int, int]]] = None
        self._tokens: collections.deque[tuple[float, int]] = collections.deque(maxlen=_WINDOW + 1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlxq-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def update(self, stats: Optional[Callable[[], tuple[int, int]]] = None, **fields: Any) -> None:
        """Change fields (``state="ready"``, the device...) and beat at once; ``stats`` gives
        (requests in flight, tokens generated so far)."""
        with self._lock:
            self._fields.update(fields)
            if stats is not None:
                self._stats = stats
        self.beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.registry.remove(self.name)
        except StoreError as exc:
            log.info("could not remove this worker's heartbeat entry (it expires by itself): %s", exc)

    def beat(self) -> None:
        """Write the entry now; a Redis that does not answer is tried again next beat."""
        try:
            self.registry.beat(self.name, self._snapshot(), ttl=3 * self.interval, clock=time.time())
        except StoreError as exc:
            log.debug("heartbeat failed (will retry): %s", exc)

    def _snapshot(self) -> dict[str, Any]:
        with self._lock:
            fields = dict(self._fields)
            stats = self._stats
        if stats is not None:
            in_flight, tokens = stats()
            now = time.monotonic()
            with self._lock:
                self._tokens.append((now, tokens))
                (t0, n0) = self._tokens[0]
            rate = (tokens - n0) / (now - t0) if now > t0 else 0.0
            fields.update(in_flight=in_flight, tokens=tokens, tokens_per_s=round(rate, 1))
        return fields

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()
