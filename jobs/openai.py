"""OpenAI Batch API lines in, OpenAI batch output lines out.

Input: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
(or ``/v1/completions``). The body's fields map onto the seed's parameters;
a field that has no counterpart is an error naming it, never silently dropped.

Output: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``
with a ``chat.completion`` (or ``text_completion``) body, as OpenAI writes it.
"""

from __future__ import annotations

import json
from typing import Any

from .models import RequestStatus, ResultLine

__all__ = ["is_openai_line", "from_openai", "to_openai"]

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"

# Body fields with a Workers AI counterpart (same name unless mapped).
_SAME = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "stream", "tools")
# Body fields that change nothing about generation, accepted and ignored.
_IGNORED = ("model", "user", "metadata", "store", "parallel_tool_calls", "service_tier", "stream_options")


class Unmappable(ValueError):
    """An OpenAI field or value with no Workers AI counterpart."""


def is_openai_line(obj: dict) -> bool:
    return "body" in obj and ("url" in obj or "method" in obj)


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise Unmappable(f"field '{where}.{i}': only text parts can be mapped (got {kind}); "
                                 "this model is text-only")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise Unmappable(f"field '{where}': expected a string or a list of text parts")


def from_openai(obj: dict) -> dict:
    """A Workers AI request (a dict, not yet validated) for an OpenAI batch line."""
    method, url, body = obj.get("method", "POST"), obj.get("url", CHAT), obj["body"]
    if method != "POST":
        raise Unmappable(f"field 'method': only POST can be mapped (got {method!r})")
    if url not in (CHAT, COMPLETIONS):
        raise Unmappable(f"field 'url': only {CHAT} and {COMPLETIONS} can be mapped (got {url!r})")
    if not isinstance(body, dict):
        raise Unmappable("field 'body': expected a JSON object")
    out: dict[str, Any] = {}
    if "custom_id" in obj:
        out["custom_id"] = obj["custom_id"]
    for key, value in body.items():
        if key in _IGNORED:
            continue
        if key in _SAME:
            out[key] = value
        elif key in ("max_tokens", "max_completion_tokens"):
            out["max_tokens"] = value
        elif key == "n":
            if value not in (1, None):
                raise Unmappable("field 'body.n': only one completion per request can be mapped")
        elif key == "tool_choice":
            if value not in ("auto", None):
                raise Unmappable(f"field 'body.tool_choice': only 'auto' can be mapped (got {value!r})")
        elif key == "messages" and url == CHAT:
            if not isinstance(value, list):
                raise Unmappable("field 'body.messages': expected an array")
            out["messages"] = [
                {"role": m.get("role") if isinstance(m, dict) else None,
                 "content": _text(m.get("content") if isinstance(m, dict) else m, f"body.messages.{i}.content")}
                for i, m in enumerate(value)
            ]
        elif key == "prompt" and url == COMPLETIONS:
            if not isinstance(value, str):
                raise Unmappable("field 'body.prompt': only a single string prompt can be mapped")
            out["prompt"], out["raw"] = value, True
        else:
            raise Unmappable(f"field 'body.{key}': has no Workers AI counterpart and cannot be mapped")
    return out


def to_openai(line: ResultLine, model: str, created: int, job_id: str) -> dict:
    """One OpenAI batch output line for ``line``."""
    request_id = f"{job_id}-{line.index}"
    out: dict[str, Any] = {"id": f"batch_req_{request_id}", "custom_id": line.custom_id,
                           "response": None, "error": None}
    if line.status is not RequestStatus.COMPLETED or line.result is None:
        error = line.error
        out["error"] = {"code": error.code if error else line.status.value,
                        "message": error.message if error else f"the request is {line.status.value}"}
        return out
    r = line.result
    message: dict[str, Any] = {"role": "assistant", "content": r.response}
    finish = r.finish_reason
    if r.tool_calls:
        message["tool_calls"] = [
            {"id": f"call_{request_id}_{i}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for i, c in enumerate(r.tool_calls)
        ]
        finish = "tool_calls"
    body = {
        "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
                  "total_tokens": r.usage.total_tokens,
                  "prompt_tokens_details": {"cached_tokens": r.usage.cached_tokens}},
    }
    out["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    return out
