"""Tool calling: tools rendered into prompts, tool calls parsed out of text, ``mlxq render``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from helpers import write_jsonl
from mlxq.cli import cli
from mlxq.jobs.ingest import parse_line
from mlxq.jobs.models import MessagesRequest, PromptRequest, ToolCall
from mlxq.worker.engine import Generation
from mlxq.worker.prompts import render_prompt
from mlxq.worker.runner import stopped_tail
from mlxq.worker.tools import (
    TOOL_CALL_START,
    TOOLS_SYSTEM_PROMPT,
    extract_tool_calls,
    parse_tool_calls,
    request_tools,
    stream_markers,
    stream_tail,
    streamable,
    template_supports_tools,
    tools_system_prompt,
)

# The fixed head of the fallback system message (everything before the tool list).
FALLBACK_HEAD = TOOLS_SYSTEM_PROMPT.split("{tools}")[0]

WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SEARCH = {"type": "function", "function": {"name": "web_search", "description": "Search the web",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
ADD = {"name": "add", "code": "def add(a, b):\n    return a + b"}


def call(name: str, **arguments) -> ToolCall:
    return ToolCall(name=name, arguments=arguments)


def block(obj) -> str:
    return f"<tool_call>{obj if isinstance(obj, str) else json.dumps(obj)}</tool_call>"


def messages_request(**fields) -> MessagesRequest:
    fields.setdefault("messages", [{"role": "user", "content": "What is the weather in Paris?"}])
    return MessagesRequest.model_validate(fields)


# -- parsing -------------------------------------------------------------------


def test_single_call():
    text = block({"name": "get_weather", "arguments": {"city": "Paris"}})
    assert parse_tool_calls(text) == ("", [call("get_weather", city="Paris")])


def test_qwen_hermes_layout_with_newlines():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    response, calls = parse_tool_calls(text)
    assert response == ""
    assert calls == [call("get_weather", city="Paris", days=3)]
    assert isinstance(calls[0].arguments, dict)


def test_several_calls_keep_their_order():
    text = "\n".join([
        block({"name": "get_weather", "arguments": {"city": "Paris"}}),
        block({"name": "web_search", "arguments": {"q": "mlx"}}),
        block({"name": "get_weather", "arguments": {"city": "Oslo"}}),
    ])
    response, calls = parse_tool_calls(text)
    assert response == ""
    assert calls == [call("get_weather", city="Paris"), call("web_search", q="mlx"), call("get_weather", city="Oslo")]


def test_a_list_of_calls_in_one_block():
    text = block([{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}])
    assert parse_tool_calls(text) == ("", [call("a"), call("b", x=1)])


def test_arguments_given_as_a_json_string():
    text = block({"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "C"})})
    assert parse_tool_calls(text) == ("", [call("get_weather", city="Paris", unit="C")])


def test_missing_or_null_arguments_are_an_empty_object():
    text = block({"name": "now"}) + block({"name": "today", "arguments": None})
    assert parse_tool_calls(text) == ("", [call("now"), call("today")])


@pytest.mark.parametrize("text", [
    "The weather in Paris is sunny.",
    "  leading and trailing whitespace stays  \n",
    "",
    "a tag mentioned in prose: <tool_call> is how I call tools",
])
def test_no_call_leaves_the_text_exactly(text):
    assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("bad", [
    block('{"name": "get_weather", "arguments": {"city": "Paris"}'),  # bad JSON: unbalanced
    block("{'name': 'get_weather'}"),  # not JSON: single quotes
    block({"arguments": {"city": "Paris"}}),  # missing name
    block({"name": "", "arguments": {}}),  # empty name
    block({"name": 42, "arguments": {}}),  # name not a string
    block({"name": "f", "arguments": [1, 2]}),  # arguments not an object
    block({"name": "f", "arguments": "not json"}),  # arguments a string that is not JSON
    block({"name": "f", "arguments": "[1]"}),  # arguments a JSON string that is not an object
    block('"just a string"'),
    block("[]"),
    block(""),
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',  # unclosed
    'I will call it. <tool_call>{"name": "get_weather", "arguments": {"city": "Pa',  # cut short by max_tokens
    '{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',  # no opening tag
])
def test_malformed_calls_stay_in_the_response_unchanged(bad):
    text = f"Checking.\n{bad}\n"
    assert parse_tool_calls(text) == (text, [])


def test_a_malformed_block_does_not_hide_a_good_one():
    bad = block('{"name": "broken", "arguments": {')
    good = block({"name": "get_weather", "arguments": {"city": "Paris"}})
    response, calls = parse_tool_calls(f"{bad}\n{good}")
    assert calls == [call("get_weather", city="Paris")]
    assert response == bad


def test_an_unclosed_tag_before_a_good_call_stays():
    text = '<tool_call>{"name": "x"\n' + block({"name": "y", "arguments": {"k": "v"}})
    response, calls = parse_tool_calls(text)
    assert calls == [call("y", k="v")]
    assert response == '<tool_call>{"name": "x"'


def test_text_around_calls_is_kept_and_only_the_ends_are_stripped():
    text = ("  Let me look that up.\n"
            + block({"name": "get_weather", "arguments": {"city": "Paris"}})
            + "\nThen I will search.\n"
            + block({"name": "web_search", "arguments": {"q": "Paris"}})
            + "\n")
    response, calls = parse_tool_calls(text)
    assert calls == [call("get_weather", city="Paris"), call("web_search", q="Paris")]
    assert response == "Let me look that up.\n\nThen I will search."


def test_the_models_own_mlx_lm_parser_is_used_first():
    from mlx_lm.tool_parsers import pythonic

    tok = SimpleNamespace(has_tool_calling=True, tool_parser=pythonic.parse_tool_call,
                          tool_call_start=pythonic.tool_call_start, tool_call_end=pythonic.tool_call_end)
    text = ('Sure. <|tool_call_start|>[get_weather(city="Paris", days=2)]<|tool_call_end|> and '
            + block({"name": "web_search", "arguments": {"q": "x"}}))
    response, calls = parse_tool_calls(text, tok)
    assert calls == [call("get_weather", city="Paris", days=2), call("web_search", q="x")]
    assert response == "Sure.  and"
    # Without the model's parser, its format is just text.
    assert parse_tool_calls(text)[1] == [call("web_search", q="x")]
    # The model's parser failing leaves its text alone.
    broken = "<|tool_call_start|>[not a call<|tool_call_end|>"
    assert parse_tool_calls(broken, tok) == (broken, [])


def test_a_tokenizer_without_tool_calling_falls_back_to_json(tiny_tokenizer):
    assert not tiny_tokenizer.has_tool_calling
    text = block({"name": "f", "arguments": {"a": 1}})
    assert parse_tool_calls(text, tiny_tokenizer) == ("", [call("f", a=1)])


def test_only_requests_with_tools_are_parsed():
    text = "Here: " + block({"name": "get_weather", "arguments": {"city": "Paris"}})
    assert extract_tool_calls(PromptRequest(prompt="hi"), text) == (text, [])
    assert extract_tool_calls(messages_request(), text) == (text, [])
    assert extract_tool_calls(messages_request(tools=[]), text) == (text, [])
    assert extract_tool_calls(messages_request(tools=[WEATHER]), text) == ("Here:", [call("get_weather", city="Paris")])
    assert extract_tool_calls(messages_request(functions=[ADD]), block({"name": "add", "arguments": {"a": 1}}))[1] == [
        call("add", a=1)]


# -- rendering -----------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model)


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:"
    "{% for tool in tools %}{{ '\\n- ' }}{{ tool.type }} {{ tool.function.name }}: {{ tool.function.description }} "
    "{{ tool.function.parameters | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% if message.tool_calls %}{% for tool_call in message.tool_calls %}"
    "<tool_call>{\"name\": \"{{ tool_call.name }}\"}</tool_call>{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tools_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a chat template that renders ``tools``."""
    path = tmp_path_factory.mktemp("models") / "tiny-tools"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOLS_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def tools_tokenizer(tools_model):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tools_model)


