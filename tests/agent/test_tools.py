"""Tool calling's pure parts: checking tools, the forced-call grammar, reading replies."""

from __future__ import annotations

import json

import pytest

from agent.errors import InvalidRequest
from agent.serving.tools import (
    Tool,
    ToolChoice,
    check_choice,
    could_be_calls,
    parse_tool_calls,
    render_call,
    tool_grammar,
    tool_prompt,
    with_system,
)

WEATHER = Tool.of(
    "get_weather",
    "Weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    param="tools[0].function",
)
TIME = Tool.of("get_time", None, None, param="tools[1].function")


def test_a_tool_without_parameters_takes_an_empty_object() -> None:
    assert TIME.parameters == {"type": "object", "properties": {}}
    assert TIME.description == ""


@pytest.mark.parametrize(
    ("name", "parameters", "named"),
    [
        ("bad name!", None, "function name 'bad name!'"),
        ("f", {"type": "string"}, "must be an object schema"),
        (
            "f",
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}},
            "'minimum'",
        ),
        ("f", ["not", "a", "schema"], "must be a JSON Schema object"),
    ],
)
def test_invalid_tools_are_refused_by_name(name: str, parameters: object, named: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        Tool.of(name, None, parameters, param="tools[0].function")
    assert named in refused.value.message
    assert refused.value.message.startswith("tools[0].function")


def test_a_choice_must_name_a_tool_and_forcing_needs_tools() -> None:
    check_choice([WEATHER], ToolChoice("function", "get_weather"), param="tool_choice")
    with pytest.raises(InvalidRequest, match="'get_time' is not among the tools"):
        check_choice([WEATHER], ToolChoice("function", "get_time"), param="tool_choice")
    with pytest.raises(InvalidRequest, match="needs tools"):
        check_choice([], ToolChoice("required"), param="tool_choice")


def test_only_forced_choices_get_a_grammar_and_a_named_one_offers_only_its_function() -> None:
    assert tool_grammar([WEATHER, TIME], ToolChoice("auto"), parallel=True) is None
    both = tool_grammar([WEATHER, TIME], ToolChoice("required"), parallel=True)
    assert both is not None
    assert "get_weather" in both
    assert "get_time" in both
    one = tool_grammar([WEATHER, TIME], ToolChoice("function", "get_time"), parallel=False)
    assert one is not None
    assert "get_time" in one
    assert "get_weather" not in one
    prompt = tool_prompt([WEATHER, TIME], ToolChoice("function", "get_time"), parallel=False)
    assert "get_time" in prompt
    assert "get_weather" not in prompt
    assert "You must call a tool" in prompt


def test_a_named_function_is_called_once_even_when_parallel_calls_are_allowed() -> None:
    named = ToolChoice("function", "get_time")
    once = tool_grammar([WEATHER, TIME], named, parallel=False)
    assert tool_grammar([WEATHER, TIME], named, parallel=True) == once
    assert tool_grammar([TIME], ToolChoice("required"), parallel=True) != tool_grammar(
        [TIME], ToolChoice("required"), parallel=False
    )
    assert "exactly one call" in tool_prompt([WEATHER, TIME], named, parallel=True)


@pytest.mark.parametrize(
    "reply",
    [
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}',
        '```json\n{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}\n```',
        '  {"tool_calls":[{"name":"get_weather","arguments":{"city":"Oslo"}}]} ',
    ],
)
def test_a_reply_in_the_call_shape_is_read_as_calls(reply: str) -> None:
    calls = parse_tool_calls(reply, [WEATHER, TIME])
    assert calls is not None
    assert [(c.name, c.parsed_arguments()) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert calls[0].id.startswith("call_")


@pytest.mark.parametrize(
    "reply",
    [
        "It is sunny in Oslo.",
        '{"tool_calls": [{"name": "launch_rockets", "arguments": {}}]}',  # not offered
        '{"tool_calls": []}',
        '{"tool_calls": [{"name": "get_weather", "arguments": "Oslo"}]}',
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}',  # cut short
        '{"answer": 42}',
    ],
)
def test_anything_else_is_text(reply: str) -> None:
    assert parse_tool_calls(reply, [WEATHER, TIME]) is None


def test_earlier_calls_render_in_the_shape_the_model_is_asked_for() -> None:
    text = render_call([("get_weather", '{"city": "Oslo"}')])
    assert json.loads(text) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    }
    calls = parse_tool_calls(text, [WEATHER])
    assert calls is not None
    assert calls[0].parsed_arguments() == {"city": "Oslo"}


def test_a_stream_is_held_back_only_while_it_may_still_be_calls() -> None:
    assert could_be_calls("")
    assert could_be_calls("  {")
    assert could_be_calls("```")
    assert not could_be_calls("Sunny")


def test_the_tool_prompt_goes_first_in_the_system_message() -> None:
    user = {"role": "user", "content": "hi"}
    assert with_system([user], "TOOLS") == [{"role": "system", "content": "TOOLS"}, user]
    system = {"role": "system", "content": "be brief"}
    assert with_system([system, user], "TOOLS")[0] == {
        "role": "system",
        "content": "TOOLS\n\nbe brief",
    }
