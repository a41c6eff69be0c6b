"""Keep this worker's leases alive, and re-queue the requests of dead workers.

It also sends the next messages of its model's jobs as the model's queue
runs short, and those of jobs whose sender died before it had sent its
window (see ``feed``).

A running request holds a lease in Redis. This thread renews the leases of
the requests its worker runs; a worker killed mid-generation stops renewing,
so its leases lapse, and the next look by any live worker's keeper puts those
requests back in the queue (atomically, so only one keeper does) and sends
them to the model's Celery queue again. A dead worker may also have taken
messages it had not started yet (no lease): so the keeper that re-queues a
job's requests sends that job's other queued requests again too. Celery's own
re-delivery of the dead worker's messages comes much later (the visibility
timeout) and finds the requests ended: a no-op, as is every duplicate (the
first message to claim a request runs it).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

from mlxq.jobs.defaults import DEFAULT_QUEUE_AHEAD
from mlxq.jobs.errors import JobNotFound, StoreError
from mlxq.jobs.models import model_name
from mlxq.jobs.store import SEND_GRACE, JobStore

__all__ = ["LeaseKeeper"]

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        store: JobStore,
        running: Callable[[], list[str]],
        send: Callable[[str, Iterable[int], str], int],
        lease: float,
        model: str | None = None,
        send_grace: float = SEND_GRACE,
        queue: str | None = None,
        send_window: Callable[[JobStore, str, str, int], int] | None = None,
        ahead: int = DEFAULT_QUEUE_AHEAD,
    ):
        self.store = store
        self.running = running
        self.send = send
        self.lease = lease
        self.model = model
        self.send_grace = send_grace
        self.queue = queue
        self.send_window = send_window
        self.ahead = ahead
        self._redis_was_down = False
        #: Leases are renewed every quarter of the lease; the keeper looks for lapsed
        #: leases and unsent jobs more often, so a lapse is seen soon after it happens.
        self.renew_every = max(0.2, min(lease / 4, 15.0))
        self.interval = min(self.renew_every, 1.0)
        self._renewed_at = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlxq-leases", daemon=True)

    def start(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
                self.feed()
                if self._redis_was_down:
                    self.resend_queued()
                    self._redis_was_down = False
            except StoreError as exc:
                self._redis_was_down = True
                log.warning("lease upkeep failed (will retry): %s", exc)

    def resend_queued(self) -> None:
        """After Redis was unreachable, send every queued request of this model again (those
        whose message had been sent: the others wait for ``feed``).

        Redis's broker transport pops a message before the worker has it: a
        connection lost in between loses the message, and its request would stay
        queued for ever. A second message for a request is harmless: the first to
        claim it runs it, and the other finds it running or ended.
        """
        sent = 0
        for info in self.store.unfinished_jobs():
            if self.model is None or model_name(info.model) == model_name(self.model):
                sent += self.send(info.job_id, self.store.queued_indices(info.job_id, sent_only=True), info.model)
        if sent:
            log.warning("Redis was unreachable: sent %d queued requests again (duplicates are no-ops)", sent)

    def feed(self) -> int:
        """Send the next messages of this model's jobs while its queue holds less than half
        of ``ahead`` (the rest of each job waits in the job store, not in the queue).

        This also sends for a job whose sender died before it had sent its first
        window (``mlxq submit`` killed, or its connection lost): once its claim
        has run out, the first keeper to look sends from where it stopped.
        Returns how many it sent.
        """
        if self.model is None or self.queue is None or self.send_window is None:
            return 0
        room = self.ahead - self.store.queue_length(self.queue)
        if room < self.ahead / 2:
            return 0
        count = 0
        for job_id, orphaned in self.store.claim_unsent(self.model, self.send_grace):
            try:
                info = self.store.info(job_id)
            except JobNotFound:  # expired, or discarded
                self.store.sent(job_id, self.model)
                continue
            if info.status.terminal or room <= 0:
                if info.status.terminal:
                    self.store.sent(job_id, self.model)
                else:
                    self.store.release(job_id, self.model)
                continue
            sent = self.send_window(self.store, job_id, info.model, room)
            room -= sent
            count += sent
            if orphaned:
                log.warning("job %s: its sender stopped before sending every request; sent its %d queued requests "
                            "that had no message yet (the rest follow as the queue runs short)", job_id, sent)
        return count

    def tick(self) -> None:
        """Renew this worker's leases when due; re-queue the requests whose lease lapsed.

        Whether a lease lapsed is decided by the Redis server's clock (see
        :mod:`mlxq.jobs.scripts`), so a worker whose own clock is off never
        takes a live request for a dead one.
        """
        if time.monotonic() - self._renewed_at >= self.renew_every:
            self.store.renew(self.running(), self.lease)
            self._renewed_at = time.monotonic()
        requeued: dict[str, set[int]] = {}  # job -> the indices re-queued
        for job_id, index in self.store.lapsed():
            if self.store.requeue(job_id, index):
                requeued.setdefault(job_id, set()).add(index)
                log.warning("request %s of job %s: its worker stopped renewing its lease; re-queued", index, job_id)
        for job_id, indices in requeued.items():
            model = self.store.model_of(job_id)
            if model is not None:
                self._send_again(job_id, model, indices)

    def _send_again(self, job_id: str, model: str, requeued: set[int]) -> None:
        """Send the job's re-queued requests again, and its other queued requests sent before
        with them (one send): the dead worker may have taken their messages without
        starting them, and kept them from every other worker."""
        others = [i for i in self.store.queued_indices(job_id, sent_only=True) if i not in requeued]
        if self.send(job_id, sorted(requeued) + others, model) and others:
            log.warning("job %s: a worker died; sent its %d other queued requests again, in case it had "
                        "taken their messages (duplicates are no-ops)", job_id, len(others))
