"""``mlxq serve``: the Workers AI REST API and the OpenAI Batch API over HTTP."""

from __future__ import annotations

import ipaddress
import os

import click

from mlxq.jobs.defaults import DEFAULT_MODEL, DEFAULT_RETENTION
from mlxq.jobs.urls import mask_url

from .common import Settings, pass_settings

__all__ = ["serve"]

_MAX_BODY = 10 * 1024 * 1024  # mlxq.server.DEFAULT_MAX_BODY_BYTES, without importing the server for --help


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="MLXQ_HOST",
              help="Address to listen on; other than loopback only with MLXQ_API_TOKEN set.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, envvar="MLXQ_PORT")
@click.option("--model", envvar="MLXQ_MODEL", default=DEFAULT_MODEL, show_default=True,
              help="Model of OpenAI batches (a Workers AI call names its own in its path).")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=_MAX_BODY, show_default=True,
              envvar="MLXQ_MAX_BODY_BYTES", help="Largest request body, uploads included (larger: 413).")
@click.option("--retention", type=click.IntRange(min=60), default=DEFAULT_RETENTION, show_default=True,
              envvar="MLXQ_RETENTION", help="Seconds jobs, files and batches are kept after they end.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@pass_settings
def serve(settings: Settings, host, port, model, max_body_bytes, retention, log_level):
    """Serve the jobs over HTTP: Workers AI's REST API and OpenAI's Batch API.

    Queues requests for the workers through Redis and serves no model itself.
    With MLXQ_API_TOKEN set, every call needs "Authorization: Bearer TOKEN";
    without it the server listens on loopback only.

    \b
    Example:
      mlxq serve --port 8000 &
      curl http://127.0.0.1:8000/client/v4/accounts/any/ai/run/@cf/qwen/qwen1.5-0.5b-chat \\
        -H 'Content-Type: application/json' -d '{"prompt": "Hello"}'
    """
    import uvicorn

    from mlxq.server import ServerConfig, create_app

    token = os.environ.get("MLXQ_API_TOKEN") or None
    if token is None and not _loopback(host):
        raise click.UsageError(f"--host {host} would serve without authentication: set MLXQ_API_TOKEN "
                               "(every call then needs Authorization: Bearer TOKEN), or listen on 127.0.0.1")
    settings.client()  # Redis answers, or one line that says so
    app = create_app(ServerConfig(redis_url=settings.redis_url, model=model, api_token=token,
                                  max_body_bytes=max_body_bytes, retention=retention))
    where = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    click.echo(f"mlxq: serving {where} (Workers AI: /client/v4/accounts/ID/ai/run/MODEL, OpenAI: /v1) "
               f"over {mask_url(settings.redis_url)}", err=True)
    if token is None:
        click.echo(f"mlxq: no MLXQ_API_TOKEN: listening on {host} only, without authentication", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=log_level.lower() == "debug",
                timeout_graceful_shutdown=5)
