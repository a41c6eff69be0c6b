"""What the commands share: the settings of the ``mlxq`` group, JSON output, and reports."""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from typing import Callable, Optional

import click

from mlxq.client import Client, Job
from mlxq.jobs.defaults import DEFAULT_MODEL, DEFAULT_PREFIX_CACHE_MB, DEFAULT_RETENTION
from mlxq.jobs.errors import StoreError
from mlxq.jobs.models import model_name
from mlxq.jobs.store import JobInfo, JobStore

__all__ = ["Settings", "pass_settings", "echo_json", "describe", "report_invalid", "start_hint", "no_worker",
           "WorkerCheck", "backlog_option", "prefix_cache_option"]


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

#: The engine's options that ``mlxq worker`` and ``mlxq run`` share.
backlog_option = click.option(
    "--backlog", type=click.IntRange(min=0), envvar="MLXQ_BACKLOG", show_default="concurrency/4, at least 2",
    help="Requests held ready beyond --concurrency, so a row that frees is refilled at once.")
prefix_cache_option = click.option(
    "--prefix-cache-mb", type=click.FloatRange(min=0), default=DEFAULT_PREFIX_CACHE_MB, show_default=True,
    envvar="MLXQ_PREFIX_CACHE_MB",
    help="Memory for keys and values of prompt prefixes already computed (0 turns the cache off).")


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


def describe(info: JobInfo) -> str:
    return (
        f"job {info.job_id}: {info.status.value} ({info.model})\n"
        f"  total {info.total}  queued {info.queued}  running {info.running}  "
        f"completed {info.completed}  failed {info.failed}  cancelled {info.cancelled}\n"
        f"  tokens: {info.tokens} generated, {info.prompt_tokens} prompt"
        + (f" ({info.cached_tokens}, {info.cached_share:.0%}, from the prefix cache)" if info.prompt_tokens else "")
    )


def report_invalid(job: Job) -> None:
    """A warning on stderr for each invalid line shown, and how many more there are."""
    for message in job.errors:
        click.echo(f"warning: {message}", err=True)
    if job.invalid > len(job.errors):
        click.echo(f"warning: ... and {job.invalid - len(job.errors)} more invalid lines (see mlxq results)",
                   err=True)


def start_hint(model: Optional[str]) -> str:
    """The command that starts a worker for ``model`` (against the same Redis: MLXQ_REDIS_URL)."""
    if not model or model_name(model) == model_name(DEFAULT_MODEL):
        return "mlxq worker"
    return f"mlxq worker --model {shlex.quote(model)}"


def no_worker(model: str) -> str:
    return f"no live worker serves model {model}; start one with: {start_hint(model)}"


class WorkerCheck:
    """Says (through ``say``) when no live worker serves a running job's model, and when one
    does again; looks at Redis at most every ``every`` seconds."""

    def __init__(self, store: JobStore, say: Callable[[str], None], every: float = 2.0):
        self.store = store
        self.say = say
        self.every = every
        self._looked = float("-inf")
        self._missing = False

    def __call__(self, info: JobInfo) -> None:
        if info.status.terminal or time.monotonic() - self._looked < self.every:
            return
        self._looked = time.monotonic()
        count = len(self.store.workers.live(info.model))
        if count == 0 and not self._missing:
            self.say(f"job {info.job_id}: {no_worker(info.model)}")
        elif count and self._missing:
            self.say(f"job {info.job_id}: {count} live worker{'s' if count > 1 else ''} serve{'' if count > 1 else 's'} "
                     f"model {info.model} now")
        self._missing = count == 0
