"""Reading JSONL input: what a user sees for good and bad lines."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxq.jobs.ingest import Line, parse_line, read_lines, request_from_json
from mlxq.jobs.models import MessagesRequest, PromptRequest

HYPOTHESIS = settings(max_examples=200, deadline=None)


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()


def error_of(raw: bytes, lineno: int = 7) -> str:
    line = parse_line(raw, lineno, 0)
    assert line.request is None, f"expected an error for {raw[:80]!r}"
    assert line.error is not None
    assert line.error.startswith(f"line {lineno}: "), line.error
    return line.error


# -- one bad line of each kind -------------------------------------------------

PROMPT = {"prompt": "hi"}
MESSAGES = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "raw",
    [b"{", b"not json", b'{"prompt": "hi",}', b"{'prompt': 'hi'}", b'{"prompt": "hi"} x'],
    ids=["truncated", "words", "trailing-comma", "single-quotes", "trailing-data"],
)
def test_not_json(raw):
    assert "not valid JSON" in error_of(raw)


@pytest.mark.parametrize(
    "raw,kind",
    [(b'[{"prompt": "hi"}]', "array"), (b'"hi"', "string"), (b"42", "number"), (b"4.5", "number"),
     (b"true", "boolean"), (b"null", "null")],
)
def test_not_an_object(raw, kind):
    message = error_of(raw)
    assert "expected a JSON object" in message
    assert kind in message


@pytest.mark.parametrize(
    "payload,field",
    [
        ({**PROMPT, "max_tokens": "5"}, "max_tokens"),
        ({**PROMPT, "max_tokens": 5.5}, "max_tokens"),
        ({**PROMPT, "stream": "yes"}, "stream"),
        ({**PROMPT, "raw": 1}, "raw"),
        ({**PROMPT, "temperature": "0.5"}, "temperature"),
        ({**PROMPT, "seed": True}, "seed"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": ["hi"]}, "prompt"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": 1, "content": "hi"}]}, "messages.0.role"),
        ({**PROMPT, "custom_id": 12}, "custom_id"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_wrong_type_names_the_field(payload, field):
    message = error_of(dumps(payload))
    assert f"'{field}'" in message


@pytest.mark.parametrize(
    "payload,field",
    [
        ({**PROMPT, "temperature": 5.001}, "temperature"),
        ({**PROMPT, "temperature": -0.001}, "temperature"),
        ({**PROMPT, "top_k": 0}, "top_k"),
        ({**PROMPT, "top_k": 51}, "top_k"),
        ({**PROMPT, "seed": 10000000000}, "seed"),
        ({**PROMPT, "top_p": 2.5}, "top_p"),
        ({**MESSAGES, "presence_penalty": -1}, "presence_penalty"),
        ({**PROMPT, "prompt": "x" * 131073}, "prompt"),
        ({"messages": [{"role": "user", "content": "x" * 131073}]}, "messages.0.content"),
        ({**PROMPT, "max_tokens": 0}, "max_tokens"),
        ({**PROMPT, "custom_id": "c" * 513}, "custom_id"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_out_of_range_names_the_field(payload, field):
    message = error_of(dumps(payload))
    assert f"'{field}'" in message
    # The value is shown, shortened when long.
    assert "got " in message
    assert len(message) < 300


def test_both_prompt_and_messages():
    message = error_of(dumps({**PROMPT, **MESSAGES}))
    assert "'prompt'" in message and "'messages'" in message
    assert "not both" in message


def test_neither_prompt_nor_messages():
    message = error_of(dumps({"temperature": 0.5}))
    assert "'prompt'" in message and "'messages'" in message


def test_image_is_refused():
    message = error_of(dumps({**PROMPT, "image": [1, 2, 3]}))
    assert "'image'" in message
    assert "text-only" in message


def test_invalid_utf8():
    message = error_of(b'{"prompt": "caf\xe9"}')
    assert "UTF-8" in message
    assert "0xe9" in message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_literals_are_not_json(literal):
    message = error_of(b'{"prompt": "hi", "temperature": ' + literal.encode() + b"}")
    assert "not valid JSON" in message
    assert literal.lstrip("-") in message


def test_huge_exponent_is_out_of_range_not_infinite():
    # 1e999 is valid JSON that Python reads as inf: it must fail the range check.
    message = error_of(b'{"prompt": "hi", "top_p": 1e999}')
    assert "'top_p'" in message


def test_unknown_field():
    message = error_of(dumps({**PROMPT, "temprature": 0.5}))
    assert "'temprature'" in message
    assert "unknown field" in message


def test_unknown_field_with_a_capital_letter_is_named():
    message = error_of(dumps({**PROMPT, "Temperature": 0.5}))
    assert "'Temperature'" in message


def test_empty_prompt():
    message = error_of(dumps({"prompt": ""}))
    assert "'prompt'" in message


def test_empty_messages():
    message = error_of(dumps({"messages": []}))
    assert "'messages'" in message


def test_message_without_content():
    message = error_of(dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user"}]}))
    assert "'messages.1.content'" in message
    assert "required" in message


def test_message_with_unknown_field():
    message = error_of(dumps({"messages": [{"role": "user", "content": "a", "name": "x"}]}))
    assert "'messages.0.name'" in message


def test_many_errors_are_summarised():
    bad = {"prompt": 1, "stream": 1, "raw": 1, "top_k": 0, "seed": 0}
    message = error_of(dumps(bad))
    assert "(and 2 more)" in message


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100000,
        b"{" * 100000,
        b'{"a":' * 100000,
        b'{"prompt": "hi", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    ],
    ids=["arrays", "braces", "objects", "deep-extra-field", "deep-messages"],
)
def test_deep_nesting_does_not_crash(raw):
    message = error_of(raw)
    assert message


def test_moderate_nesting_in_an_unknown_field_is_reported():
    raw = b'{"prompt": "hi", "x": ' + b"[" * 500 + b"]" * 500 + b"}"
    assert "'x'" in error_of(raw)


def test_error_keeps_a_valid_explicit_custom_id():
    line = parse_line(dumps({"custom_id": "mine", "prompt": ""}), 4, 2)
    assert line.error is not None
    assert line.custom_id == "mine"
    assert line.explicit_id is True
    assert (line.index, line.lineno) == (2, 4)


def test_valid_line():
    line = parse_line(dumps({"custom_id": "a", "prompt": "hi", "top_k": 3}), 1, 0)
    assert line.error is None
    assert isinstance(line.request, PromptRequest)
    assert line.request.top_k == 3
    assert line.custom_id == "a"
    assert line.explicit_id is True


def test_messages_line():
    line = parse_line(dumps(MESSAGES), 1, 0)
    assert isinstance(line.request, MessagesRequest)
    assert line.request.messages[0].content == "hi"
    assert line.explicit_id is False


# -- reading a file ------------------------------------------------------------


def test_blank_lines_are_skipped_and_take_no_index():
    data = b'{"prompt": "a"}\n\n   \n\r\n{"prompt": "b"}\r\n\n{"custom_id": "z", "prompt": "c"}'
    lines = list(read_lines(io.BytesIO(data)))
    assert [(l.index, l.lineno) for l in lines] == [(0, 1), (1, 5), (2, 7)]
    assert [l.request.prompt for l in lines] == ["a", "b", "c"]
    assert all(l.error is None for l in lines)


def test_custom_id_defaults_to_the_line_number():
    data = b'{"prompt": "a"}\n\n{"prompt": "b"}\n{"custom_id": "x", "prompt": "c"}\nnope\n'
    lines = list(read_lines(io.BytesIO(data)))
    assert [l.custom_id for l in lines] == ["1", "3", "x", "5"]
    assert [l.explicit_id for l in lines] == [False, False, True, False]
    assert lines[3].error.startswith("line 5: ")


def test_empty_and_blank_files_yield_nothing():
    assert list(read_lines(io.BytesIO(b""))) == []
    assert list(read_lines(io.BytesIO(b"\n\n  \n"))) == []


def test_bad_lines_fail_alone():
    data = b'{"prompt": "a"}\n[1]\n{"prompt": "b", "stream": "yes"}\n{"prompt": "c"}\n'
    lines = list(read_lines(io.BytesIO(data)))
    assert [l.error is None for l in lines] == [True, False, False, True]
    assert lines[1].error.startswith("line 2: ")
    assert lines[2].error.startswith("line 3: ") and "'stream'" in lines[2].error
    assert lines[3].request.prompt == "c"


def test_too_long_line_fails_alone_and_the_next_parses():
    limit = 100
    long_line = dumps({"prompt": "x" * 500})
    data = dumps({"prompt": "first"}) + b"\n" + long_line + b"\n" + dumps({"prompt": "after"}) + b"\n"
    lines = list(read_lines(io.BytesIO(data), max_line_bytes=limit))
    assert len(lines) == 3
    assert lines[0].request.prompt == "first"
    assert lines[1].request is None
    assert lines[1].error.startswith("line 2: ")
    assert str(limit) in lines[1].error
    assert (lines[1].index, lines[1].custom_id) == (1, "2")
    assert lines[2].error is None
    assert lines[2].request.prompt == "after"
    assert (lines[2].index, lines[2].lineno) == (2, 3)


def test_too_long_line_much_longer_than_the_read_chunk():
    limit = 1000
    data = b'{"prompt": "' + b"y" * 300_000 + b'"}\n' + dumps({"prompt": "ok"})
    lines = list(read_lines(io.BytesIO(data), max_line_bytes=limit))
    assert [l.lineno for l in lines] == [1, 2]
    assert "1000" in lines[0].error
    assert lines[1].request.prompt == "ok"


def test_too_long_last_line_without_newline():
    data = dumps({"prompt": "ok"}) + b"\n" + b'{"prompt": "' + b"z" * 5000 + b'"}'
    lines = list(read_lines(io.BytesIO(data), max_line_bytes=200))
    assert lines[0].request.prompt == "ok"
    assert lines[1].error.startswith("line 2: ") and "200" in lines[1].error
    assert len(lines) == 2


def test_line_of_exactly_the_limit_is_accepted():
    line = dumps({"prompt": "x" * 50})
    ok = list(read_lines(io.BytesIO(line + b"\n" + line), max_line_bytes=len(line)))
    assert [l.error for l in ok] == [None, None]
    short = list(read_lines(io.BytesIO(line + b"\n"), max_line_bytes=len(line) - 1))
    assert short[0].error is not None and str(len(line) - 1) in short[0].error


# -- properties ------------------------------------------------------------------


@HYPOTHESIS
@given(raw=st.binary(max_size=300), lineno=st.integers(1, 10**6), index=st.integers(0, 10**6))
def test_arbitrary_bytes_never_raise(raw, lineno, index):
    line = parse_line(raw, lineno, index)
    assert isinstance(line, Line)
    assert (line.index, line.lineno) == (index, lineno)
    assert (line.request is None) != (line.error is None)
    if line.error is not None:
        assert line.error.startswith(f"line {lineno}:")


finite = dict(allow_nan=False, allow_infinity=False)
text = st.text(max_size=40)


def _optional(**fields):
    return st.fixed_dictionaries({}, optional=fields)


sampling = _optional(
    custom_id=st.text(min_size=1, max_size=512),
    stream=st.booleans(),
    max_tokens=st.integers(1, 10**6),
    temperature=st.floats(0, 5, **finite) | st.integers(0, 5),
    top_p=st.floats(0, 2, **finite),
    top_k=st.integers(1, 50),
    seed=st.integers(1, 9999999999),
    repetition_penalty=st.floats(0, 2, **finite),
    frequency_penalty=st.floats(0, 2, **finite) | st.integers(0, 2),
    presence_penalty=st.floats(0, 2, **finite),
    lora=text,
)

parameters = _optional(
    type=st.just("object"),
    required=st.lists(text, max_size=3),
    properties=st.dictionaries(text, st.fixed_dictionaries({"type": st.sampled_from(["string", "number"])}),
                               max_size=3),
)
tool = st.fixed_dictionaries({"name": text}, optional={"description": text, "parameters": parameters})
function_tool = st.fixed_dictionaries(
    {"type": st.just("function"),
     "function": st.fixed_dictionaries({"name": text}, optional={"description": text, "parameters": parameters})}
)

prompt_requests = st.tuples(
    sampling, st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=200)}, optional={"raw": st.booleans()})
).map(lambda t: {**t[0], **t[1]})

messages_requests = st.tuples(
    sampling,
    st.fixed_dictionaries(
        {"messages": st.lists(st.fixed_dictionaries({"role": text, "content": st.text(max_size=200)}),
                              min_size=1, max_size=4)},
        optional={
            "tools": st.lists(tool | function_tool, max_size=3),
            "functions": st.lists(st.fixed_dictionaries({"name": text, "code": text}), max_size=2),
        },
    ),
).map(lambda t: {**t[0], **t[1]})


@HYPOTHESIS
@given(payload=prompt_requests | messages_requests, lineno=st.integers(1, 1000))
def test_valid_requests_validate_and_round_trip(payload, lineno):
    line = parse_line(json.dumps(payload, ensure_ascii=False).encode(), lineno, 0)
    assert line.error is None, line.error
    expected_type = PromptRequest if "prompt" in payload else MessagesRequest
    assert isinstance(line.request, expected_type)
    assert line.custom_id == payload.get("custom_id", str(lineno))
    assert line.explicit_id == ("custom_id" in payload)
    for key, value in payload.items():
        if key not in ("messages", "tools", "functions"):
            assert getattr(line.request, key) == value, key
    stored = json.dumps(line.request.model_dump(mode="json"))
    again = request_from_json(stored)
    assert again == line.request
    assert type(again) is type(line.request)
    # The store's form: None fields dropped.
    compact = json.dumps(line.request.model_dump(mode="json", exclude_none=True)).encode()
    assert request_from_json(compact) == line.request


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(**finite) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)

request_like = st.fixed_dictionaries(
    {},
    optional={
        "prompt": json_values,
        "messages": json_values | st.lists(st.dictionaries(st.sampled_from(["role", "content", "x"]), json_values)),
        "custom_id": json_values,
        "temperature": json_values,
        "max_tokens": json_values,
        "tools": json_values,
        "image": json_values,
    },
)


@HYPOTHESIS
@given(value=json_values | request_like, lineno=st.integers(1, 1000))
def test_arbitrary_json_values_never_raise(value, lineno):
    line = parse_line(json.dumps(value).encode(), lineno, 3)
    assert isinstance(line, Line)
    assert (line.request is None) != (line.error is None)
    if line.error is not None:
        assert line.error.startswith(f"line {lineno}:")
    else:
        assert isinstance(value, dict)
        assert ("prompt" in value) != ("messages" in value)
