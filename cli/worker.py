"""``mlxq worker``: serve a model to the queue."""

from __future__ import annotations

import logging
import os
import sys

import click

from mlxq.jobs.defaults import (
    DEFAULT_CONCURRENCY, DEFAULT_HEARTBEAT, DEFAULT_LEASE, DEFAULT_MAX_ATTEMPTS, DEFAULT_MODEL,
    DEFAULT_QUEUE_AHEAD, DEFAULT_TIME_LIMIT, DEFAULT_VISIBILITY_TIMEOUT,
)
from mlxq.jobs.urls import mask_url

from .common import Settings, backlog_option, pass_settings, prefix_cache_option

__all__ = ["worker"]


@click.command()
@click.option("--model", envvar="MLXQ_MODEL", default=DEFAULT_MODEL, show_default=True,
              help="Model to serve: a seed name, hub repository or local directory (env MLXQ_MODEL).")
@click.option("--concurrency", type=click.IntRange(min=1), default=DEFAULT_CONCURRENCY, show_default=True,
              envvar="MLXQ_CONCURRENCY", help="Requests generated at once (continuous batching width).")
@click.option("--model-dir", "model_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Only load local models inside this directory (repeatable).")
@click.option("--loglevel", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--no-blas-setup", is_flag=True, envvar="MLXQ_NO_BLAS_SETUP",
              help="Do not switch MLX's CPU backend to OpenBLAS.")
@click.option("--lease", type=click.FloatRange(min=0.5), default=DEFAULT_LEASE, show_default=True,
              envvar="MLXQ_LEASE",
              help="Seconds a running request's lease lasts unrenewed; a dead worker's requests run again after it.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=DEFAULT_MAX_ATTEMPTS, show_default=True,
              envvar="MLXQ_MAX_ATTEMPTS", help="Starts of a request (its worker dying each time) before it fails.")
@click.option("--time-limit", type=click.FloatRange(min=0.1), default=DEFAULT_TIME_LIMIT, show_default=True,
              envvar="MLXQ_TIME_LIMIT", help="Seconds one request may generate before it fails.")
@click.option("--visibility-timeout", type=click.IntRange(min=1), default=DEFAULT_VISIBILITY_TIMEOUT,
              show_default=True, envvar="MLXQ_VISIBILITY_TIMEOUT",
              help="Seconds before the broker re-delivers an unacknowledged message (keep above --time-limit).")
@click.option("--adapters-dir", type=click.Path(file_okay=False, exists=True), envvar="MLXQ_ADAPTERS_DIR",
              help="Directory of LoRA adapters (mlx-lm format) that requests may name in 'lora'.")
@backlog_option
@prefix_cache_option
@click.option("--events", is_flag=True, envvar="MLXQ_EVENTS",
              help="Send Celery task events, for monitoring with Flower.")
@click.option("--heartbeat", type=click.FloatRange(min=0.1), default=DEFAULT_HEARTBEAT, show_default=True,
              envvar="MLXQ_HEARTBEAT",
              help="Seconds between this worker's heartbeats (mlxq workers); silent for three, it is gone.")
@click.option("--queue-ahead", type=click.IntRange(min=1), default=DEFAULT_QUEUE_AHEAD, show_default=True,
              envvar="MLXQ_QUEUE_AHEAD",
              help="Messages kept in the model's queue: below half of it, this worker sends its jobs' next ones.")
@pass_settings
def worker(settings: Settings, model, concurrency, model_dirs, loglevel, no_blas_setup, lease, max_attempts, time_limit,
           visibility_timeout, adapters_dir, backlog, prefix_cache_mb, events, heartbeat, queue_ahead):
    """Load MODEL once and generate the requests queued for it.

    Start as many workers, on as many machines, as you like against one Redis;
    `mlxq workers` lists them.
    On Linux the worker re-executes itself with OpenBLAS preloaded when
    Debian's libopenblas0-pthread is installed.

    \b
    Example:
      mlxq worker --model ./my-model --concurrency 16
    """
    from mlxq.worker.process import prepare_worker_process

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare_worker_process(blas_setup=not no_blas_setup)
    from mlxq.worker.service import serve

    logging.getLogger("mlxq").info("connecting to %s", mask_url(settings.redis_url))
    code = serve(
        settings.redis_url, model, concurrency, loglevel=loglevel.upper(),
        visibility_timeout=visibility_timeout, model_dirs=model_dirs or None,
        lease=lease, max_attempts=max_attempts, time_limit=time_limit, events=events, adapters_dir=adapters_dir,
        backlog=backlog, prefix_cache_mb=prefix_cache_mb, heartbeat=heartbeat, queue_ahead=queue_ahead,
    )
    # Everything is stored and every thread of ours has stopped. Leave without
    # the interpreter's teardown: native threads (MLX, OpenBLAS) destroyed
    # during it once aborted the process (SIGABRT) after a clean warm shutdown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
