"""What local apps expect of the API, through the unmodified openai client and LangChain.

Structured output, tools, logprobs, several choices and the refusal of what the agent
cannot honour, all on the real Gemma 3 270M. It is a small base model: what these
tests check is what the agent guarantees (every constrained answer parses and
validates, shapes are OpenAI's), not how clever the answers are.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.conftest import AgentProcess

pytestmark = pytest.mark.integration

LLM = "gemma3-270m"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time now", "parameters": None},
}


class Person(BaseModel):
    name: str
    age: int
    likes_tea: bool


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- structured output ------------------------------------------------------------------


def test_the_parse_helper_gets_a_pydantic_object_that_validates(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(
        model=LLM,
        messages=ask("Describe a person as JSON."),
        response_format=Person,
        max_tokens=80,
        temperature=0,
    )
    message = reply.choices[0].message
    assert isinstance(message.parsed, Person), message.content
    assert reply.choices[0].finish_reason == "stop"


def test_every_sequence_in_a_batch_follows_its_own_schema(client: openai.OpenAI) -> None:
    schemas: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {"colour": {"enum": ["red", "green", "blue"]}},
            "required": ["colour"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"count": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["count", "ok"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 12},
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            "required": ["tags"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"when": {"type": "string", "format": "date"}},
            "required": ["when"],
            "additionalProperties": False,
        },
    ]

    def answer(i: int) -> tuple[dict[str, Any], str]:
        reply = client.chat.completions.create(
            model=LLM,
            messages=ask(f"Answer in JSON, example {i}."),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": f"s{i}", "schema": schemas[i % 4], "strict": True},
            },
            max_tokens=96,
            temperature=0.8,
            seed=i,
        )
        return schemas[i % 4], reply.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:  # more than the slots: the batch mixes grammars
        answers = list(pool.map(answer, range(8)))
    for schema, text in answers:
        jsonschema.validate(json.loads(text), schema)


def test_json_object_mode_answers_an_object_that_parses(client: openai.OpenAI) -> None:
    for prompt in ("List three fruits.", "Who are you?"):
        reply = client.chat.completions.create(
            model=LLM,
            messages=ask(prompt),
            response_format={"type": "json_object"},
            max_tokens=64,
            temperature=0,
        )
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content or ""), dict)
        else:  # cut by max_tokens: still on the way to an object
            assert (choice.message.content or "").lstrip().startswith("{")


def test_a_raw_gbnf_grammar_is_obeyed_on_both_endpoints(client: openai.OpenAI) -> None:
    grammar = 'root ::= ("yes" | "no") "."'
    chat = client.chat.completions.create(
        model=LLM, messages=ask("Is water wet?"), max_tokens=8, extra_body={"grammar": grammar}
    )
    assert chat.choices[0].message.content in {"yes.", "no."}
    text = client.completions.create(
        model=LLM, prompt="Is fire cold?", max_tokens=8, extra_body={"grammar": grammar}
    )
    assert text.choices[0].text in {"yes.", "no."}


@pytest.mark.parametrize(
    ("response_format", "named"),
    [
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "n",
                    "schema": {
                        "type": "object",
                        "properties": {"n": {"type": "integer", "minimum": 0}},
                    },
                },
            },
            "'minimum' is not supported",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "r",
                    "schema": {"type": "object", "properties": {"child": {"$ref": "#"}}},
                },
            },
            "recursive schemas are not supported",
        ),
        ({"type": "json_schema"}, "needs a json_schema object"),
        ({"type": "yaml"}, "response_format"),
    ],
)
def test_a_schema_the_grammar_cannot_enforce_is_a_400_naming_it(
    client: openai.OpenAI, response_format: dict[str, Any], named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=LLM,
            messages=ask("hi"),
            response_format=response_format,
            max_tokens=4,  # type: ignore[arg-type]
        )
    assert named in refused.value.message


def test_a_grammar_that_does_not_parse_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(
            model=LLM, prompt="x", max_tokens=4, extra_body={"grammar": 'root ::= "a" ('}
        )
    assert "grammar does not parse" in refused.value.message


# -- tools -------------------------------------------------------------------------------


def test_a_required_tool_call_has_arguments_that_validate(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=LLM,
        messages=ask("What is the weather in Oslo?"),
        tools=[WEATHER_TOOL, TIME_TOOL],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=96,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert calls, choice.message
    for call in calls:
        assert call.type == "function"
        assert call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
        else:
            assert (call.function.name, arguments) == ("get_time", {})


def test_a_named_tool_is_the_one_called_and_none_means_text(client: openai.OpenAI) -> None:
    named = client.chat.completions.create(
        model=LLM,
        messages=ask("Weather in Rome, please."),
        tools=[WEATHER_TOOL, TIME_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=96,
        temperature=0,
    )
    [call] = named.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])

    plain = client.chat.completions.create(
        model=LLM,
        messages=ask("Say hello."),
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].message.content


def test_auto_answers_either_in_text_or_with_well_formed_calls(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=LLM,
        messages=ask("What time is it?"),
        tools=[TIME_TOOL],  # type: ignore[list-item]
        max_tokens=48,
        temperature=0,
    )
    message = reply.choices[0].message
    if message.tool_calls:
        assert reply.choices[0].finish_reason == "tool_calls"
        assert {c.function.name for c in message.tool_calls} == {"get_time"}
    else:
        assert message.content


def test_streamed_tool_calls_assemble_into_the_same_calls(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": LLM,
        "messages": ask("Weather in Lima?"),
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,  # the tiny model would repeat the call to the limit
        "max_tokens": 96,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for chunk in chunks:
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta_call.function and delta_call.function.name:
                names[delta_call.index] = delta_call.function.name
            if delta_call.function and delta_call.function.arguments:
                arguments[delta_call.index] = (
                    arguments.get(delta_call.index, "") + delta_call.function.arguments
                )
    expected = whole.choices[0].message.tool_calls or []
    assert [names[i] for i in sorted(names)] == [c.function.name for c in expected]
    assert [json.loads(arguments[i]) for i in sorted(arguments)] == [
        json.loads(c.function.arguments) for c in expected
    ]
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["tool_calls"]


def test_the_results_of_calls_go_back_to_the_model(client: openai.OpenAI) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees and rain"},
    ]
    reply = client.chat.completions.create(
        model=LLM,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="none",  # type: ignore[arg-type, list-item]
        max_tokens=16,
        temperature=0,
    )
    assert reply.choices[0].message.content


def test_langchain_bind_tools_gets_a_call_it_can_run(agent: AgentProcess) -> None:
    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"sunny in {city}"

    model = ChatOpenAI(
        model=LLM,
        base_url=f"{agent.url}/v1",
        api_key="unused",
        temperature=0,
        max_tokens=64,  # type: ignore[arg-type]
        max_retries=0,
    )
    reply = model.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?"
    )
    [call] = reply.tool_calls  # type: ignore[attr-defined]
    assert call["name"] == "get_weather"
    assert isinstance(call["args"]["city"], str)
    assert get_weather.invoke(call["args"]).startswith("sunny in ")


@pytest.mark.parametrize(
    ("tools", "choice", "named"),
    [
        ([{"type": "function", "function": {"name": "bad name"}}], "auto", "function name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            "auto",
            "must be an object schema",
        ),
        (
            [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"x": {"not": {}}}},
                    },
                }
            ],
            "auto",
            "'not' is not supported",
        ),
        ([WEATHER_TOOL], {"type": "function", "function": {"name": "nope"}}, "'nope' is not"),
        ([], "required", "needs tools"),
    ],
)
def test_invalid_tools_are_a_400_naming_the_problem(
    client: openai.OpenAI, tools: list[dict[str, Any]], choice: Any, named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=LLM,
            messages=ask("hi"),
            tools=tools,
            tool_choice=choice,
            max_tokens=4,  # type: ignore[arg-type]
        )
    assert named in refused.value.message


# -- logprobs, several choices, logit_bias, echo ---------------------------------------


def test_chat_logprobs_come_per_token_with_the_top_alternatives(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=LLM,
        messages=ask("Name a colour."),
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.content is not None
    content = choice.logprobs.content
    assert reply.usage is not None
    assert len(content) == reply.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the likeliest
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert entry.bytes == list(entry.token.encode())


def test_completion_logprobs_use_the_legacy_shape(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=LLM,
        prompt="The capital of France is",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens is not None
    assert logprobs.token_logprobs is not None
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert len(logprobs.token_logprobs) == 4
    assert logprobs.top_logprobs is not None
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset or [])


def test_top_logprobs_out_of_range_or_without_logprobs_is_a_400(client: openai.OpenAI) -> None:
    for extra in ({"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 2}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=LLM, messages=ask("hi"), max_tokens=2, **extra)  # type: ignore[arg-type]
        assert "top_logprobs" in refused.value.message


def test_n_choices_share_the_prompt_and_each_is_complete(client: openai.OpenAI) -> None:
    greedy = client.chat.completions.create(
        model=LLM,
        messages=ask("Tell me a fact."),
        max_tokens=12,
        temperature=0,
        n=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1  # greedy: the same answer
    assert greedy.usage is not None
    assert greedy.usage.completion_tokens == 3 * 12
    sampled = client.chat.completions.create(
        model=LLM,
        messages=ask("Tell me a fact."),
        max_tokens=12,
        temperature=1.0,
        n=3,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    again = client.chat.completions.create(
        model=LLM,
        messages=ask("Tell me a fact."),
        max_tokens=12,
        temperature=1.0,
        n=3,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    texts = [c.message.content for c in sampled.choices]
    assert texts == [c.message.content for c in again.choices]  # fixed seeds: reproducible
    assert len(set(texts)) > 1  # each choice has its own seed


def test_streamed_choices_carry_their_index(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=LLM,
            messages=ask("Count."),
            max_tokens=5,
            temperature=0,
            n=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    assert texts[0] == texts[1] != ""


def test_more_choices_than_slots_is_a_400_naming_n(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=LLM, messages=ask("hi"), max_tokens=2, n=16)
    assert "n=16" in refused.value.message
    assert "parallel slots" in refused.value.message


def test_logit_bias_and_echo_are_honoured(client: openai.OpenAI) -> None:
    plain = client.completions.create(
        model=LLM,
        prompt="Once upon a time",
        max_tokens=4,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    assert plain.choices[0].logprobs is not None
    forced = client.completions.create(
        model=LLM,
        prompt="Once upon a time",
        max_tokens=4,
        temperature=0,
        logprobs=0,
        logit_bias={"1000": 100},
        extra_body={"ignore_eos": True},
    )
    tokens = (forced.choices[0].logprobs and forced.choices[0].logprobs.tokens) or []
    assert len(tokens) == 4
    assert len(set(tokens)) == 1  # the biased token every time
    assert tokens != plain.choices[0].logprobs.tokens
    echoed = client.completions.create(
        model=LLM, prompt="Once upon a time", max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "Once upon a time" + plain.choices[0].text


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"store": True}, "'store'"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "'audio'"),
        ({"modalities": ["text", "audio"]}, "'modalities'"),
        ({"prediction": {"type": "content", "content": "x"}}, "'prediction'"),
        ({"functions": [{"name": "f"}]}, "send tools instead"),
        ({"logit_bias": {"cat": 3}}, "token ids"),
        ({"logit_bias": {"99999999": 3}}, "logit_bias"),
    ],
)
def test_a_known_parameter_that_cannot_be_honoured_is_a_400_naming_it(
    client: openai.OpenAI, extra: dict[str, Any], named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=LLM, messages=ask("hi"), max_tokens=2, extra_body=extra
        )
    assert named in refused.value.message


def test_penalties_reach_the_sampler(client: openai.OpenAI) -> None:
    def answer(**penalties: float) -> str:
        reply = client.completions.create(
            model=LLM,
            prompt="la la la la la la la la",
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True, **penalties},
        )
        return reply.choices[0].text

    plain = answer()
    assert answer(frequency_penalty=2.0) != plain
    assert answer(presence_penalty=2.0, repeat_penalty=1.8) != plain
