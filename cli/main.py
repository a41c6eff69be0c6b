"""The ``mlxq`` command group: its commands, shared options, and the one place errors become exit codes."""

from __future__ import annotations

import importlib
import os
import signal
import threading

import click
from click.core import ParameterSource

from mlxq.jobs.defaults import DEFAULT_REDIS_URL
from mlxq.jobs.errors import MlxqError

from .common import Settings

__all__ = ["COMMANDS", "cli", "main"]

#: Every command: its name -> ``module:function`` in this package. A command's
#: module is imported only when the command is looked up (as pip's commands
#: are), and no command module imports this one.
COMMANDS = {
    "run": "run:run",
    "worker": "worker:worker",
    "submit": "submit:submit",
    "status": "inspect:status",
    "results": "results:results",
    "stream": "stream:stream",
    "cancel": "inspect:cancel",
    "retry": "inspect:retry",
    "jobs": "inspect:list_jobs",
    "render": "render:render",
    "models": "models:models",
    "serve": "serve:serve",
    "workers": "workers:workers",
}


class _Group(click.Group):
    """Find the commands in :data:`COMMANDS`; turn mlxq's errors into one line on
    stderr and an exit code, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str):
        if name not in COMMANDS:
            return None
        module, function = COMMANDS[name].split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)

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
    given = ctx.get_parameter_source("redis_url") is not ParameterSource.DEFAULT
    ctx.obj = Settings(redis_url=redis_url, redis_url_given=given)


def main() -> None:
    cli(prog_name="mlxq")
