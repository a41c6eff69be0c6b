"""``mlxq run``: the whole job in one command."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path

import click
import redis
from click.core import ParameterSource

from mlxq.client import Client
from mlxq.jobs.defaults import DEFAULT_CONCURRENCY, DEFAULT_MODEL
from mlxq.jobs.models import model_name
from mlxq.jobs.urls import mask_url

from .common import Settings, backlog_option, prefix_cache_option, report_invalid
from .embedded import EmbeddedRedis, default_data_dir
from .progress import watch

__all__ = ["run"]


def _interrupt_once(signum, frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _first_interrupt_stops():
    """The first Ctrl-C raises KeyboardInterrupt and the handler itself ignores any
    further one, with no gap between the two: stopping takes a few seconds
    (requests released, the embedded Redis shut down cleanly), and a second
    Ctrl-C must not cut that short or end the process by the signal instead of
    exit code 130. Without an interruption, the previous handler comes back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _interrupt_once)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is _interrupt_once:
            signal.signal(signal.SIGINT, previous)


def _choose_redis(settings: Settings, embedded: bool, data_dir: Path):
    """The Redis to use: the one configured, else one on localhost, else a private one."""
    url = settings.redis_url
    if not embedded and (settings.redis_url_given or _answers(url)):
        return contextlib.nullcontext(url)
    return _embedded(data_dir)


def _answers(url: str) -> bool:
    """A quick look (no retries): does a Redis server answer at ``url``?"""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


@contextlib.contextmanager
def _embedded(data_dir: Path):
    with EmbeddedRedis(data_dir) as server:
        click.echo(f"mlxq: started an embedded Redis in {data_dir}", err=True)
        yield server.url


@click.command()
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Results file (JSONL). Default: FILE with .results.jsonl.")
@click.option("--model", envvar="MLXQ_MODEL", default=DEFAULT_MODEL, show_default=True,
              help="Model: a seed name, hub repository or local directory (env MLXQ_MODEL). "
                   "With --resume, the job's own.")
@click.option("--concurrency", type=click.IntRange(min=1), default=DEFAULT_CONCURRENCY, show_default=True,
              envvar="MLXQ_CONCURRENCY", help="Requests generated at once.")
@backlog_option
@prefix_cache_option
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=default_data_dir,
              envvar="MLXQ_DATA_DIR", show_default="~/.local/share/mlxq", help="Where the embedded Redis keeps its data.")
@click.option("--embedded", is_flag=True, help="Always use the embedded Redis, even if one answers on localhost.")
@click.option("--resume", "resume", metavar="JOB", help="Finish an interrupted job instead of submitting FILE.")
@click.option("--format", "fmt", type=click.Choice(["mlxq", "openai"]), default="mlxq", show_default=True,
              help="Results format.")
@click.pass_context
def run(ctx, file, output, model, concurrency, backlog, prefix_cache_mb, data_dir, embedded, resume, fmt):
    """Run FILE start to finish: queue it, generate, write the results.

    Uses the Redis of --redis-url/MLXQ_REDIS_URL when one is set, else one on
    localhost, else starts an embedded Redis that persists under --data-dir.
    A worker runs in this process. Ctrl-C stops cleanly (more Ctrl-Cs while it
    stops are ignored); the job is kept and
    `mlxq run --resume JOB` finishes it, with the model it was submitted for,
    sending at once any request the interrupted run had not sent yet.

    \b
    Examples:
      mlxq run requests.jsonl -o results.jsonl
      mlxq run --resume 3f2a...
    """
    from mlxq.worker.process import prepare_worker_process

    if not file and not resume:
        raise click.UsageError("give FILE, or --resume JOB")
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    prepare_worker_process()
    from mlxq.worker.service import running_worker

    with _choose_redis(ctx.find_object(Settings), embedded, data_dir) as url:
        client = Client(url)
        client.ping()
        if resume:
            job = client.job(resume)
            info = job.status()
            if (ctx.get_parameter_source("model") is ParameterSource.COMMANDLINE
                    and model_name(model) != model_name(info.model)):
                raise click.UsageError(f"job {resume} is for model {info.model}, not {model}", ctx)
            model = info.model  # its messages wait in that model's queue
        kept = None  # the job, once it is stored: an interruption keeps it
        try:
            with running_worker(url, model, concurrency, backlog, prefix_cache_mb=prefix_cache_mb):
                if resume:
                    kept = job
                    # Interrupted while sending: send its queued requests now rather
                    # than after a worker's wait for a dead sender (duplicates are no-ops).
                    job.resume()
                else:
                    kept = job = client.submit(file, model)
                    report_invalid(job)
                click.echo(f"mlxq: job {job.id} on {mask_url(url)}", err=True)
                with _first_interrupt_stops():
                    watch(job)
        except KeyboardInterrupt:
            if kept is not None:
                click.echo(f"\nmlxq: interrupted; the job is kept: mlxq run --resume {kept.id}"
                           + (f" --data-dir {data_dir}" if url.startswith("unix://") else ""), err=True)
            raise
        target = output or (str(Path(file).with_suffix("")) + ".results.jsonl" if file else f"{job.id}.results.jsonl")
        with open(target, "w", encoding="utf-8") as out:
            job.write_results(out, fmt)
        click.echo(target)
