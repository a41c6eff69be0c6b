"""Progress of a job: a rich bar on a terminal, plain lines otherwise (both :meth:`mlxq.Job.wait`),
and a line when no live worker serves the job's model."""

from __future__ import annotations

import sys
import time
from typing import Optional

import click

from mlxq.client import Job
from mlxq.jobs.progress import now_of, rates, summary
from mlxq.jobs.store import JobInfo

from .common import WorkerCheck

__all__ = ["watch", "summary"]


def watch(job: Job, plain: Optional[bool] = None, interval: float = 0.5, every: float = 2.0) -> JobInfo:
    """Show the job's progress on stderr until it ends; returns its final state.

    Says so when no live worker serves the job's model (and when one comes).
    """
    if plain is None:
        plain = not sys.stderr.isatty()
    if plain:
        check = WorkerCheck(job.store, lambda text: click.echo(f"mlxq: {text}", err=True))
        last: list = [None, 0.0]

        def show(info: JobInfo) -> None:
            check(info)
            now, key = time.monotonic(), (info.status, info.done, info.tokens)
            if info.status.terminal or (key != last[0] and now - last[1] >= every):
                click.echo(summary(info), err=True)
                last[:] = [key, now]

        return job.wait(progress=show, interval=interval)
    return _rich(job, interval)


def _rich(job: Job, interval: float) -> JobInfo:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"), TextColumn("{task.fields[rate]:.1f} tok/s"),
        TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
        console=Console(stderr=True), transient=False,
    )
    with progress:
        info = job.status()
        task = progress.add_task(info.status.value, total=info.total, failed=0, rate=0.0, eta="-")

        check = WorkerCheck(job.store, lambda text: progress.console.print(f"mlxq: {text}", markup=False,
                                                                           highlight=False))

        def show(info: JobInfo) -> None:
            check(info)
            _, rate, eta = rates(info, now_of(info))
            progress.update(
                task, completed=info.done, description=info.status.value, failed=info.failed, rate=rate,
                eta=f"{eta:.0f}s" if eta is not None else "-",
            )

        return job.wait(progress=show, interval=interval)
