"""Progress of a job: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Optional

import click

from mlxq.jobs.store import JobInfo, JobStore

from .common import WorkerCheck

__all__ = ["watch", "summary"]


def _rates(info: JobInfo, now: float) -> tuple[float, float, Optional[float]]:
    """(elapsed seconds, tokens/s, ETA seconds or None)."""
    start = info.started_at or info.created_at
    end = info.finished_at or now
    elapsed = max(end - start, 1e-9)
    rate = info.tokens / elapsed if info.started_at else 0.0
    eta = None
    if 0 < info.done < info.total and info.started_at:
        eta = elapsed / info.done * (info.total - info.done)
    return elapsed, rate, eta


def _now(info: JobInfo) -> float:
    """The time to set against the job's times: the Redis server's, read with them
    (the job's times are the server's; this machine's clock may differ)."""
    return info.now if info.now is not None else time.time()


def summary(info: JobInfo, now: Optional[float] = None) -> str:
    """One parseable line: ``job J: running 10/64 done, 1 failed, 2300 tokens, 45.2 tok/s, ...``."""
    elapsed, rate, eta = _rates(info, now or _now(info))
    text = (
        f"job {info.job_id}: {info.status.value} {info.done}/{info.total} done, {info.failed} failed, "
        f"{info.cancelled} cancelled, {info.tokens} tokens, {rate:.1f} tok/s, {elapsed:.0f}s elapsed"
    )
    return text + (f", eta {eta:.0f}s" if eta is not None else "")


def watch(store: JobStore, job_id: str, plain: Optional[bool] = None, interval: float = 0.5,
          every: float = 2.0) -> JobInfo:
    """Show the job's progress on stderr until it ends; returns its final state.

    Says so when no live worker serves the job's model (and when one comes).
    """
    if plain is None:
        plain = not sys.stderr.isatty()
    if plain:
        return _plain(store, job_id, interval, every)
    return _rich(store, job_id, interval)


def _plain(store: JobStore, job_id: str, interval: float, every: float) -> JobInfo:
    last_line, last_time = None, 0.0
    check = WorkerCheck(store, lambda text: click.echo(f"mlxq: {text}", err=True))
    while True:
        info = store.info(job_id)
        check(info)
        line = summary(info)
        now = time.monotonic()
        key = (info.status, info.done, info.tokens)
        if info.status.terminal or (key != last_line and now - last_time >= every):
            click.echo(line, err=True)
            last_line, last_time = key, now
        if info.status.terminal:
            return info
        time.sleep(interval)


def _rich(store: JobStore, job_id: str, interval: float) -> JobInfo:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"), TextColumn("{task.fields[rate]:.1f} tok/s"),
        TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
        console=Console(stderr=True), transient=False,
    )
    with progress:
        info = store.info(job_id)
        task = progress.add_task(info.status.value, total=info.total, failed=0, rate=0.0, eta="-")
        check = WorkerCheck(store, lambda text: progress.console.print(f"mlxq: {text}", markup=False,
                                                                       highlight=False))
        while True:
            info = store.info(job_id)
            check(info)
            _, rate, eta = _rates(info, _now(info))
            progress.update(
                task, completed=info.done, description=info.status.value, failed=info.failed, rate=rate,
                eta=f"{eta:.0f}s" if eta is not None else "-",
            )
            if info.status.terminal:
                return info
            time.sleep(interval)
