"""The request models mirror the seed schema (tests/data/seed-schema.yaml) exactly.

Every bound and default is read from the seed, not restated here: for each
property of each form, the boundary value is accepted, the value just past it
is rejected, and the seed's defaults are the models' defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mlxq.jobs.models import MessagesRequest, PromptRequest

SEED_PATH = Path(__file__).parent / "data" / "seed-schema.yaml"


def _load_seed() -> dict:
    # The file is YAML front matter: a document between two '---' markers, so
    # yaml.safe_load (one document only) refuses it; take its one document.
    docs = [d for d in yaml.safe_load_all(SEED_PATH.read_text(encoding="utf-8")) if d is not None]
    assert len(docs) == 1
    return docs[0]


SEED = _load_seed()
INPUT = json.loads(SEED["json_schema"]["input"])
PROMPT_FORM, MESSAGES_FORM = INPUT["oneOf"]

FORMS = {
    "prompt": (PROMPT_FORM, PromptRequest, {"prompt": "hi"}),
    "messages": (MESSAGES_FORM, MessagesRequest, {"messages": [{"role": "user", "content": "hi"}]}),
}

EPS = 0.001


def _accepts(model, payload: dict) -> bool:
    try:
        model.model_validate(payload)
    except ValidationError:
        return False
    return True


def _bound_cases():
    """(form, property, keyword, boundary value, value just past it)."""
    cases = []
    for form, (schema, _, _) in FORMS.items():
        for name, prop in schema["properties"].items():
            kind = prop.get("type")
            if kind == "integer":
                if "minimum" in prop:
                    cases.append((form, name, "minimum", prop["minimum"], prop["minimum"] - 1))
                if "maximum" in prop:
                    cases.append((form, name, "maximum", prop["maximum"], prop["maximum"] + 1))
            elif kind == "number":
                if "minimum" in prop:
                    cases.append((form, name, "minimum", prop["minimum"], prop["minimum"] - EPS))
                if "maximum" in prop:
                    cases.append((form, name, "maximum", prop["maximum"], prop["maximum"] + EPS))
            elif kind == "string":
                if "minLength" in prop:
                    n = prop["minLength"]
                    cases.append((form, name, "minLength", "x" * n, "x" * (n - 1)))
                if "maxLength" in prop:
                    n = prop["maxLength"]
                    cases.append((form, name, "maxLength", "x" * n, "x" * (n + 1)))
    return cases


BOUND_CASES = _bound_cases()


def _case_id(case) -> str:
    form, name, keyword, _, _ = case
    return f"{form}-{name}-{keyword}"


def test_seed_has_both_forms_with_their_required_field():
    assert PROMPT_FORM["required"] == ["prompt"]
    assert MESSAGES_FORM["required"] == ["messages"]
    # The cases below really come from the seed: every bounded property is covered.
    assert len(BOUND_CASES) >= 2 * 12


@pytest.mark.parametrize("case", BOUND_CASES, ids=_case_id)
def test_boundary_accepted_and_just_past_rejected(case):
    form, name, keyword, at, past = case
    _, model, base = FORMS[form]
    assert _accepts(model, {**base, name: at}), f"{name}={at!r} ({keyword}) must be accepted"
    assert not _accepts(model, {**base, name: past}), f"{name} just past its {keyword} must be rejected"


@pytest.mark.parametrize(
    "case", [c for c in BOUND_CASES if FORMS[c[0]][0]["properties"][c[1]]["type"] == "number"],
    ids=_case_id,
)
def test_number_boundary_accepted_as_int_and_as_float(case):
    # JSON "number": 0 and 0.0 are the same value.
    form, name, _, at, _ = case
    _, model, base = FORMS[form]
    assert _accepts(model, {**base, name: int(at)})
    assert _accepts(model, {**base, name: float(at)})


def test_message_content_max_length_is_the_seeds():
    items = MESSAGES_FORM["properties"]["messages"]["items"]
    limit = items["properties"]["content"]["maxLength"]
    assert limit == 131072

    def payload(n: int) -> dict:
        return {"messages": [{"role": "user", "content": "x" * n}]}

    assert _accepts(MessagesRequest, payload(limit))
    assert not _accepts(MessagesRequest, payload(limit + 1))
    # No minLength in the seed: an empty content is fine.
    assert "minLength" not in items["properties"]["content"]
    assert _accepts(MessagesRequest, payload(0))


def test_message_items_require_what_the_seed_requires():
    items = MESSAGES_FORM["properties"]["messages"]["items"]
    full = {"role": "user", "content": "hi"}
    assert _accepts(MessagesRequest, {"messages": [full]})
    for field in items["required"]:
        item = {k: v for k, v in full.items() if k != field}
        assert not _accepts(MessagesRequest, {"messages": [item]}), f"message without {field}"


@pytest.mark.parametrize("form", FORMS)
def test_required_field_is_required(form):
    schema, model, base = FORMS[form]
    for field in schema["required"]:
        payload = {k: v for k, v in base.items() if k != field}
        assert not _accepts(model, payload)


def _default_cases():
    return [
        (form, name, prop["default"])
        for form, (schema, _, _) in FORMS.items()
        for name, prop in schema["properties"].items()
        if "default" in prop
    ]


@pytest.mark.parametrize("form,name,default", _default_cases(), ids=lambda v: str(v))
def test_seed_defaults_are_model_defaults(form, name, default):
    _, model, base = FORMS[form]
    assert model.model_fields[name].default == default
    assert getattr(model.model_validate(base), name) == default


def test_expected_defaults():
    # The seed's defaults, spelled out, and temperature's from the model page.
    assert {(f, n): d for f, n, d in _default_cases()} == {
        ("prompt", "raw"): False,
        ("prompt", "stream"): False,
        ("prompt", "max_tokens"): 256,
        ("messages", "stream"): False,
        ("messages", "max_tokens"): 256,
    }
    for form, (schema, model, base) in FORMS.items():
        assert "default" not in schema["properties"]["temperature"]
        request = model.model_validate(base)
        assert request.temperature == 0.6
        assert request.max_tokens == 256
        assert request.stream is False
    assert PromptRequest.model_validate({"prompt": "hi"}).raw is False


@pytest.mark.parametrize("form", FORMS)
def test_seed_fields_are_a_subset_of_the_model_fields(form):
    schema, model, _ = FORMS[form]
    seed_fields = set(schema["properties"])
    assert seed_fields <= set(model.model_fields), seed_fields - set(model.model_fields)


def test_prompt_form_has_no_messages_and_vice_versa():
    assert "messages" not in PromptRequest.model_fields
    assert "prompt" not in MessagesRequest.model_fields
    assert "raw" not in MESSAGES_FORM["properties"]


_WRONG_TYPE = {
    "integer": ["5", 5.5, True],
    "number": ["0.5", True],
    "boolean": ["yes", 1, 0],
    "string": [5, True, ["x"]],
    "array": ["x", {"role": "user", "content": "hi"}],
}


def _type_cases():
    cases = []
    for form, (schema, _, _) in FORMS.items():
        for name, prop in schema["properties"].items():
            for value in _WRONG_TYPE[prop["type"]]:
                cases.append((form, name, prop["type"], value))
    return cases


@pytest.mark.parametrize("form,name,kind,value", _type_cases(), ids=lambda v: repr(v))
def test_values_of_the_wrong_json_type_are_rejected(form, name, kind, value):
    _, model, base = FORMS[form]
    assert not _accepts(model, {**base, name: value}), f"{name} ({kind}) accepted {value!r}"


@pytest.mark.parametrize("form", FORMS)
def test_null_means_omitted_only_for_fields_without_a_value_of_their_own(form):
    # mlxq reads null as "not given" for optional sampling fields (the store
    # drops them); fields that are required or carry a default need their type.
    schema, model, base = FORMS[form]
    for name, prop in schema["properties"].items():
        payload = {**base, name: None}
        if name in schema["required"] or "default" in prop or name == "temperature":
            assert not _accepts(model, payload), name
        else:
            assert _accepts(model, payload), name
            assert getattr(model.model_validate(payload), name) is None
