"""Celery tasks: one per request; the work happens in :mod:`mlxq.worker.runner`."""

from __future__ import annotations

from .app import app, queue_for
from .runner import current_runner

__all__ = ["generate", "enqueue", "send_window"]


@app.task(name="mlxq.generate", ignore_result=True)
def generate(job_id: str, index: int) -> str:
    """Run request ``index`` of job ``job_id`` on this worker's engine."""
    return current_runner().run(job_id, index)


def enqueue(job_id: str, indices, model: str) -> int:
    """Send one task per request index over one broker connection; returns the count."""
    queue = queue_for(model)
    sent = 0
    with app.producer_or_acquire() as producer:
        for index in indices:
            generate.apply_async((job_id, index), queue=queue, producer=producer)
            sent += 1
    return sent


def send_window(store, job_id: str, model: str, limit: int) -> int:
    """Send the next ``limit`` messages of a job sent a window at a time (the caller holds
    its claim), the most ``max_tokens`` first; then give the claim up, or mark the job
    sent when none is left. Returns how many it sent."""
    indices, cursor, total = store.next_window(job_id, limit)
    sent = enqueue(job_id, store.longest_first(job_id, indices), model) if indices else 0
    if cursor >= total:
        store.sent(job_id, model, cursor if total else None)
    else:
        store.release(job_id, model, cursor)
    return sent
