"""Progress of a job: a rich bar on a terminal, plain lines otherwise (both :meth:`mlxq.Job.wait`)."""

from __future__ import annotations

import sys
import time
from typing import Optional

from mlxq.client import Job
from mlxq.jobs.progress import rates, summary
from mlxq.jobs.store import JobInfo

__all__ = ["watch", "summary"]


def watch(job: Job, plain: Optional[bool] = None, interval: float = 0.5) -> JobInfo:
    """Show the job's progress on stderr until it ends; returns its final state."""
    if plain is None:
        plain = not sys.stderr.isatty()
    if plain:
        return job.wait(progress=True, interval=interval)
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

        def show(info: JobInfo) -> None:
            _, rate, eta = rates(info, time.time())
            progress.update(
                task, completed=info.done, description=info.status.value, failed=info.failed, rate=rate,
                eta=f"{eta:.0f}s" if eta is not None else "-",
            )

        return job.wait(progress=show, interval=interval)
