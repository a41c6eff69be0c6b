"""``mlxq workers``: the live workers, from their heartbeat entries in Redis."""

from __future__ import annotations

import click

from mlxq.jobs.workers import WorkerInfo

from .common import Settings, echo_json, pass_settings, start_hint

__all__ = ["workers"]


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _line(w: WorkerInfo, now: float) -> str:
    parts = [w.name, w.state, f"model {w.model}"]
    if w.device:
        parts.append(f"{w.device}, {w.dtype}, BLAS {w.blas}")
    parts += [f"in flight {w.in_flight}/{w.concurrency}", f"{w.tokens} tokens", f"{w.tokens_per_s:.1f} tok/s",
              f"up {_ago(now - w.started)}", f"seen {_ago(now - w.last_seen)} ago"]
    if abs(w.clock_skew) >= 2:
        parts.append(f"its clock {w.clock_skew:+.0f}s off Redis's (harmless: Redis's clock decides)")
    return "  ".join(parts)


@click.command()
@click.option("--model", help="Only the workers serving this model.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list: host, pid, model, state, device, dtype, blas, concurrency, in_flight, tokens, "
                   "tokens_per_s, started, last_seen (Unix seconds, Redis's clock), clock_skew, name.")
@pass_settings
def workers(settings: Settings, model, as_json):
    """List the live workers: what each serves, on what, and how busy it is.

    A worker writes its entry in Redis every 5 s (--heartbeat); one not heard
    from for three beats is gone. A worker is listed from its start, while it
    loads its model ("loading").

    \b
    Examples:
      mlxq workers
      mlxq workers --json
    """
    client = settings.client()
    live = client.workers(model)
    if as_json:
        echo_json([w.as_dict() for w in live])
        return
    if not live:
        click.echo(f"no live workers{f' serve {model}' if model else ''}; start one with: {start_hint(model)}")
        return
    now = client.store.clock()
    for w in live:
        click.echo(_line(w, now))
