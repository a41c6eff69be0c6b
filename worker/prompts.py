"""Turn a request into the exact prompt text a model is given."""

from __future__ import annotations

from typing import Any

from jobs.models import MessagesRequest, Request

from .errors import RequestRejected

__all__ = ["render_prompt"]


def render_prompt(tokenizer: Any, request: Request) -> str:
    """The prompt for ``request``: the chat template with a generation prompt, or ``raw`` text."""
    if isinstance(request, MessagesRequest):
        messages = [m.model_dump() for m in request.messages]
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        kwargs = {"tools": tools} if tools else {}
    elif request.raw:
        return request.prompt
    else:
        messages, kwargs = [{"role": "user", "content": request.prompt}], {}
    if getattr(tokenizer, "chat_template", None) is None:
        # A base model without a template: plain concatenation.
        return "\n".join(m["content"] for m in messages) + "\n"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as exc:  # jinja raises whatever the template raises
        raise RequestRejected(f"the model's chat template failed: {exc}") from exc
