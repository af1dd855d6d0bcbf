"""Schemas to grammars: every construct the grammar cannot enforce is a 400 naming it."""

from __future__ import annotations

from typing import Any

import pytest

from agent.errors import InvalidRequest
from agent.serving.grammars import MAX_REPEAT, check_schema, schema_grammar

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20, "title": "Name"},
        "age": {"type": "integer", "description": "in years"},
        "email": {"anyOf": [{"type": "string", "format": "uuid"}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "home": {"$ref": "#/$defs/Place"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
    "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def test_a_schema_the_grammar_can_enforce_becomes_a_grammar_with_every_property() -> None:
    grammar = schema_grammar(PERSON, param="response_format")
    assert "root ::=" in grammar
    for name in ("name", "age", "email", "tags", "home", "city"):
        assert f'\\"{name}\\"' in grammar, name


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "integer", "minimum": 0}, "'minimum' is not supported"),
        ({"type": "string", "format": "email"}, "format 'email' is not supported"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "'patternProperties'"),
        ({"not": {"type": "string"}}, "'not' is not supported"),
        ({"type": "whatever"}, "unknown type 'whatever'"),
        ({"type": "string", "pattern": "a+", "maxLength": 3}, "'pattern' together with"),
        ({"$ref": "https://example.com/s.json"}, "only local references"),
        ({"$ref": "#/$defs/missing"}, "points to nothing"),
        ({"anyOf": [{"type": "string"}], "properties": {"a": {}}}, "'properties' beside 'anyOf'"),
        ({"type": "array", "items": {}, "prefixItems": [{}]}, "'items' beside 'prefixItems'"),
        ({"type": "string", "maxLength": MAX_REPEAT + 1}, f"above {MAX_REPEAT}"),
        ({"type": "string", "minLength": -1}, "non-negative integer"),
        ({"anyOf": []}, "non-empty list"),
        ({"type": "object", "required": "name"}, "'required' must be a list"),
        (False, "matches nothing"),
    ],
)
def test_what_the_grammar_cannot_enforce_is_refused_by_name(schema: Any, named: str) -> None:
    wrapped = {"type": "object", "properties": {"field": schema}}
    with pytest.raises(InvalidRequest) as refused:
        check_schema(wrapped, param="response_format")
    assert named in refused.value.message
    assert "response_format.properties.field" in refused.value.message
    assert refused.value.param == "response_format"


@pytest.mark.parametrize("schema", [["a"], "object", 3, None])
def test_a_schema_that_is_not_an_object_is_refused(schema: Any) -> None:
    with pytest.raises(InvalidRequest, match="must be a JSON Schema object"):
        schema_grammar(schema, param="format")


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"next": {"$ref": "#"}}},
        {
            "$defs": {
                "A": {"type": "object", "properties": {"b": {"$ref": "#/$defs/B"}}},
                "B": {"type": "array", "items": {"$ref": "#/$defs/A"}},
            },
            "$ref": "#/$defs/A",
        },
    ],
)
def test_recursive_schemas_are_refused(schema: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest, match="recursive schemas are not supported"):
        schema_grammar(schema, param="response_format")


def test_a_shared_definition_used_twice_is_not_mistaken_for_recursion() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/P"}, "b": {"$ref": "#/$defs/P"}},
        "$defs": {"P": {"type": "integer"}},
    }
    assert "root ::=" in schema_grammar(schema, param="response_format")


def test_deep_nesting_is_refused_before_the_converter_recurses() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    with pytest.raises(InvalidRequest, match="nested deeper"):
        schema_grammar(schema, param="response_format")
