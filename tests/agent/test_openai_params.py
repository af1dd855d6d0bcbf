"""The OpenAI request models and answer shapes: what is honoured, refused or combined."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from agent.api.openai_shapes import chat_logprobs, completion_logprobs, tool_call_deltas
from agent.api.schemas import ChatCompletionRequest, CompletionRequest
from agent.errors import InvalidRequest
from agent.runtime.base import TokenLogprob
from agent.serving.grammars import JSON_OBJECT_GBNF
from agent.serving.tools import ToolCall

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("store", True),
        ("audio", {"voice": "alloy"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("service_tier", "flex"),
        ("metadata", {"a": "b"}),
        ("reasoning_effort", "high"),
    ],
)
def test_a_parameter_that_cannot_be_honoured_is_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=f"'{field}' cannot be honoured"):
        chat(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [("store", False), ("modalities", ["text"]), ("service_tier", "auto"), ("metadata", {})],
)
def test_the_values_that_ask_for_nothing_pass(field: str, value: Any) -> None:
    chat(**{field: value})


def test_unknown_vendor_fields_are_still_ignored() -> None:
    assert chat(some_vendor_knob=3).model == "m"


def test_logit_bias_keys_must_be_token_ids_and_reach_the_sampler() -> None:
    with pytest.raises(ValidationError, match="token ids"):
        chat(logit_bias={"cat": 1})
    with pytest.raises(ValidationError, match="logit_bias"):
        chat(logit_bias={"5": 101})
    assert chat(logit_bias={"5": -100, "7": 2.5}).sampling().logit_bias == ((5, -100), (7, 2.5))


def test_each_constraint_becomes_the_one_grammar() -> None:
    assert chat().constraint() is None
    assert chat(response_format={"type": "text"}).constraint() is None
    assert chat(response_format={"type": "json_object"}).constraint() == JSON_OBJECT_GBNF
    assert chat(grammar='root ::= "a"').constraint() == 'root ::= "a"'
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    assert "root ::=" in (chat(response_format=fmt).constraint() or "")
    forced = chat(tools=[WEATHER], tool_choice="required").constraint()
    assert forced is not None
    assert "tool_calls" in forced
    assert chat(tools=[WEATHER]).constraint() is None  # auto: free to answer in text


def test_two_constraints_or_a_constraint_with_ignore_eos_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="send only one"):
        chat(grammar='root ::= "a"', response_format={"type": "json_object"}).constraint()
    with pytest.raises(InvalidRequest, match="ignore_eos"):
        chat(response_format={"type": "json_object"}, ignore_eos=True).constraint()


def test_tool_choice_must_name_an_offered_tool() -> None:
    named = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(InvalidRequest, match="'nope' is not among the tools"):
        chat(tools=[WEATHER], tool_choice=named).tool_set()
    tools, choice = chat(tools=[WEATHER]).tool_set()
    assert [t.name for t in tools] == ["weather"]
    assert choice.mode == "auto"
    assert chat().tool_set()[1].mode == "none"


def test_history_with_calls_and_results_renders_in_the_agents_shape() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
            ],
        }
    )
    system, call, result = (m.rendered() for m in request.messages)
    assert system == {"role": "system", "content": "be brief"}
    assert json.loads(call["content"]) == {
        "tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}}]
    }
    assert result == {"role": "user", "content": "Tool result (call_1): rain"}


def test_logprob_ranges_and_their_dependencies() -> None:
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        chat(top_logprobs=2)
    with pytest.raises(ValidationError, match="top_logprobs"):
        chat(logprobs=True, top_logprobs=21)
    assert chat().top_logprobs_wanted() is None
    assert chat(logprobs=True).top_logprobs_wanted() == 0
    assert chat(logprobs=True, top_logprobs=4).top_logprobs_wanted() == 4
    with pytest.raises(ValidationError, match="echo with logprobs"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "echo": True, "logprobs": 1})
    with pytest.raises(ValidationError, match="logprobs"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 6})


def test_logprob_shapes_follow_openai() -> None:
    entries = [
        TokenLogprob(1, b"Hi", -0.1, ((b"Hi", -0.1), (b"Yo", -2.5))),
        TokenLogprob(2, b" there", -0.3, ((b" there", -0.3), (b"!", -1.0))),
    ]
    content = chat_logprobs(entries)["content"]
    assert [c["token"] for c in content] == ["Hi", " there"]
    assert content[0]["bytes"] == list(b"Hi")
    assert content[1]["top_logprobs"][1] == {"token": "!", "logprob": -1.0, "bytes": [33]}
    legacy = completion_logprobs(entries, offset=4)
    assert legacy["tokens"] == ["Hi", " there"]
    assert legacy["text_offset"] == [4, 6]
    assert legacy["top_logprobs"][0] == {"Hi": -0.1, "Yo": -2.5}


def test_streamed_tool_calls_carry_their_index_and_whole_arguments() -> None:
    calls = [ToolCall("a", '{"x": 1}', id="call_a"), ToolCall("b", "{}", id="call_b")]
    deltas = tool_call_deltas(calls)
    assert [d["index"] for d in deltas] == [0, 1]
    assert deltas[0] == {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "a", "arguments": '{"x": 1}'},
    }
