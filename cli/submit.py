"""``mlxq submit``: validate a JSONL file and queue its requests."""

from __future__ import annotations

import click

from mlxq.jobs.defaults import (
    DEFAULT_MAX_LINE_BYTES, DEFAULT_MAX_REQUESTS, DEFAULT_MAX_TOTAL_TOKENS, DEFAULT_MODEL, DEFAULT_QUEUE_AHEAD,
    DEFAULT_RETENTION,
)
from mlxq.jobs.files import Limits

from .common import Settings, echo_json, pass_settings, report_invalid
from .progress import watch

__all__ = ["submit"]


@click.command()
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
@click.option("--queue-ahead", type=click.IntRange(min=1), default=DEFAULT_QUEUE_AHEAD, show_default=True,
              envvar="MLXQ_QUEUE_AHEAD",
              help="Requests sent to the queue now; the model's workers send the rest as they need them.")
@pass_settings
def submit(settings: Settings, file, model, wait, as_json, max_line_bytes, max_requests, max_total_tokens,
           retention, queue_ahead):
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
    client = settings.client(retention)
    job = client.submit(file, model, limits=Limits(max_line_bytes, max_requests, max_total_tokens),
                        ahead=queue_ahead)
    report_invalid(job)
    out = {"job_id": job.id, "total": job.total, "invalid": job.invalid}
    if as_json and not wait:
        echo_json(out)
    elif not as_json:
        click.echo(job.id)
    if wait:
        final = watch(job, plain=True if as_json else None)
        if as_json:
            echo_json({**out, **final.as_dict()})
