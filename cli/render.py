"""``mlxq render``: show the exact prompt each request of a file would be given, without generating."""

from __future__ import annotations

from typing import Any, Optional

import click

from mlxq.jobs.defaults import DEFAULT_MAX_LINE_BYTES, DEFAULT_MODEL
from mlxq.jobs.errors import InputError, ModelNotFound
from mlxq.jobs.ingest import read_requests

from .common import echo_json
from .main import cli


def load_tokenizer(name: str) -> Any:
    """The model's mlx-lm tokenizer wrapper, loaded without the weights."""
    from mlx_lm.utils import load_tokenizer as _load
    from mlxq.worker.model import resolve_model

    source = resolve_model(name)
    try:
        # Downloads only the tokenizer's files for a hub repository.
        return _load(source)
    except Exception as exc:  # hub and filesystem errors come in many types
        raise ModelNotFound(f"model {name}: cannot load its tokenizer from {source} ({type(exc).__name__}: {exc})") from exc


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True))
@click.option("--index", "only", type=click.IntRange(min=0), default=None,
              help="Render only the request with this 0-based index (as in mlxq results).")
@click.option("--model", envvar="MLXQ_MODEL", default=DEFAULT_MODEL, show_default=True,
              help="Model whose tokenizer and chat template to use (env MLXQ_MODEL).")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object per request: {"index", "custom_id", "prompt", "tokens"} or {"index", "custom_id", "error"}.')
@click.option("--max-line-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_LINE_BYTES, show_default=True,
              envvar="MLXQ_MAX_LINE_BYTES", help="Longest accepted line.")
def render(file, only, model, as_json, max_line_bytes):
    """Print the exact prompt text and token count of each request in FILE.

    FILE is read as submit reads it: JSONL (Workers AI or OpenAI batch lines),
    or a .json batch body.

    Nothing is generated and Redis is not used: only the model's tokenizer is
    loaded (not its weights). The chat template, tools and functions are
    applied exactly as a worker applies them, and so is its check that the
    prompt and max_tokens fit the model's context (read from its config.json,
    when local or cached). Invalid lines print their error
    (on stderr, or as an "error" object with --json); a file with no line a
    worker would run exits with status 2.

    \b
    Example:
      mlxq render requests.jsonl --index 0 --model mlx-community/Qwen1.5-0.5B-Chat-4bit
      mlxq render requests.jsonl --json | jq .tokens
    """
    from mlxq.worker.errors import RequestRejected
    from mlxq.worker.model import context_length, resolve_model
    from mlxq.worker.prompts import check_context, render_prompt

    tokenizer = None
    limit = None
    total = valid = shown = 0
    first_error: Optional[str] = None
    seen: dict[str, int] = {}
    with open(file, "rb") as fp:
        for line in read_requests(fp, file, max_line_bytes):
            total += 1
            error = line.error
            if error is None:
                if line.custom_id in seen:  # as submit does: a repeated id fails the later line
                    why = "" if line.explicit_id else " (its line number, as it gives none)"
                    error = (f"line {line.lineno}: field 'custom_id': {line.custom_id!r}{why} repeats the id "
                             f"of request {seen[line.custom_id]}")
                else:
                    seen[line.custom_id] = line.index
                    valid += 1
            if error is not None and first_error is None:
                first_error = error
            if only is not None and line.index != only:
                continue
            shown += 1
            if error is None:
                if tokenizer is None:
                    tokenizer = load_tokenizer(model)
                    limit = context_length(resolve_model(model))
                try:
                    prompt = render_prompt(tokenizer, line.request)
                    tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
                    if limit:  # as a worker checks it
                        check_context(tokens, line.request.max_tokens, limit)
                except RequestRejected as exc:
                    error = f"line {line.lineno}: {exc}"
                    valid -= 1  # a worker would reject it too
                    if first_error is None:
                        first_error = error
            if error is not None:
                if as_json:
                    echo_json({"index": line.index, "custom_id": line.custom_id, "error": error})
                else:
                    click.echo(f"error: {error}", err=True)
                continue
            if as_json:
                echo_json({"index": line.index, "custom_id": line.custom_id, "prompt": prompt, "tokens": tokens})
            else:
                click.echo(f"--- request {line.index} (line {line.lineno}, custom_id {line.custom_id}): "
                           f"{tokens} tokens ---")
                click.echo(prompt)
    if total == 0:
        raise InputError(f"{file}: no requests in the file")
    if valid == 0:
        first = f"; the first: {first_error}" if first_error else ""
        raise InputError(f"{file}: none of its {total} requests is valid{first}")
    if only is not None and shown == 0:
        raise InputError(f"{file}: no request with index {only} (the file has {total})")
