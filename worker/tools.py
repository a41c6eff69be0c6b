"""Tool calling: tools into the prompt, tool calls out of the generated text.

Into the prompt (:func:`mlxq.worker.prompts.render_prompt` uses these): a request's
``tools`` (either seed shape) and ``functions`` are normalised to OpenAI-style
``{"type": "function", "function": {"name", "description", "parameters"}}``
entries (:func:`request_tools`). A chat template that supports tools gets them
as its ``tools`` variable; for any other model a system message built from
:data:`TOOLS_SYSTEM_PROMPT` lists them and asks for ``<tool_call>`` blocks
(:func:`add_tools_system_message`).

Out of the text (:func:`parse_tool_calls`): closed tool-call blocks that parse
become :class:`~mlxq.jobs.models.ToolCall` objects and are cut from the response.
The model's own mlx-lm parser is tried first when its tokenizer wrapper has one,
then the Qwen/Hermes ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``
JSON form. Anything that does not parse stays in the text as it was.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Iterator, Optional

from mlxq.jobs.models import Function, FunctionTool, MessagesRequest, Request, Tool, ToolCall

__all__ = [
    "TOOLS_SYSTEM_PROMPT",
    "TOOL_ENTRY",
    "FUNCTION_ENTRY",
    "TOOL_CALL_START",
    "TOOL_CALL_END",
    "has_tools",
    "normalize_tool",
    "function_tool",
    "request_tools",
    "template_supports_tools",
    "tools_system_prompt",
    "add_tools_system_message",
    "parse_tool_calls",
    "extract_tool_calls",
    "stream_markers",
    "streamable",
    "stream_tail",
]

log = logging.getLogger(__name__)

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

#: The system message that describes the tools to a model whose chat template
#: does not support tools. ``{tools}`` is replaced by one entry per tool
#: (:data:`TOOL_ENTRY`) and per function (:data:`FUNCTION_ENTRY`), separated
#: by blank lines. When the request starts with a system message, this text is
#: appended to it after a blank line; otherwise it becomes the first message.
TOOLS_SYSTEM_PROMPT = (
    "# Tools\n"
    "\n"
    "You may call one or more of the following tools to answer the user.\n"
    "\n"
    "{tools}\n"
    "\n"
    "To call a tool, answer with one block per call, each exactly in this form:\n"
    '<tool_call>{{"name": "<tool name>", "arguments": {{<the arguments as a JSON object>}}}}</tool_call>\n'
    "If no tool is needed, answer the user directly."
)

#: One tool in :data:`TOOLS_SYSTEM_PROMPT`; ``parameters`` is its JSON schema as JSON.
TOOL_ENTRY = "## {name}\nDescription: {description}\nParameters (JSON schema): {parameters}"

#: One entry of ``functions`` in :data:`TOOLS_SYSTEM_PROMPT`.
FUNCTION_ENTRY = "## {name}\nCode:\n{code}"

_EMPTY_PARAMETERS = {"type": "object", "properties": {}, "required": []}


# -- into the prompt ---------------------------------------------------------


def has_tools(request: Request) -> bool:
    """Whether ``request`` carries any tools or functions."""
    return bool(getattr(request, "tools", None) or getattr(request, "functions", None))


def _parameters(params: Any) -> dict[str, Any]:
    if params is None:
        return dict(_EMPTY_PARAMETERS)
    data = params.model_dump() if hasattr(params, "model_dump") else dict(params)
    # The usual order of a JSON schema: type, properties, required, then the rest.
    ordered = {k: data[k] for k in ("type", "properties", "required") if k in data}
    ordered.update((k, v) for k, v in data.items() if k not in ordered)
    return ordered


def normalize_tool(tool: Tool | FunctionTool) -> dict[str, Any]:
    """Either seed tool shape as ``{"type": "function", "function": {name, description, parameters}}``."""
    spec = tool.function if isinstance(tool, FunctionTool) else tool
    return {
        "type": "function",
        "function": {
            "name": spec.name,
            "description": spec.description,
            "parameters": _parameters(spec.parameters),
        },
    }


def function_tool(function: Function) -> dict[str, Any]:
    """A ``functions`` entry (name and code) as an OpenAI-style tool: the code is its description."""
    return {
        "type": "function",
        "function": {"name": function.name, "description": function.code, "parameters": dict(_EMPTY_PARAMETERS)},
    }


def request_tools(request: Request) -> Optional[list[dict[str, Any]]]:
    """Every tool and function of ``request``, normalised; None when it has none."""
    if not has_tools(request):
        return None
    tools = [normalize_tool(t) for t in request.tools or ()]
    tools += [function_tool(f) for f in request.functions or ()]
    return tools


_TOOLS_VARIABLE = re.compile(r"\btools\b")


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders a ``tools`` variable."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        return bool(_TOOLS_VARIABLE.search(template))
    if isinstance(template, dict):  # named templates: transformers picks "tool_use" when given tools
        return any(isinstance(t, str) and _TOOLS_VARIABLE.search(t) for t in template.values())
    if isinstance(template, list):  # [{"name": ..., "template": ...}] as stored in some configs
        return any(isinstance(t, dict) and _TOOLS_VARIABLE.search(str(t.get("template", ""))) for t in template)
    return False


def tools_system_prompt(request: MessagesRequest) -> str:
    """The fallback system message text for ``request``'s tools and functions."""
    entries = [
        TOOL_ENTRY.format(
            name=t["function"]["name"],
            description=t["function"]["description"] or "(none)",
            parameters=json.dumps(t["function"]["parameters"], ensure_ascii=False),
        )
        for t in (normalize_tool(tool) for tool in request.tools or ())
    ]
    entries += [FUNCTION_ENTRY.format(name=f.name, code=f.code) for f in request.functions or ()]
    return TOOLS_SYSTEM_PROMPT.format(tools="\n\n".join(entries))


