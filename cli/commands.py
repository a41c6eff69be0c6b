"""Import every command module so that each attaches itself to the group."""

from . import inspect, submit, worker  # noqa: F401
