"""The ``mlxq`` command: run, worker, submit, status, results, stream, cancel, retry, jobs, render, models, serve, workers.

Each command is a module of this package (``inspect`` holds status, cancel,
retry and jobs); :mod:`mlxq.cli.main` names them and imports one only when
it runs.
"""

from .main import cli, main

__all__ = ["cli", "main"]
