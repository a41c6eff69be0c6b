"""``mlxq status|cancel|retry|jobs``: look at jobs and steer them."""

from __future__ import annotations

import datetime as dt

import click

from . import progress
from .common import Settings, describe, echo_json, no_worker, pass_settings

__all__ = ["status", "cancel", "retry", "list_jobs"]


@click.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--watch", is_flag=True, help="Show progress until the job ends.")
@pass_settings
def status(settings: Settings, job, as_json, watch):
    """Show JOB's status and request counts, and how many live workers serve its model.

    \b
    Examples:
      mlxq status 3f2a... --json
      mlxq status 3f2a... --watch
    """
    handle = settings.client().job(job)
    info = progress.watch(handle, plain=True if as_json else None) if watch else handle.status()
    serving = len(handle.client.workers(info.model))
    if as_json:
        echo_json({**info.as_dict(), "workers": serving})
        return
    click.echo(describe(info))
    if serving:
        click.echo(f"  workers: {serving} live serving {info.model}")
    elif not info.status.terminal:
        click.echo(f"  {no_worker(info.model)}")


@click.command()
@click.argument("job")
@pass_settings
def cancel(settings: Settings, job):
    """Cancel JOB: queued requests never start, running ones stop at the next step.

    Finished requests keep their results.

    \b
    Example:
      mlxq cancel 3f2a...
    """
    click.echo(f"job {job}: {settings.client().job(job).cancel().value}")


@click.command()
@click.argument("job")
@pass_settings
def retry(settings: Settings, job):
    """Queue JOB's failed requests again (not those whose input was invalid).

    \b
    Example:
      mlxq retry 3f2a...
    """
    indices = settings.client().job(job).retry()
    click.echo(f"job {job}: {len(indices)} failed requests queued again")


@click.command(name="jobs")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@pass_settings
def list_jobs(settings: Settings, limit, as_json):
    """List jobs, newest first.

    \b
    Example:
      mlxq jobs --limit 10
    """
    for info in settings.client().jobs(limit):
        if as_json:
            echo_json(info.as_dict())
            continue
        when = dt.datetime.fromtimestamp(info.created_at).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{info.job_id}  {when}  {info.status.value:<10}  "
            f"{info.completed + info.failed + info.cancelled}/{info.total} done, {info.failed} failed"
        )
