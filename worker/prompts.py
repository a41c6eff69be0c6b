"""Turn a request into the exact prompt text a model is given."""

from __future__ import annotations

from typing import Any

from mlxq.jobs.models import MessagesRequest, Request

from .errors import RequestRejected
from .tools import add_tools_system_message, has_tools, request_tools, template_supports_tools

__all__ = ["render_prompt", "check_context"]


def render_prompt(tokenizer: Any, request: Request) -> str:
    """The prompt for ``request``: the chat template with a generation prompt, or ``raw`` text.

    Tools and functions go to a chat template that supports tools as its
    ``tools`` variable (OpenAI-style); otherwise they are described in a system
    message (:data:`mlxq.worker.tools.TOOLS_SYSTEM_PROMPT`).
    """
    kwargs: dict[str, Any] = {}
    if isinstance(request, MessagesRequest):
        messages = [m.model_dump() for m in request.messages]
        if has_tools(request):
            if template_supports_tools(tokenizer):
                kwargs["tools"] = request_tools(request)
            else:
                messages = add_tools_system_message(messages, request)
    elif request.raw:
        return request.prompt
    else:
        messages = [{"role": "user", "content": request.prompt}]
    if getattr(tokenizer, "chat_template", None) is None:
        # A base model without a template: plain concatenation.
        return "\n".join(m["content"] for m in messages) + "\n"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as exc:  # jinja raises whatever the template raises
        raise RequestRejected(f"the model's chat template failed: {exc}") from exc


def check_context(prompt_tokens: int, max_tokens: int, limit: int) -> None:
    """Raise :class:`RequestRejected` unless the prompt and ``max_tokens`` fit the model's context."""
    if prompt_tokens + max_tokens > limit:
        raise RequestRejected(
            f"the prompt is {prompt_tokens} tokens; with max_tokens {max_tokens} it exceeds "
            f"the model's context of {limit} tokens"
        )
