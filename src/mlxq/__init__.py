"""mlxq: batch LLM generation on MLX, queued through Redis to Celery workers.

The public names: :class:`Client` and :class:`Job` (mlxq from Python), the
request and result models, and the errors. The
subpackages are the rooms of the house: :mod:`mlxq.jobs` (the domain),
:mod:`mlxq.worker` (execution) and :mod:`mlxq.cli` (the ``mlxq`` command).
Importing this package imports neither MLX nor Celery.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .client import Client, Job
from .jobs.errors import EngineError, InputError, JobNotFound, MlxqError, ModelNotFound, StoreError
from .jobs.events import Event
from .jobs.files import Limits
from .jobs.models import (
    ErrorInfo, JobStatus, Message, MessagesRequest, Output, PromptRequest, Request, RequestStatus, ResultLine,
    ToolCall, Usage,
)

try:
    __version__ = _version("mlxq")
except PackageNotFoundError:  # pragma: no cover - imported from a tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "Client", "Job", "Limits", "Event",
    "MlxqError", "InputError", "StoreError", "JobNotFound", "EngineError", "ModelNotFound",
    "JobStatus", "RequestStatus", "Message", "PromptRequest", "MessagesRequest", "Request",
    "Output", "Usage", "ToolCall", "ErrorInfo", "ResultLine",
]