def test_tool_shapes_are_normalised_to_openai_style():
    tools = request_tools(messages_request(tools=[WEATHER, SEARCH], functions=[ADD]))
    assert tools[0] == {"type": "function", "function": WEATHER}
    assert tools[1] == {"type": "function", "function": {**SEARCH["function"],
                                                         "parameters": {**SEARCH["function"]["parameters"],
                                                                        "required": []}}}
    assert tools[2]["type"] == "function" and tools[2]["function"]["name"] == "add"
    assert ADD["code"] in tools[2]["function"]["description"]
    bare = request_tools(messages_request(tools=[{"name": "now"}]))[0]
    assert bare == {"type": "function", "function": {"name": "now", "description": "",
                                                     "parameters": {"type": "object", "properties": {},
                                                                    "required": []}}}
    assert request_tools(messages_request()) is None


def test_fallback_system_message_lists_every_tool(tiny_tokenizer):
    assert not template_supports_tools(tiny_tokenizer)
    request = messages_request(tools=[WEATHER, SEARCH], functions=[ADD])
    prompt = render_prompt(tiny_tokenizer, request)
    assert prompt.startswith("<|im_start|>system\n" + FALLBACK_HEAD)
    assert prompt.count("<|im_start|>system") == 1
    for name in ("get_weather", "web_search", "add"):
        assert f"## {name}\n" in prompt
    assert "Current weather of a city" in prompt and "Search the web" in prompt
    assert json.dumps(WEATHER["parameters"]) in prompt
    assert ADD["code"] in prompt
    assert '<tool_call>{"name": ' in prompt
    assert prompt.endswith("<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_fallback_extends_an_existing_system_message(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = render_prompt(tiny_tokenizer, messages_request(messages=messages, tools=[SEARCH]))
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n" + FALLBACK_HEAD)
    assert prompt.count("<|im_start|>system") == 1
    assert "## web_search\n" in prompt
    assert "<|im_start|>user\nHi<|im_end|>" in prompt


def test_requests_without_tools_render_as_before(tiny_tokenizer):
    plain = render_prompt(tiny_tokenizer, messages_request())
    assert plain == render_prompt(tiny_tokenizer, messages_request(tools=[]))
    assert "# Tools" not in plain and "You are a helpful assistant." in plain


def test_a_template_with_tools_gets_them(tools_tokenizer):
    assert template_supports_tools(tools_tokenizer)
    prompt = render_prompt(tools_tokenizer, messages_request(tools=[WEATHER, SEARCH], functions=[ADD]))
    assert prompt.startswith("<|im_start|>system\nTools:\n- function get_weather: Current weather of a city ")
    assert "\n- function web_search: Search the web " in prompt
    assert "\n- function add: def add(a, b):" in prompt
    assert FALLBACK_HEAD not in prompt
    # Both seed shapes reach the template identically.
    shape1 = render_prompt(tools_tokenizer, messages_request(tools=[WEATHER]))
    shape2 = render_prompt(tools_tokenizer, messages_request(tools=[{"type": "function", "function": WEATHER}]))
    assert shape1 == shape2
    assert json.dumps(WEATHER["parameters"]) in shape1


def test_a_template_with_tool_call_markers_gets_mlx_lm_parser(tools_tokenizer):
    # mlx-lm infers its json_tools parser from the template's <tool_call> and tool_call.name.
    assert tools_tokenizer.has_tool_calling and tools_tokenizer.tool_parser is not None
    text = "ok " + block({"name": "get_weather", "arguments": {"city": "Paris"}})
    assert parse_tool_calls(text, tools_tokenizer) == ("ok", [call("get_weather", city="Paris")])
    text = block({"name": "get_weather", "arguments": json.dumps({"city": "Paris"})})
    assert parse_tool_calls(text, tools_tokenizer) == ("", [call("get_weather", city="Paris")])
    assert parse_tool_calls(block("{bad"), tools_tokenizer) == (block("{bad"), [])


# -- mlxq render ---------------------------------------------------------------

NO_REDIS = "redis://127.0.0.1:1/0"  # render must not need Redis


def render_cli(*args: str):
    return CliRunner().invoke(cli, ["--redis-url", NO_REDIS, "render", *args], catch_exceptions=False)


RENDER_ROWS = [
    {"prompt": "Tell me about Redis.", "custom_id": "a"},
    {"prompt": "too hot", "temperature": 9},
    "not json",
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
     "tools": [WEATHER], "functions": [ADD]},
    {"prompt": "raw text", "raw": True},
    {"prompt": "dup", "custom_id": "a"},
]


