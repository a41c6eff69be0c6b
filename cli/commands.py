"""Import every command module so that each attaches itself to the group."""

from . import inspect, models, render, results, run, stream, submit, worker  # noqa: F401
