"""The ``mlxq`` command group: shared options and the one place errors become exit codes."""

from __future__ import annotations

import os
import signal
import sys
import threading

import click

from mlxq.jobs.defaults import DEFAULT_REDIS_URL
from mlxq.jobs.errors import MlxqError

__all__ = ["cli", "main"]


class _Group(click.Group):
    """Turn mlxq's errors into one line on stderr and an exit code; never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MlxqError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # exit 130, not killed by a second Ctrl-C
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # the last net: a bug must still not print a traceback
            if os.environ.get("MLXQ_DEBUG"):
                raise
            click.echo(f"Error: unexpected {type(exc).__name__}: {exc} (set MLXQ_DEBUG=1 for details)", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--redis-url", envvar="MLXQ_REDIS_URL", default=DEFAULT_REDIS_URL, show_default=True,
    help="Redis server holding queues and jobs (env MLXQ_REDIS_URL).",
)
@click.version_option(package_name="mlxq")
@click.pass_context
def cli(ctx: click.Context, redis_url: str) -> None:
    """Batch LLM generation on MLX, queued through Redis to Celery workers.

    \b
    Example:
      mlxq worker &                      # one terminal: a worker
      mlxq submit requests.jsonl --wait  # another: queue a file, wait
      mlxq results JOB -o results.jsonl
    """
    ctx.obj = {"redis_url": redis_url}


def _register() -> None:
    from . import commands  # noqa: F401  (attaches the commands)


_register()


def main() -> None:
    cli(prog_name="mlxq")


if __name__ == "__main__":
    sys.exit(main())
