"""The domain of mlxq: requests and results, JSONL ingest, the Redis job store."""

from .errors import EngineError, InputError, JobNotFound, MlxqError, ModelNotFound, StoreError
from .files import Limits, Source, Stored, Tally, read_file, source_name, store_file
from .ingest import Line, parse_line, read_lines, read_objects
from .models import (
    ErrorInfo, JobStatus, MessagesRequest, Output, PromptRequest, Request, RequestStatus,
    ResultLine, ToolCall, Usage,
)
from .store import JobInfo, JobKeys, JobStore, Start, connect
from .urls import mask_url
from .workers import WorkerInfo, WorkerRegistry

__all__ = [
    "MlxqError", "InputError", "StoreError", "JobNotFound", "EngineError", "ModelNotFound",
    "Line", "parse_line", "read_lines", "read_objects", "Limits", "Source", "Tally", "Stored", "read_file",
    "source_name", "store_file",
    "JobStatus", "RequestStatus", "PromptRequest", "MessagesRequest", "Request",
    "Output", "Usage", "ToolCall", "ErrorInfo", "ResultLine",
    "JobStore", "JobInfo", "JobKeys", "Start", "connect", "mask_url", "WorkerInfo", "WorkerRegistry",
]
