"""What the commands share: the settings of the ``mlxq`` group, JSON output, and reports."""

from __future__ import annotations

import json
from dataclasses import dataclass

import click

from mlxq.client import Client, Job
from mlxq.jobs.defaults import DEFAULT_RETENTION
from mlxq.jobs.errors import StoreError
from mlxq.jobs.store import JobInfo

__all__ = ["Settings", "pass_settings", "echo_json", "describe", "report_invalid"]


@dataclass(frozen=True)
class Settings:
    """The group's options, handed to every command that needs them (``@pass_settings``)."""

    redis_url: str
    #: Whether --redis-url or MLXQ_REDIS_URL chose the URL (else it is the default).
    redis_url_given: bool = False

    def client(self, retention: int = DEFAULT_RETENTION) -> Client:
        """A client of the Redis at ``redis_url``, answering; else a StoreError that suggests the fix."""
        client = Client(self.redis_url, retention=retention)
        try:
            client.ping()
        except StoreError as exc:
            raise StoreError(
                f"{exc} (is Redis running there? Set --redis-url or MLXQ_REDIS_URL, "
                "or use `mlxq run`, which starts its own)"
            ) from exc
        return client


pass_settings = click.make_pass_decorator(Settings)


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


def describe(info: JobInfo) -> str:
    return (
        f"job {info.job_id}: {info.status.value} ({info.model})\n"
        f"  total {info.total}  queued {info.queued}  running {info.running}  "
        f"completed {info.completed}  failed {info.failed}  cancelled {info.cancelled}"
    )


def report_invalid(job: Job) -> None:
    """A warning on stderr for each invalid line shown, and how many more there are."""
    for message in job.errors:
        click.echo(f"warning: {message}", err=True)
    if job.invalid > len(job.errors):
        click.echo(f"warning: ... and {job.invalid - len(job.errors)} more invalid lines (see mlxq results)",
                   err=True)
