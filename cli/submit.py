"""``mlxq submit``: validate a JSONL file and queue its requests."""

from __future__ import annotations

import click

from mlxq.jobs.defaults import (
    DEFAULT_MAX_LINE_BYTES, DEFAULT_MAX_REQUESTS, DEFAULT_MAX_TOTAL_TOKENS, DEFAULT_MODEL, DEFAULT_RETENTION,
)
from mlxq.jobs.errors import InputError
from mlxq.jobs.ingest import read_requests
from mlxq.jobs.store import JobStore

from .common import echo_json, store_from
from .progress import watch
from .main import cli

_BATCH = 500
_SHOWN = 10


def ingest(
    store: JobStore, path: str, model: str,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS,
):
    """Store every line of ``path`` under a new job; returns (info, invalid, errors shown).

    Nothing is left behind when the file is refused (a limit, or no valid line).
    """
    job_id = store.new_job_id()
    total = valid = tokens = 0
    errors: list[str] = []
    batch = []
    try:
        with open(path, "rb") as fp:
            for line in read_requests(fp, path, max_line_bytes):
                if total >= max_requests:
                    raise InputError(
                        f"{path}: more than the limit of {max_requests} requests per job "
                        "(set --max-requests to raise it, or split the file)"
                    )
                total += 1
                if line.request is not None:
                    tokens += line.request.max_tokens
                    if tokens > max_total_tokens:
                        raise InputError(
                            f"{path}: line {line.lineno}: the job's requests ask for more than the limit of "
                            f"{max_total_tokens} tokens in all (sum of max_tokens; set --max-total-tokens "
                            "to raise it, or split the file)"
                        )
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
    except InputError as exc:
        store.discard(job_id)
        message = str(exc)
        raise InputError(message if message.startswith(f"{path}:") else f"{path}: {message}") from exc
    except BaseException:
        store.discard(job_id)
        raise
    return store.finalize(job_id, model, total, valid), total - valid, errors


def report_invalid(invalid: int, errors: list[str]) -> None:
    for message in errors:
        click.echo(f"warning: {message}", err=True)
    if invalid > len(errors):
        click.echo(f"warning: ... and {invalid - len(errors)} more invalid lines (see mlxq results)", err=True)


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
@click.option("--max-total-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_TOTAL_TOKENS,
              show_default=True, envvar="MLXQ_MAX_TOTAL_TOKENS", help="Most tokens (sum of max_tokens) in one job.")
@click.option("--retention", type=click.IntRange(min=60), default=DEFAULT_RETENTION, show_default=True,
              envvar="MLXQ_RETENTION", help="Seconds the job and its results are kept after it ends.")
@click.pass_context
def submit(ctx, file, model, wait, as_json, max_line_bytes, max_requests, max_total_tokens, retention):
    """Validate FILE and queue it.

    FILE is JSONL, one request per line: Workers AI requests ({"prompt": ...}
    or {"messages": [...]}) or OpenAI Batch API lines ({"custom_id", "method",
    "url", "body"}); or a .json Workers AI batch body {"requests": [...]}.
    Bad lines fail alone, each with an error naming its line and field; the
    rest run. Prints the job id.

    \b
    Example:
      mlxq submit requests.jsonl --wait
    """
    from mlxq.worker.app import configure
    from mlxq.worker.tasks import enqueue

    store = store_from(ctx)
    store.retention = retention
    info, invalid, errors = ingest(store, file, model, max_line_bytes, max_requests, max_total_tokens)
    configure(ctx.obj["redis_url"])
    enqueue(info.job_id, store.queued_indices(info.job_id), model, store)
    report_invalid(invalid, errors)
    if as_json and not wait:
        echo_json({"job_id": info.job_id, "total": info.total, "invalid": invalid})
    elif not as_json:
        click.echo(info.job_id)
    if wait:
        final = watch(store, info.job_id, plain=True if as_json else None)
        if as_json:
            echo_json({"job_id": info.job_id, "total": info.total, "invalid": invalid, **final.as_dict()})
