"""``mlxq results``: a job's results as JSONL, in mlxq's format or OpenAI's."""

from __future__ import annotations

import click

from .common import Settings, pass_settings

__all__ = ["results"]


@click.command()
@click.argument("job")
@click.option("-o", "--output", type=click.File("w", encoding="utf-8"), default="-",
              help="Write to this file instead of standard output.")
@click.option("--format", "fmt", type=click.Choice(["mlxq", "openai"]), default="mlxq", show_default=True,
              help="mlxq's result lines, or OpenAI Batch API output lines.")
@pass_settings
def results(settings: Settings, job, output, fmt):
    """Write JOB's results as JSONL, one line per input line, in input order.

    Each mlxq line has index, custom_id, status, and either a result
    (response, tool_calls, usage, finish_reason) or an error. With
    --format openai, lines are what OpenAI's Batch API writes (id, custom_id,
    response{status_code, body}, error), so existing tooling reads them.

    \b
    Examples:
      mlxq results 3f2a... -o results.jsonl
      mlxq results 3f2a... --format openai > batch_output.jsonl
    """
    settings.client().job(job).write_results(output, fmt)
