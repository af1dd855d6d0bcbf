"""JSON schemas to llama.cpp grammars, refusing what the converter would quietly drop.

llama.cpp's schema converter (``llama_cpp.llama_grammar``) enforces types,
properties, ``required``, ``additionalProperties``, arrays with their item counts,
``enum``/``const``, ``anyOf``/``oneOf``, local ``$ref``, string ``pattern``,
lengths and a few formats. Everything else it skips without a word: a schema with
``minimum`` would come back as a grammar for any number, and an answer could parse
yet fail the schema. So :func:`check_schema` walks the schema first and refuses
each construct the grammar cannot enforce, naming it and where it is; an app then
knows at once, instead of finding out from a bad answer in the field.

Recursive schemas (a ``$ref`` that reaches itself) are refused too: a grammar cannot
bound the depth, so a small model can nest until it runs out of tokens, and a
required self-reference can never end at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from agent.errors import InvalidRequest

__all__ = ["JSON_OBJECT_GBNF", "MAX_REPEAT", "check_schema", "schema_grammar"]

JSON_OBJECT_GBNF: str = JSON_GBNF  # any JSON object: its root is ``object``, not any value

MAX_REPEAT = 1024  # largest minLength/maxLength/minItems/maxItems: the grammar unrolls them
MAX_DEPTH = 32  # nesting of subschemas

_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4"})
# Keywords that describe and never constrain: safe to pass over.
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "readOnly",
        "writeOnly",
        "deprecated",
    }
)
_ENFORCED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "pattern",
        "minLength",
        "maxLength",
        "format",
    }
)

_LEADERS = ("$ref", "anyOf", "oneOf", "const", "enum")
_BESIDE_A_LEADER = _ANNOTATIONS | {"type", "$defs", "definitions"}


def schema_grammar(schema: object, *, param: str) -> str:
    """A GBNF grammar whose every sentence is JSON valid against ``schema``.

    ``param`` names the request field, so the 400 says where the problem is.
    """
    check_schema(schema, param=param)
    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except (AssertionError, KeyError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidRequest(
            f"{param}: the schema cannot be made a grammar: {exc}", param=param
        ) from exc


def check_schema(schema: object, *, param: str) -> None:
    """Raise :class:`InvalidRequest` naming the first construct a grammar cannot enforce."""
    if not isinstance(schema, Mapping):
        raise InvalidRequest(
            f"{param} must be a JSON Schema object, not {type(schema).__name__}", param=param
        )
    _Walker(schema, param).visit(schema, param, depth=0, refs=())


class _Walker:
    def __init__(self, root: Mapping[str, Any], param: str) -> None:
        self._root = root
        self._param = param

    def _refuse(self, where: str, why: str) -> InvalidRequest:
        return InvalidRequest(f"{where}: {why}", param=self._param)

    def visit(self, node: object, where: str, *, depth: int, refs: tuple[str, ...]) -> None:
        if isinstance(node, bool):
            if node:
                return  # ``true`` allows anything; ``false`` allows nothing
            raise self._refuse(where, "the schema `false` matches nothing")
        if not isinstance(node, Mapping):
            raise self._refuse(where, f"a subschema must be an object, not {type(node).__name__}")
        if depth > MAX_DEPTH:
            raise self._refuse(where, f"schemas nested deeper than {MAX_DEPTH} are not supported")
        for key in node:
            if key not in _ENFORCED and key not in _ANNOTATIONS:
                raise self._refuse(
                    where, f"'{key}' is not supported: the grammar cannot enforce it"
                )
        self._check_alone(node, where)
        self._check_type(node, where)
        self._check_counts(node, where)
        self._check_strings(node, where)
        if "$ref" in node:
            self._follow(node["$ref"], where, depth=depth, refs=refs)
        if "required" in node and not (
            isinstance(node["required"], list) and all(isinstance(r, str) for r in node["required"])
        ):
            raise self._refuse(where, "'required' must be a list of property names")
        self._children(node, where, depth=depth, refs=refs)

    def _children(
        self, node: Mapping[str, Any], where: str, *, depth: int, refs: tuple[str, ...]
    ) -> None:
        def down(child: object, at: str) -> None:
            self.visit(child, at, depth=depth + 1, refs=refs)

        properties = node.get("properties", {})
        if not isinstance(properties, Mapping):
            raise self._refuse(where, "'properties' must be an object")
        for name, sub in properties.items():
            down(sub, f"{where}.properties.{name}")
        extra = node.get("additionalProperties")
        if isinstance(extra, Mapping):
            down(extra, f"{where}.additionalProperties")
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if key in node:
                options = node[key]
                if not isinstance(options, list) or not options:
                    raise self._refuse(where, f"'{key}' must be a non-empty list of schemas")
                for i, sub in enumerate(options):
                    down(sub, f"{where}.{key}[{i}]")
        if "allOf" in node:
            for i, sub in enumerate(node["allOf"]):
                if not isinstance(sub, Mapping) or not set(sub) <= {
                    "properties",
                    "required",
                    "type",
                    "$ref",
                    *_ANNOTATIONS,
                }:
                    raise self._refuse(
                        f"{where}.allOf[{i}]",
                        "only objects built from properties can be combined with allOf",
                    )
        if "items" in node:
            if "prefixItems" in node:
                raise self._refuse(where, "'items' beside 'prefixItems' is not supported")
            down(node["items"], f"{where}.items")

    def _check_alone(self, node: Mapping[str, Any], where: str) -> None:
        """The converter obeys the first of these it finds and drops the keywords beside it."""
        leader = next((k for k in _LEADERS if k in node), None)
        if leader is None:
            return
        beside = [k for k in node if k != leader and k not in _BESIDE_A_LEADER]
        if beside:
            raise self._refuse(
                where,
                f"'{beside[0]}' beside '{leader}' is not supported: the grammar follows "
                f"'{leader}' alone",
            )

    def _check_type(self, node: Mapping[str, Any], where: str) -> None:
        if "type" not in node:
            return
        kinds = node["type"] if isinstance(node["type"], list) else [node["type"]]
        for kind in kinds:
            if kind not in _TYPES:
                raise self._refuse(where, f"unknown type {kind!r}")

    def _check_counts(self, node: Mapping[str, Any], where: str) -> None:
        for key in ("minLength", "maxLength", "minItems", "maxItems"):
            if key in node:
                value = node[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise self._refuse(where, f"'{key}' must be a non-negative integer")
                if value > MAX_REPEAT:
                    raise self._refuse(
                        where, f"'{key}' above {MAX_REPEAT} is not supported (got {value})"
                    )
        if "prefixItems" in node and ("minItems" in node or "maxItems" in node):
            raise self._refuse(where, "item counts beside 'prefixItems' are not supported")

    def _check_strings(self, node: Mapping[str, Any], where: str) -> None:
        if "pattern" in node:
            if not isinstance(node["pattern"], str):
                raise self._refuse(where, "'pattern' must be a string")
            if "minLength" in node or "maxLength" in node or "format" in node:
                raise self._refuse(
                    where, "'pattern' together with a length or format is not supported"
                )
        if "format" in node and node["format"] not in _FORMATS:
            raise self._refuse(
                where,
                f"format {node['format']!r} is not supported "
                f"(supported: {', '.join(sorted(_FORMATS))})",
            )

    def _follow(self, ref: object, where: str, *, depth: int, refs: tuple[str, ...]) -> None:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self._refuse(where, f"only local references (#/...) are supported, not {ref!r}")
        if ref in refs:
            raise self._refuse(
                where, f"recursive schemas are not supported ({ref} refers to itself)"
            )
        target: object = self._root
        for part in (p for p in ref[1:].split("/") if p):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or part not in target:
                raise self._refuse(where, f"reference {ref} points to nothing")
            target = target[part]
        self.visit(target, f"{where}({ref})", depth=depth + 1, refs=(*refs, ref))
