"""Tool calling for models without a tool format of their own: prompt, grammar, parse.

Small local models (Gemma 3 270M among them) have no trained tool-call syntax, and
llama.cpp's built-in chat templates cannot render tools. So the agent describes the
tools in a system message and asks for one reply shape, the same for every model::

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}

With ``tool_choice`` ``required`` or a named function, a grammar holds the model to
exactly that shape, with each function's arguments held to its parameter schema, so
the arguments always parse and validate. With ``auto`` the model may answer in text
or in that shape; :func:`parse_tool_calls` tells which. Earlier calls and their
results go back to the model in the same shape (:func:`render_history`), so a
multi-turn agent loop reads consistently.

Everything here is pure: API layers (OpenAI's and Ollama's) translate their own
request shapes into :class:`Tool` and :class:`ToolChoice` and shape the answer back.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import InvalidRequest
from agent.serving.grammars import check_schema, schema_grammar

__all__ = [
    "NO_PARAMETERS",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "check_choice",
    "could_be_calls",
    "parse_tool_calls",
    "render_call",
    "tool_grammar",
    "tool_prompt",
    "with_system",
]

NO_PARAMETERS: Mapping[str, Any] = {"type": "object", "properties": {}}
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclass(frozen=True)
class Tool:
    """One function the model may call, its parameters checked to be enforceable."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))

    @classmethod
    def of(cls, name: str, description: str | None, parameters: object, *, param: str) -> Tool:
        if not _NAME.match(name):
            raise InvalidRequest(
                f"{param}: function name {name!r} must be 1 to 64 letters, digits, _ or -",
                param=param,
            )
        schema = NO_PARAMETERS if parameters is None else parameters
        check_schema(schema, param=f"{param}.parameters")
        assert isinstance(schema, Mapping)
        kind = schema.get("type", "object")
        if kind != "object":
            raise InvalidRequest(
                f"{param}.parameters: a function's parameters must be an object schema, "
                f"not type {kind!r}",
                param=param,
            )
        return cls(name=name, description=description or "", parameters=schema)


@dataclass(frozen=True)
class ToolChoice:
    """``none``, ``auto``, ``required``, or one named function (``mode`` ``function``)."""

    mode: str = "auto"
    function: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in {"required", "function"}


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for; ``arguments`` is JSON text, as OpenAI sends it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def parsed_arguments(self) -> dict[str, Any]:
        value = json.loads(self.arguments)
        return value if isinstance(value, dict) else {}


def check_choice(tools: Sequence[Tool], choice: ToolChoice, *, param: str) -> None:
    """A choice must name a tool that exists, and needs tools unless it is ``none``."""
    if choice.mode == "function" and choice.function not in {t.name for t in tools}:
        raise InvalidRequest(
            f"{param}: function {choice.function!r} is not among the tools", param=param
        )
    if choice.forced and not tools:
        raise InvalidRequest(f"{param}: {choice.mode!r} needs tools to choose from", param=param)


def tool_prompt(tools: Sequence[Tool], choice: ToolChoice, *, parallel: bool) -> str:
    """The system text that tells the model which tools exist and how to call them."""
    listed = json.dumps(
        [
            {"name": t.name, "description": t.description, "parameters": t.parameters}
            for t in _offered(tools, choice)
        ],
        ensure_ascii=False,
    )
    how = "one or more calls" if _parallel(choice, parallel) else "exactly one call"
    when = (
        "You must call a tool."
        if choice.forced
        else "If a tool helps, call it; otherwise answer in plain text."
    )
    return (
        f"You can call these tools:\n{listed}\n{when} To call tools, reply with only a JSON "
        f'object holding {how}: {{"tool_calls": [{{"name": "<tool name>", "arguments": '
        "{<arguments as the tool's parameters describe>}}]}"
    )


def with_system(messages: Sequence[Mapping[str, str]], text: str) -> list[dict[str, str]]:
    """Chat messages with ``text`` first in the system message (added if there is none)."""
    rest = [dict(m) for m in messages]
    if rest and rest[0]["role"] == "system":
        return [{"role": "system", "content": f"{text}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "system", "content": text}, *rest]


def tool_grammar(tools: Sequence[Tool], choice: ToolChoice, *, parallel: bool) -> str | None:
    """The grammar of a forced call (None unless ``required`` or a named function)."""
    if not choice.forced:
        return None
    call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in _offered(tools, choice)
        ]
    }
    calls: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    if not _parallel(choice, parallel):
        calls["maxItems"] = 1
    return schema_grammar(
        {
            "type": "object",
            "properties": {"tool_calls": calls},
            "required": ["tool_calls"],
            "additionalProperties": False,
        },
        param="tools",
    )


def parse_tool_calls(text: str, tools: Sequence[Tool]) -> list[ToolCall] | None:
    """The calls in a reply, if the whole reply is the tool-call shape; else None (text)."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    if not body.startswith("{"):
        return None
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    raw = value.get("tool_calls") if isinstance(value, dict) else None
    if not isinstance(raw, list) or not raw:
        return None
    names = {t.name for t in tools}
    calls = []
    for item in raw:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", {})
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(name=item["name"], arguments=json.dumps(arguments)))
    return calls


def render_call(calls: Sequence[tuple[str, str]]) -> str:
    """An earlier assistant turn's calls ((name, JSON arguments)), in the shape asked for."""
    rendered = []
    for name, arguments in calls:
        try:
            parsed = json.loads(arguments) if arguments else {}
        except json.JSONDecodeError:
            parsed = arguments
        rendered.append({"name": name, "arguments": parsed})
    return json.dumps({"tool_calls": rendered}, ensure_ascii=False)


def could_be_calls(start: str) -> bool:
    """Whether a reply that begins so may turn out to be calls (stream it held back)."""
    head = start.lstrip()
    return not head or head.startswith(("{", "`"))


def _parallel(choice: ToolChoice, parallel: bool) -> bool:
    """Naming a function asks for that call, once: small models would repeat it to the limit."""
    return parallel and choice.mode != "function"


def _offered(tools: Sequence[Tool], choice: ToolChoice) -> Sequence[Tool]:
    if choice.mode == "function":
        return [t for t in tools if t.name == choice.function]
    return tools