def add_tools_system_message(messages: list[dict[str, Any]], request: MessagesRequest) -> list[dict[str, Any]]:
    """``messages`` with the fallback tool description merged into the first system message, or prepended."""
    text = tools_system_prompt(request)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{text}" if first["content"] else text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# -- out of the text -----------------------------------------------------------

Parser = Callable[[str, Any], Any]


def _parse_json_call(text: str, tools: Any = None) -> Any:
    return json.loads(text.strip())


def _arguments(value: Any) -> Optional[dict[str, Any]]:
    if value is None:
        return {}
    if isinstance(value, str):  # some models give the arguments as a JSON string
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            return None
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return value
    return None


def _calls(parsed: Any) -> Optional[list[ToolCall]]:
    """Parsed tool-call data (one call or a list of them) as ToolCalls; None if any is malformed."""
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return None
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            return None
        arguments = _arguments(item["arguments"] if "arguments" in item else item.get("parameters"))
        if arguments is None:
            return None
        calls.append(ToolCall(name=name.strip(), arguments=arguments))
    return calls


def _blocks(text: str, start: str, end: str) -> Iterator[tuple[int, int, str]]:
    """(begin, stop, inner) of each closed ``start ... end`` block of ``text``, in order.

    An empty ``end`` (mistral's ``[TOOL_CALLS]``) runs to the end of the text.
    A start without an end, or followed by another start before its end, is
    not a block: it stays text.
    """
    pos = 0
    while start:
        begin = text.find(start, pos)
        if begin < 0:
            return
        body = begin + len(start)
        if not end:
            yield begin, len(text), text[body:]
            return
        stop = text.find(end, body)
        if stop < 0:
            return
        again = text.find(start, body)
        if 0 <= again < stop:
            pos = again
            continue
        yield begin, stop + len(end), text[body:stop]
        pos = stop + len(end)


def _model_parser(tokenizer: Any) -> Optional[tuple[str, str, Parser]]:
    """The tool-call markers and parser mlx-lm found for the model, if any."""
    if tokenizer is None or not getattr(tokenizer, "has_tool_calling", False):
        return None
    parse = getattr(tokenizer, "tool_parser", None)
    start = getattr(tokenizer, "tool_call_start", None)
    if parse is None or not start:
        return None
    return start, getattr(tokenizer, "tool_call_end", None) or "", parse


