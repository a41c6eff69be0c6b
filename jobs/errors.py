"""One error hierarchy: the CLI turns any of these into one line and an exit code."""

__all__ = [
    "MlxqError",
    "InputError",
    "StoreError",
    "JobNotFound",
    "EngineError",
    "ModelNotFound",
]


class MlxqError(Exception):
    """Base of every error mlxq raises on purpose."""

    exit_code = 1


class InputError(MlxqError):
    """Input that cannot be used at all (an empty file, no valid line, a bad option)."""

    exit_code = 2


class StoreError(MlxqError):
    """Redis could not be reached or answered with an error."""


class JobNotFound(MlxqError):
    """No such job: it never existed or its retention has passed (or no such request in it)."""

    def __init__(self, job_id: str, message: str = ""):
        self.job_id = job_id
        super().__init__(message or f"no job {job_id} (unknown, or expired after its retention)")


class EngineError(MlxqError):
    """Generation failed."""


class ModelNotFound(EngineError):
    """The model is neither a local directory nor reachable in a hub."""