def test_render_json(tmp_path, tiny_model, tiny_tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", RENDER_ROWS)
    out = render_cli(str(path), "--model", str(tiny_model), "--json")
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["custom_id"] for r in rows] == ["a", "2", "3", "4", "5", "a"]
    good = [rows[i] for i in (0, 3, 4)]
    for row in good:
        assert set(row) == {"index", "custom_id", "prompt", "tokens"}
        assert row["tokens"] == len(tiny_tokenizer.encode(row["prompt"])) > 0
    for i in (0, 3, 4):
        request = parse_line(json.dumps(RENDER_ROWS[i]).encode(), i + 1, i).request
        assert rows[i]["prompt"] == render_prompt(tiny_tokenizer, request)
    assert rows[4]["prompt"] == "raw text"
    assert FALLBACK_HEAD in rows[3]["prompt"] and "## get_weather" in rows[3]["prompt"]
    for i, words in ((1, ("line 2", "temperature")), (2, ("line 3", "JSON")), (5, ("line 6", "custom_id", "repeats"))):
        assert set(rows[i]) == {"index", "custom_id", "error"}
        assert all(w in rows[i]["error"] for w in words), rows[i]


def test_render_human_and_index(tmp_path, tiny_model, tiny_tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", RENDER_ROWS)
    out = render_cli(str(path), "--model", str(tiny_model))
    assert out.exit_code == 0, out.output
    headers = re.findall(r"^--- request (\d+) \(line (\d+), custom_id (\S+)\): (\d+) tokens ---$", out.stdout, re.M)
    assert [h[:3] for h in headers] == [("0", "1", "a"), ("3", "4", "4"), ("4", "5", "5")]
    assert "error: line 2: field 'temperature'" in out.stderr
    assert "error: line 3: not valid JSON" in out.stderr
    assert "error: line 6: field 'custom_id'" in out.stderr

    out = render_cli(str(path), "--model", str(tiny_model), "--index", "3")
    assert out.exit_code == 0, out.output
    header, prompt = out.stdout.split("\n", 1)
    request = parse_line(json.dumps(RENDER_ROWS[3]).encode(), 4, 3).request
    expected = render_prompt(tiny_tokenizer, request)
    assert header == f"--- request 3 (line 4, custom_id 4): {len(tiny_tokenizer.encode(expected))} tokens ---"
    assert prompt == expected + "\n"
    assert out.stderr == ""

    out = render_cli(str(path), "--model", str(tiny_model), "--index", "1", "--json")
    assert out.exit_code == 0 and "temperature" in json.loads(out.stdout)["error"]
    out = render_cli(str(path), "--model", str(tiny_model), "--index", "99")
    assert out.exit_code == 2 and "no request with index 99" in out.stderr


def test_render_refuses_a_file_without_a_valid_line(tmp_path, tiny_model):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}, "[1]"])
    out = render_cli(str(path), "--model", str(tiny_model))
    assert out.exit_code == 2
    assert "none of its 2 requests is valid" in out.stderr and "line 1" in out.stderr
    assert "Traceback" not in out.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert render_cli(str(empty), "--model", str(tiny_model)).exit_code == 2


