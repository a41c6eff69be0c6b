"""``mlxq stream``: follow a job's partial results, replaying what came before."""

from __future__ import annotations

import json

import click

from mlxq.client import Job
from mlxq.jobs.events import Event
from mlxq.jobs.workers_ai import sse_data

from .common import Settings, WorkerCheck

__all__ = ["stream"]


class _Human:
    """Each request's text as it grows, marked by index."""

    def __init__(self):
        self.open: int | None = None

    def __call__(self, ev: Event) -> None:
        if self.open != ev.index:
            if self.open is not None:
                click.echo()
            click.echo(f"[{ev.index}] ", nl=False)
            self.open = ev.index
        click.echo(ev.delta, nl=False)
        if ev.done:
            how = ev.finish_reason or ev.status
            tokens = f", {ev.usage['completion_tokens']} tokens" if ev.usage else ""
            error = f": {ev.error['message']}" if ev.error else ""
            calls = "".join(f", calls {c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})"
                            for c in ev.tool_calls or ())
            click.echo(f"  <{how}{tokens}{calls}{error}>")
            self.open = None


def _sse(ev: Event) -> None:
    data = sse_data(ev)
    if data is not None:
        click.echo(f"data: {json.dumps(data, ensure_ascii=False)}\n")
    if ev.done and ev.error:
        click.echo(f"mlxq: request {ev.index} {ev.status}: {ev.error['message']}", err=True)


def _follow(job: Job, index: int | None, show) -> bool:
    """Print events until the job (or request ``index``) ends; True if it ended well."""
    ok = True
    ended = False
    check = WorkerCheck(job.store, lambda text: click.echo(f"mlxq: {text}", err=True))
    for ev in job.stream(index, watch=check):
        show(ev)
        if ev.done:
            ok = ok and ev.status == "completed"
            ended = True
    if index is not None and not ended:
        # It ended without an event (cancelled before it ran): its result says how.
        line = next(l for l in job.results() if l.index == index)
        if line.error:
            click.echo(f"mlxq: request {index} {line.status.value}: {line.error.message}", err=True)
        return line.status.value == "completed"
    return ok


@click.command()
@click.argument("job")
@click.option("--index", type=click.IntRange(min=0), help="Follow only request INDEX (0-based).")
@click.option("--sse", is_flag=True, help="Print Workers AI server-sent events: data: {\"response\": ...} (the last with "
                   "\"tool_calls\" when the request called tools), then data: [DONE].")
@click.pass_context
def stream(ctx, job, index, sse):
    """Follow JOB's partial results live; a late start replays what it missed.

    Requests with "stream": true arrive token by token; others arrive whole
    when they end. Exits when the job (or request INDEX) has ended.

    \b
    Examples:
      mlxq stream 3f2a...
      mlxq stream 3f2a... --index 4 --sse
    """
    handle = ctx.find_object(Settings).client().job(job)
    info = handle.status()
    if sse and index is None:
        if info.total != 1:
            raise click.UsageError("--sse follows one request: give --index (the job has several)")
        index = 0
    if index is not None and index >= info.total:
        raise click.BadParameter(f"the job has {info.total} requests (0..{info.total - 1})", param_hint="--index")
    ok = _follow(handle, index, _sse if sse else _Human())
    if sse:
        click.echo("data: [DONE]\n")
    ctx.exit(0 if ok or index is None else 1)
