"""Helpers the commands share."""

from __future__ import annotations

import json

import click

from mlxq.jobs.errors import StoreError
from mlxq.jobs.store import JobInfo, JobStore

__all__ = ["store_from", "echo_json", "describe"]


def store_from(ctx: click.Context) -> JobStore:
    store = JobStore.from_url(ctx.obj["redis_url"])
    try:
        store.ping()
    except StoreError as exc:
        raise StoreError(
            f"{exc} (is Redis running there? Set --redis-url or MLXQ_REDIS_URL, "
            "or use `mlxq run`, which starts its own)"
        ) from exc
    return store


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


def describe(info: JobInfo) -> str:
    return (
        f"job {info.job_id}: {info.status.value} ({info.model})\n"
        f"  total {info.total}  queued {info.queued}  running {info.running}  "
        f"completed {info.completed}  failed {info.failed}  cancelled {info.cancelled}"
    )