def test_render_rejects_what_a_worker_would_reject_for_its_context(tmp_path, tiny_model):
    model = tmp_path / "short-context"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi", "max_tokens": 8},
                                               {"prompt": "hi", "max_tokens": 60}])
    out = render_cli(str(path), "--model", str(model), "--json")
    assert out.exit_code == 0, out.output
    fits, too_long = (json.loads(line) for line in out.stdout.splitlines())
    assert fits["tokens"] + 8 <= 64 and "error" not in fits
    assert too_long["error"].startswith("line 2: the prompt is ")
    # A file whose every line is too long for the context has nothing a worker would run.
    only_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "hi", "max_tokens": 60}])
    out = render_cli(str(only_long), "--model", str(model))
    assert out.exit_code == 2 and "none of its 1 requests is valid; the first: line 1: the prompt is" in out.stderr
    assert too_long["error"].endswith("it exceeds the model's context of 64 tokens")


def test_render_help_has_an_example():
    out = CliRunner().invoke(cli, ["render", "--help"])
    assert out.exit_code == 0 and "Example:" in out.stdout and "mlxq render" in out.stdout


def test_render_with_an_unknown_model_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    out = render_cli(str(path), "--model", str(tmp_path / "nowhere"))
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert len(out.stderr.strip().splitlines()) == 1


# -- the whole path ------------------------------------------------------------


