"""``mlxq submit``: validate a JSONL file and queue its requests."""

from __future__ import annotations

import click

from jobs.defaults import DEFAULT_MAX_LINE_BYTES, DEFAULT_MAX_REQUESTS, DEFAULT_MODEL
from jobs.errors import InputError
from jobs.ingest import read_lines
from jobs.store import JobStore

from .common import describe, echo_json, store_from, wait_for
from .main import cli

_BATCH = 500
_SHOWN = 10


def ingest(store: JobStore, path: str, model: str, max_line_bytes: int, max_requests: int):
    """Store every line of ``path`` under a new job; returns (info, invalid, errors shown)."""
    job_id = store.new_job_id()
    total = valid = 0
    errors: list[str] = []
    batch = []
    try:
        with open(path, "rb") as fp:
            for line in read_lines(fp, max_line_bytes):
                if total >= max_requests:
                    raise InputError(
                        f"{path}: more than the limit of {max_requests} requests per job "
                        "(set --max-requests to raise it, or split the file)"
                    )
                total += 1
                if line.error and len(errors) < _SHOWN:
                    errors.append(line.error)
                batch.append(line)
                if len(batch) >= _BATCH:
                    valid += store.add_lines(job_id, batch)[0]
                    batch = []
            if batch:
                valid += store.add_lines(job_id, batch)[0]
        if total == 0:
            raise InputError(f"{path}: no requests in the file")
        if valid == 0:
            first = f"; the first: {errors[0]}" if errors else ""
            raise InputError(f"{path}: none of its {total} requests is valid{first}")
    except BaseException:
        store.discard(job_id)
        raise
    return store.finalize(job_id, model, total, valid), total - valid, errors


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True))
@click.option("--model", envvar="MLXQ_MODEL", default=DEFAULT_MODEL, show_default=True,
              help="Model for every request: a seed name, hub repository or local directory (env MLXQ_MODEL).")
@click.option("--wait", is_flag=True, help="Block until the job has ended.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--max-line-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_LINE_BYTES, show_default=True,
              envvar="MLXQ_MAX_LINE_BYTES", help="Longest accepted line.")
@click.option("--max-requests", type=click.IntRange(min=1), default=DEFAULT_MAX_REQUESTS, show_default=True,
              envvar="MLXQ_MAX_REQUESTS", help="Most requests in one job.")
@click.pass_context
def submit(ctx, file, model, wait, as_json, max_line_bytes, max_requests):
    """Validate FILE (JSONL, one request per line) and queue it.

    Bad lines fail alone, each with an error naming its line and field; the
    rest run. Prints the job id.

    \b
    Example:
      mlxq submit requests.jsonl --wait
    """
    from worker.app import configure
    from worker.tasks import enqueue

    store = store_from(ctx)
    info, invalid, errors = ingest(store, file, model, max_line_bytes, max_requests)
    configure(ctx.obj["redis_url"])
    enqueue(info.job_id, store.queued_indices(info.job_id), model)
    for message in errors:
        click.echo(f"warning: {message}", err=True)
    if invalid > len(errors):
        click.echo(f"warning: ... and {invalid - len(errors)} more invalid lines (see mlxq results)", err=True)
    if as_json and not wait:
        echo_json({"job_id": info.job_id, "total": info.total, "invalid": invalid})
    elif not as_json:
        click.echo(info.job_id)
    if wait:
        final = wait_for(store, info.job_id)
        if as_json:
            echo_json({"job_id": info.job_id, "total": info.total, "invalid": invalid, **final.as_dict()})
        else:
            click.echo(describe(final), err=True)
