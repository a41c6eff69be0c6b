"""``mlxq status|results|cancel|jobs``: look at jobs and steer them."""

from __future__ import annotations

import datetime as dt

import click

from . import progress
from .common import describe, echo_json, store_from
from .main import cli


@cli.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--watch", is_flag=True, help="Show progress until the job ends.")
@click.pass_context
def status(ctx, job, as_json, watch):
    """Show JOB's status and request counts.

    \b
    Examples:
      mlxq status 3f2a... --json
      mlxq status 3f2a... --watch
    """
    store = store_from(ctx)
    info = progress.watch(store, job, plain=True if as_json else None) if watch else store.info(job)
    if as_json:
        echo_json(info.as_dict())
    else:
        click.echo(describe(info))


@cli.command()
@click.argument("job")
@click.pass_context
def cancel(ctx, job):
    """Cancel JOB: queued requests never start, running ones stop at the next step.

    Finished requests keep their results.

    \b
    Example:
      mlxq cancel 3f2a...
    """
    click.echo(f"job {job}: {store_from(ctx).cancel(job).value}")


@cli.command()
@click.argument("job")
@click.pass_context
def retry(ctx, job):
    """Queue JOB's failed requests again (not those whose input was invalid).

    \b
    Example:
      mlxq retry 3f2a...
    """
    from mlxq.worker.app import configure
    from mlxq.worker.tasks import enqueue

    store = store_from(ctx)
    indices = store.retry(job)
    if indices:
        configure(ctx.obj["redis_url"])
        enqueue(job, indices, store.info(job).model)
    click.echo(f"job {job}: {len(indices)} failed requests queued again")


@cli.command(name="jobs")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@click.pass_context
def list_jobs(ctx, limit, as_json):
    """List jobs, newest first.

    \b
    Example:
      mlxq jobs --limit 10
    """
    for info in store_from(ctx).list_jobs(limit):
        if as_json:
            echo_json(info.as_dict())
            continue
        when = dt.datetime.fromtimestamp(info.created_at).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{info.job_id}  {when}  {info.status.value:<10}  "
            f"{info.completed + info.failed + info.cancelled}/{info.total} done, {info.failed} failed"
        )
