"""Requests and results: the Workers AI text-generation schema of
``@cf/qwen/qwen1.5-0.5b-chat``, field for field, plus mlxq's ``custom_id``.

The bounds and defaults are the seed schema's (``tests/data/seed-schema.yaml``).
"""

from __future__ import annotations

import enum
import secrets
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .defaults import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE

__all__ = [
    "JobStatus",
    "RequestStatus",
    "Message",
    "PromptRequest",
    "MessagesRequest",
    "Request",
    "Usage",
    "ToolCall",
    "Output",
    "ErrorInfo",
    "ResultLine",
    "random_seed",
    "model_name",
]

MAX_TEXT = 131072
MAX_SEED = 9999999999


def model_name(name: str) -> str:
    """The one spelling of a model's name for queues and comparisons: ``org/repo/`` is ``org/repo``."""
    return name.rstrip("/")


def random_seed() -> int:
    """A seed for a request that gave none, in the schema's range."""
    return 1 + secrets.randbelow(MAX_SEED)


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.CANCELLED)


class RequestStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.CANCELLED)


_strict = ConfigDict(strict=True, extra="forbid", frozen=True)


class Message(BaseModel):
    model_config = _strict

    role: str
    content: Annotated[str, StringConstraints(max_length=MAX_TEXT)]


class ToolParameters(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    type: str = "object"
    required: list[str] = []
    properties: dict[str, dict[str, Any]] = {}


class Tool(BaseModel):
    """The seed's first tool shape: ``{name, description, parameters}``."""

    model_config = _strict

    name: str
    description: str = ""
    parameters: Optional[ToolParameters] = None


class FunctionSpec(BaseModel):
    model_config = _strict

    name: str
    description: str = ""
    parameters: Optional[ToolParameters] = None


class FunctionTool(BaseModel):
    """The seed's second tool shape: ``{type: "function", function: {...}}``."""

    model_config = _strict

    type: str
    function: FunctionSpec


class Function(BaseModel):
    model_config = _strict

    name: str
    code: str


class _Sampling(BaseModel):
    """Fields both request forms share."""

    model_config = _strict

    custom_id: Optional[Annotated[str, StringConstraints(min_length=1, max_length=512)]] = None
    stream: bool = False
    max_tokens: Annotated[int, Field(ge=1)] = DEFAULT_MAX_TOKENS
    temperature: Annotated[float, Field(ge=0, le=5)] = DEFAULT_TEMPERATURE
    top_p: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    top_k: Optional[Annotated[int, Field(ge=1, le=50)]] = None
    seed: Optional[Annotated[int, Field(ge=1, le=MAX_SEED)]] = None
    repetition_penalty: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    frequency_penalty: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    presence_penalty: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    lora: Optional[str] = None


class PromptRequest(_Sampling):
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT)]
    raw: bool = False


class MessagesRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    tools: Optional[list[Union[FunctionTool, Tool]]] = None
    functions: Optional[list[Function]] = None


Request = Union[PromptRequest, MessagesRequest]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    #: Prompt tokens whose keys and values the worker's prefix cache served (not computed again).
    cached_tokens: int = 0


class ToolCall(BaseModel):
    name: str
    arguments: dict[str, Any]


class Output(BaseModel):
    """The seed's output object, with the usage and finish reason batch users expect."""

    response: str
    tool_calls: list[ToolCall] = []
    usage: Usage
    finish_reason: Literal["stop", "length"]


class ErrorInfo(BaseModel):
    code: str
    message: str


class ResultLine(BaseModel):
    """One line of ``mlxq results``."""

    index: int
    custom_id: str
    status: RequestStatus
    result: Optional[Output] = None
    error: Optional[ErrorInfo] = None

    @model_validator(mode="after")
    def _one_of(self) -> "ResultLine":
        if self.status is RequestStatus.COMPLETED and self.result is None:
            raise ValueError("a completed line carries a result")
        return self
