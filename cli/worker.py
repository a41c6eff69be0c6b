"""``mlxq worker``: serve a model to the queue."""

from __future__ import annotations

import logging
import sys

import click

from jobs.defaults import DEFAULT_CONCURRENCY, DEFAULT_MODEL
from jobs.urls import mask_url

from .main import cli


@cli.command()
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
@click.pass_context
def worker(ctx, model, concurrency, model_dirs, loglevel, no_blas_setup):
    """Load MODEL once and generate the requests queued for it.

    Start as many workers, on as many machines, as you like against one Redis.
    On Linux the worker re-executes itself with OpenBLAS preloaded when
    Debian's libopenblas0-pthread is installed.

    \b
    Example:
      mlxq worker --model ./my-model --concurrency 16
    """
    from worker.blas import ensure_fast_blas

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_fast_blas(disable=no_blas_setup)
    from worker.service import serve

    logging.getLogger("mlxq").info("connecting to %s", mask_url(ctx.obj["redis_url"]))
    sys.exit(serve(ctx.obj["redis_url"], model, concurrency, model_dirs or None, loglevel.upper()))