def test_requests_with_tools_run_through_the_worker(tmp_path, redis_client, redis_url, tiny_model, worker):
    from test_pipeline import SEED_OUTPUT, results_of, submit_and_wait

    rows = [
        {"custom_id": "t1", "messages": [{"role": "user", "content": "Weather in Paris?"}],
         "tools": [WEATHER, SEARCH], "functions": [ADD], "max_tokens": 8, "temperature": 0},
        {"custom_id": "t2", "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Search mlx"}],
         "tools": [SEARCH], "max_tokens": 6, "seed": 3},
        {"custom_id": "plain", "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 4},
    ]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    final = submit_and_wait(redis_url, tiny_model, path)
    assert final["counts"]["completed"] == 3, final
    lines = results_of(redis_url, final["job_id"])

    rendered = render_cli(str(path), "--model", str(tiny_model), "--json")
    tokens = [json.loads(line)["tokens"] for line in rendered.stdout.splitlines()]
    for line, prompt_tokens in zip(lines, tokens):
        assert line["status"] == "completed" and line["error"] is None
        result = line["result"]
        assert set(SEED_OUTPUT["oneOf"][0]["properties"]) <= set(result)
        assert isinstance(result["response"], str)
        assert isinstance(result["tool_calls"], list)
        for tc in result["tool_calls"]:
            assert set(tc) == {"name", "arguments"} and isinstance(tc["arguments"], dict)
        # The worker was given exactly the prompt mlxq render shows.
        assert result["usage"]["prompt_tokens"] == prompt_tokens
    # The tools made the prompt longer than the same request without them.
    assert tokens[0] > tokens[2]

    request = parse_line(json.dumps(rows[0]).encode(), 1, 0).request
    assert worker.engine.render(request) == json.loads(rendered.stdout.splitlines()[0])["prompt"]


def test_readme_documents_the_fallback_text():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    text = tools_system_prompt(messages_request(tools=[WEATHER], functions=[ADD]))
    assert "### Tool calling" in readme
    assert f"```text\n{text}\n```" in readme


def test_render_reads_files_as_submit_does(tmp_path, tiny_model):
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"requests": [{"prompt": "hi"}, {"prompt": "x", "top_k": 99}]}))
    out = render_cli(str(batch), "--model", str(tiny_model), "--json")
    assert out.exit_code == 0, out.output
    first, second = (json.loads(line) for line in out.stdout.splitlines())
    assert first["index"] == 0 and "hi" in first["prompt"] and first["tokens"] > 0
    assert second["index"] == 1 and "top_k" in second["error"]


# -- streaming ---------------------------------------------------------------

_PIECES = st.sampled_from([
    "Sure", ". ", " ", "\n", "<", "<tool", "_call>", "</tool_call>", "<tool_call>", block({"name": "f", "arguments": {"x": 1}}),
    block({"name": "g"}), block("{bad"), "tool", "call", "{", "}", "é", "日本",
])


def _stream(chunks: list[str], markers) -> tuple[list[str], str]:
    """The deltas an engine sends as ``chunks`` arrive one step at a time, and the full text."""
    text, sent, deltas = "", 0, []
    for chunk in chunks:
        text += chunk
        end = streamable(text, markers)
        assert end >= sent  # what was sent is never taken back
        if end > sent:
            deltas.append(text[sent:end])
            sent = end
    return deltas, text


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=14))
def test_streamed_text_never_shows_a_tool_call_and_adds_up_to_the_response(chunks):
    markers = stream_markers(messages_request(tools=[WEATHER]))
    assert markers == (TOOL_CALL_START,)
    deltas, text = _stream(chunks, markers)
    streamed = "".join(deltas)
    assert TOOL_CALL_START not in streamed and text.startswith(streamed)
    response, _ = parse_tool_calls(text)
    tail = stream_tail(streamed, response)
    # Byte for byte, but for whitespace before a cut tool call that the response strips.
    assert streamed + tail == response or (streamed.lstrip() + tail == response and streamed[:1].isspace())


def test_text_of_requests_without_tools_streams_whole():
    assert stream_markers(messages_request()) == ()
    assert streamable("a <tool_call> b <tool", ()) == len("a <tool_call> b <tool")


def test_streaming_holds_what_may_become_a_marker():
    markers = (TOOL_CALL_START,)
    assert streamable("Sure <tool_ca", markers) == len("Sure")
    assert streamable("Sure <b>", markers) == len("Sure <b>")
    assert streamable("Sure.\n<tool_call>{", markers) == len("Sure.")


def test_a_stopped_request_ends_without_the_tool_call_its_deltas_held_back():
    markers = (TOOL_CALL_START,)
    text = 'Let me look.\n<tool_call>{"name": "get_weather", "argu'
    held = Generation(text, 5, 20, "cancelled", 1, tail=text[len("Let me look."):])
    assert stopped_tail(held, markers) == "\n"
    # Text past what streamed but before any marker still ends the stream.
    cut = Generation("Hello there", 5, 2, "timeout", 1, tail=" there")
    assert stopped_tail(cut, markers) == " there"
    assert stopped_tail(held, ()) == held.tail  # without tools, the whole rest
