"""Engine errors that stay inside the worker."""

from mlxq.jobs.errors import EngineError

__all__ = ["RequestRejected", "EngineStopped"]


class RequestRejected(EngineError):
    """This request cannot run on this model (too long, unsupported option)."""


class EngineStopped(EngineError):
    """The engine stopped before the request ended."""
