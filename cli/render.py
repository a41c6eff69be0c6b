"""``mlxq render``: show the exact prompt each request of a file would be given, without generating."""

from __future__ import annotations

from typing import Any

import click

from mlxq.jobs.defaults import DEFAULT_MAX_LINE_BYTES, DEFAULT_MODEL
from mlxq.jobs.errors import InputError, ModelNotFound
from mlxq.jobs.files import Limits, Tally, read_file
from mlxq.jobs.ingest import repeated_id

from .common import echo_json

__all__ = ["render", "load_tokenizer"]


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


@click.command()
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
    shown = 0
    tally = Tally(file)
    seen: dict[str, int] = {}  # custom_id -> index, as the store keeps them for submit
    for line in read_file(file, Limits(max_line_bytes=max_line_bytes)):
        error = line.error
        if error is None and line.custom_id in seen:
            error = repeated_id(line, seen[line.custom_id])
        elif error is None:
            seen[line.custom_id] = line.index
        wanted = only is None or line.index == only
        prompt, tokens = None, 0
        if error is None and (wanted or tally.valid == 0):
            if tokenizer is None:
                tokenizer = load_tokenizer(model)
                limit = context_length(resolve_model(model))
            try:
                prompt = render_prompt(tokenizer, line.request)
                tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
                if limit:  # as a worker checks it: a worker would reject it too
                    check_context(tokens, line.request.max_tokens, limit)
            except RequestRejected as exc:
                error = f"line {line.lineno}: {exc}"
        tally.add(error)
        if not wanted:
            continue
        shown += 1
        if error is not None:
            if as_json:
                echo_json({"index": line.index, "custom_id": line.custom_id, "error": error})
            else:
                click.echo(f"error: {error}", err=True)
        elif as_json:
            echo_json({"index": line.index, "custom_id": line.custom_id, "prompt": prompt, "tokens": tokens})
        else:
            click.echo(f"--- request {line.index} (line {line.lineno}, custom_id {line.custom_id}): "
                       f"{tokens} tokens ---")
            click.echo(prompt)
    tally.check()
    if only is not None and shown == 0:
        raise InputError(f"{file}: no request with index {only} (the file has {tally.total})")
