"""``mlxq models``: the seed-name aliases, and the models already downloaded."""

from __future__ import annotations

import click

from mlxq.jobs.defaults import MODEL_ALIASES

from .common import echo_json

__all__ = ["models"]


def _cached() -> list[dict]:
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:  # pragma: no cover - mlx-lm depends on huggingface_hub
        return []
    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    return sorted(
        ({"repo": r.repo_id, "size_mb": round(r.size_on_disk / 1e6, 1), "path": str(r.repo_path)}
         for r in info.repos if r.repo_type == "model"),
        key=lambda r: r["repo"],
    )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def models(as_json):
    """List the seed model names mlxq knows and the models in the local cache.

    Models download on a worker's first use of them (with progress, into the
    Hugging Face cache: HF_HOME) and load from the cache afterwards.

    \b
    Example:
      mlxq models
    """
    cached = _cached()
    have = {c["repo"] for c in cached}
    if as_json:
        echo_json({"aliases": [{"name": k, "repo": v, "cached": v in have} for k, v in MODEL_ALIASES.items()],
                   "cached": cached})
        return
    click.echo("Aliases:")
    for name, repo in MODEL_ALIASES.items():
        click.echo(f"  {name} -> {repo}" + ("  (cached)" if repo in have else "  (downloads on first use)"))
    click.echo("Cached:" if cached else "Cached: none")
    for c in cached:
        click.echo(f"  {c['repo']}  {c['size_mb']} MB  {c['path']}")
