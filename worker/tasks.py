"""Celery tasks: one per request; the work happens in :mod:`worker.runner`."""

from __future__ import annotations

from .app import app, queue_for
from .runner import current_runner

__all__ = ["generate", "enqueue"]


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