def parse_tool_calls(text: str, tokenizer: Any = None, tools: Any = None) -> tuple[str, list[ToolCall]]:
    """Split generated ``text`` into the response and the tool calls it makes.

    Each closed block that parses is removed and gives its calls; when any was
    removed, the remaining text is stripped of surrounding whitespace. Blocks
    that do not parse (bad JSON, no name, arguments that are not an object) and
    unclosed tags stay in the text unchanged. ``tokenizer`` is the model's
    mlx-lm tokenizer wrapper: its ``tool_parser`` is tried first, then the
    ``<tool_call>`` JSON form. ``tools`` (OpenAI-style) help some of mlx-lm's
    parsers type the arguments.
    """
    parsers = [p for p in (_model_parser(tokenizer),) if p is not None]
    parsers.append((TOOL_CALL_START, TOOL_CALL_END, _parse_json_call))
    found: list[tuple[int, int, list[ToolCall]]] = []
    for start, end, parse in parsers:
        for begin, stop, inner in _blocks(text, start, end):
            if any(begin < s and b < stop for b, s, _ in found):
                continue  # already taken by an earlier parser
            try:
                calls = _calls(parse(inner, tools))
            except Exception:  # noqa: BLE001 - parsers raise anything on bad text
                calls = None
            if calls is not None:
                found.append((begin, stop, calls))
    if not found:
        return text, []
    found.sort(key=lambda f: f[0])
    pieces, calls, pos = [], [], 0
    for begin, stop, block_calls in found:
        pieces.append(text[pos:begin])
        calls.extend(block_calls)
        pos = stop
    pieces.append(text[pos:])
    return "".join(pieces).strip(), calls


def extract_tool_calls(request: Request, text: str, tokenizer: Any = None) -> tuple[str, list[ToolCall]]:
    """The response and tool calls of ``request``'s generated ``text``.

    A request without tools or functions keeps its text exactly. Never raises:
    a parser bug leaves the text as it was.
    """
    if not has_tools(request):
        return text, []
    try:
        return parse_tool_calls(text, tokenizer, tools=request_tools(request))
    except Exception:  # noqa: BLE001 - a parsing bug must not fail the request
        log.exception("parsing tool calls failed; the response is kept as generated")
        return text, []


# -- streaming --------------------------------------------------------------
#
# A streamed request with tools must not show its tool calls as text: the
# deltas stop where a tool-call block may begin, and the done event carries
# the rest of the final response (tool calls cut out) and the calls.


def stream_markers(request: Request, tokenizer: Any = None) -> tuple[str, ...]:
    """Where a streamed ``request``'s deltas must stop: its tool-call start markers.

    Empty for a request without tools or functions (its text streams whole).
    """
    if not has_tools(request):
        return ()
    model = _model_parser(tokenizer)
    return tuple(dict.fromkeys(m for m in ((model[0] if model else None), TOOL_CALL_START) if m))


def first_marker(text: str, markers: tuple[str, ...]) -> int:
    """Where the first of ``markers`` starts in ``text``; ``len(text)`` if none does."""
    found = [at for at in (text.find(m) for m in markers) if at >= 0]
    return min(found, default=len(text))


def streamable(text: str, markers: tuple[str, ...]) -> int:
    """How much of ``text`` (a prefix, in characters) may be streamed now.

    With no ``markers``, all of it. Otherwise the text before the first marker,
    less a tail that could still become a marker and less trailing whitespace
    (the final response is stripped when a tool call is cut from it).
    """
    if not markers:
        return len(text)
    end = first_marker(text, markers)
    if end == len(text):
        for marker in markers:  # a marker may be arriving: hold its possible start
            for n in range(min(len(marker) - 1, end), 0, -1):
                if text.endswith(marker[:n]):
                    end = min(end, len(text) - n)
                    break
    return len(text[:end].rstrip())


def stream_tail(streamed: str, response: str) -> str:
    """What the done event adds after ``streamed`` deltas for a final ``response``.

    ``streamed`` is always a prefix of the generated text before any tool-call
    block, so it is a prefix of ``response`` up to the whitespace a cut tool
    call strips from the response's start.
    """
    if response.startswith(streamed):
        return response[len(streamed):]
    lead = streamed.lstrip()
    if response.startswith(lead):
        return response[len(lead):]
    log.warning("streamed text is not a prefix of the response; the done event repeats none of it")
    return ""
