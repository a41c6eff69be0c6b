"""Publish partial results from a thread of their own.

The engine hands over each step's new text in one call; the publisher sends
everything that has queued up since its last write in one pipeline, so
streaming costs one round trip per engine step at most, and the engine never
waits on Redis. End events go through the same queue, after their result is
stored, so a follower sees a request's deltas, then its end, and can fetch
the result the moment it sees the end.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Iterable, Optional

from mlxq.jobs.errors import StoreError
from mlxq.jobs.events import Event
from mlxq.jobs.store import JobStore

__all__ = ["Publisher"]

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, store: JobStore, retry_for: float = 60.0):
        self.store = store
        self.retry_for = retry_for
        self._queue: "queue.SimpleQueue[Optional[Event]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mlxq-publisher", daemon=True)
        self._stopped = threading.Event()

    def start(self) -> "Publisher":
        self._thread.start()
        return self

    def put(self, events: Iterable[Event]) -> None:
        for event in events:
            self._queue.put(event)

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[Event] = []
            item = self._queue.get()
            while True:
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._send(batch)

    def _send(self, batch: list[Event]) -> None:
        deadline = time.monotonic() + self.retry_for
        delay = 0.1
        while True:
            try:
                self.store.emit(batch)
                return
            except StoreError as exc:
                if time.monotonic() > deadline:
                    log.error("dropped %d stream events: %s", len(batch), exc)
                    return
                log.warning("publishing stream events failed, retrying: %s", exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
