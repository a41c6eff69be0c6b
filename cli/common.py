"""Helpers the commands share."""

from __future__ import annotations

import json
import time

import click

from jobs.models import JobStatus
from jobs.store import JobInfo, JobStore

__all__ = ["store_from", "echo_json", "wait_for", "describe"]


def store_from(ctx: click.Context) -> JobStore:
    store = JobStore.from_url(ctx.obj["redis_url"])
    store.ping()
    return store


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


def describe(info: JobInfo) -> str:
    return (
        f"job {info.job_id}: {info.status.value} ({info.model})\n"
        f"  total {info.total}  queued {info.queued}  running {info.running}  "
        f"completed {info.completed}  failed {info.failed}  cancelled {info.cancelled}"
    )


def wait_for(store: JobStore, job_id: str, interval: float = 0.5) -> JobInfo:
    """Poll until the job is terminal."""
    while True:
        info = store.info(job_id)
        if info.status in (JobStatus.COMPLETED, JobStatus.CANCELLED):
            return info
        time.sleep(interval)
