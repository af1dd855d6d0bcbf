"""The Ollama API through Ollama's own client, unmodified, on the real Gemma 3 270M and MiniLM.

It is a small base model: what these tests check is what the agent guarantees (shapes
the ``ollama`` client parses, constrained answers that parse and validate, streams
that add up to the whole answer, clear refusals), not how clever the answers are.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import jsonschema
import ollama
import pytest

from tests.conftest import AgentProcess

pytestmark = pytest.mark.integration

LLM = "gemma3-270m"
EMBEDDER = "minilm"
GREEDY: dict[str, Any] = {"temperature": 0, "num_predict": 16}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> Iterator[ollama.Client]:
    with ollama.Client(host=agent.url) as client:
        yield client


# A small model asked for free-form JSON may nest objects until max_tokens, and where it
# stops depends on the CPU's kernels: an example turn shows it a short object, so it
# closes its own after a few tokens whatever the machine.
NAME_AS_JSON = [
    {"role": "user", "content": 'Reply with a JSON object holding a name, like {"name": "..."}.'},
    {"role": "assistant", "content": '{"name": "Ada"}'},
    {"role": "user", "content": "Another one, please."},
]


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assert_continues(streamed: str, whole: str, whole_reason: str | None) -> None:
    """Greedy: a stream one token longer is the whole answer, or continues one cut short."""
    if whole_reason == "stop":
        assert streamed == whole
    else:
        assert streamed.startswith(whole)


# -- chat --------------------------------------------------------------------------------


def test_chat_answers_with_ollama_counters(client: ollama.Client) -> None:
    reply = client.chat(model=LLM, messages=ask("Name a colour."), options=GREEDY)
    assert reply.message.role == "assistant"
    assert reply.message.content
    assert reply.model == LLM
    assert reply.done is True
    assert reply.done_reason in {"stop", "length"}
    assert reply.eval_count is not None
    assert 0 < reply.eval_count <= 16
    assert reply.prompt_eval_count is not None
    assert reply.prompt_eval_count > 5
    assert reply.total_duration is not None
    assert reply.total_duration > 0
    assert reply.eval_duration is not None
    assert reply.eval_duration >= 0
    assert reply.load_duration == 0
    assert reply.created_at is not None
    datetime.fromisoformat(reply.created_at)


def test_streamed_chat_adds_up_to_the_whole_greedy_answer(client: ollama.Client) -> None:
    messages = ask("Write a sentence about rivers.")
    whole = client.chat(model=LLM, messages=messages, options={"temperature": 0, "num_predict": 20})
    # one more token, so the stream is generated afresh rather than served from the cache
    options = {"temperature": 0, "num_predict": 21}
    parts = list(
        client.chat(model=f"{LLM}:latest", messages=messages, options=options, stream=True)
    )
    assert len(parts) > 3
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert whole.message.content
    assert_continues(
        "".join(p.message.content or "" for p in parts), whole.message.content, whole.done_reason
    )
    last = parts[-1]
    assert last.message.content == ""
    assert last.eval_count is not None
    assert last.eval_count in {whole.eval_count, 21}
    assert all(p.model == f"{LLM}:latest" for p in parts)


def test_the_client_may_name_the_model_by_its_version(client: ollama.Client) -> None:
    version = client.show(LLM).modelinfo["edgefleet.version"]  # type: ignore[index]
    reply = client.chat(model=f"{LLM}:{version}", messages=ask("Hi"), options=GREEDY)
    assert reply.done is True


def test_chat_with_no_messages_only_loads_the_model(client: ollama.Client) -> None:
    reply = client.chat(model=LLM, messages=[])
    assert reply.done is True
    assert reply.done_reason == "load"
    assert reply.message.content == ""


def test_logprobs_come_with_each_generated_token(client: ollama.Client) -> None:
    reply = client.chat(
        model=LLM, messages=ask("Count to three."), options=GREEDY, logprobs=True, top_logprobs=2
    )
    assert reply.logprobs is not None
    assert len(reply.logprobs) == reply.eval_count
    assert "".join(lp.token for lp in reply.logprobs) == reply.message.content
    for lp in reply.logprobs:
        assert lp.logprob <= 0
        assert lp.top_logprobs is not None
        assert len(lp.top_logprobs) == 2


# -- generate ----------------------------------------------------------------------------


def test_generate_whole_and_streamed_agree(client: ollama.Client) -> None:
    prompt = "Name three fruits."
    whole = client.generate(model=LLM, prompt=prompt, options={"temperature": 0, "num_predict": 20})
    assert whole.response
    assert whole.done is True
    options = {"temperature": 0, "num_predict": 21}  # generated afresh, not from the cache
    parts = list(client.generate(model=LLM, prompt=prompt, options=options, stream=True))
    assert len(parts) > 3
    assert_continues("".join(p.response or "" for p in parts), whole.response, whole.done_reason)
    assert parts[-1].done is True


def test_raw_generate_is_the_templated_prompt_sent_as_is(client: ollama.Client) -> None:
    template = client.show(LLM).template
    assert template
    assert "{{ .Prompt }}" in template
    prompt = "Name three fruits."
    templated = client.generate(model=LLM, prompt=prompt, options=GREEDY)
    raw = client.generate(
        model=LLM, prompt=template.replace("{{ .Prompt }}", prompt), raw=True, options=GREEDY
    )
    assert raw.response == templated.response
    assert raw.prompt_eval_count == templated.prompt_eval_count


def test_raw_generate_continues_plain_text(client: ollama.Client) -> None:
    reply = client.generate(model=LLM, prompt="The capital of France is", raw=True, options=GREEDY)
    assert reply.response
    assert reply.prompt_eval_count is not None
    assert reply.prompt_eval_count < 10


def test_generate_puts_the_system_prompt_before_the_prompt(client: ollama.Client) -> None:
    plain = client.generate(model=LLM, prompt="Say hello.", options=GREEDY)
    told = client.generate(
        model=LLM, prompt="Say hello.", system="Answer only in French.", options=GREEDY
    )
    assert told.response
    assert plain.prompt_eval_count is not None
    assert told.prompt_eval_count is not None
    assert told.prompt_eval_count > plain.prompt_eval_count + 3


def test_generate_with_no_prompt_only_loads_the_model(client: ollama.Client) -> None:
    reply = client.generate(model=LLM)
    assert reply.done is True
    assert reply.done_reason == "load"
    assert reply.response == ""


# -- format ------------------------------------------------------------------------------


def test_format_json_gives_a_json_object(client: ollama.Client) -> None:
    reply = client.chat(
        model=LLM,
        messages=NAME_AS_JSON,
        format="json",
        options={"temperature": 0, "num_predict": 256},
    )
    assert reply.done_reason == "stop", reply.message.content
    assert isinstance(json.loads(reply.message.content or ""), dict)


def test_format_schema_answers_validate(client: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "likes_tea": {"type": "boolean"},
        },
        "required": ["name", "age", "likes_tea"],
        "additionalProperties": False,
    }
    for seed in (1, 2, 3):
        reply = client.generate(
            model=LLM,
            prompt="Invent a person.",
            format=schema,
            options={"temperature": 1.0, "seed": seed, "num_predict": 128},
        )
        assert reply.done_reason == "stop", reply.response
        jsonschema.validate(json.loads(reply.response or ""), schema)


def test_a_streamed_formatted_answer_parses_too(client: ollama.Client) -> None:
    parts = list(
        client.chat(
            model=LLM,
            messages=NAME_AS_JSON,
            format="json",
            options={"temperature": 0, "num_predict": 255},  # not the cached whole answer
            stream=True,
        )
    )
    assert parts[-1].done_reason == "stop"
    assert isinstance(json.loads("".join(p.message.content or "" for p in parts)), dict)


# -- tools -------------------------------------------------------------------------------


def check_reply(message: ollama.Message) -> None:
    """Ollama's tools are "auto": a reply is text, or calls of offered tools with object args."""
    if message.tool_calls:
        assert message.content == ""
        for call in message.tool_calls:
            assert call.function.name == "get_weather"
            assert isinstance(call.function.arguments, dict)
    else:
        assert message.content


def test_tools_give_text_or_well_formed_calls(client: ollama.Client) -> None:
    for seed in (1, 2, 3, 4):
        reply = client.chat(
            model=LLM,
            messages=ask("What is the weather in Oslo? Use the tool."),
            tools=[WEATHER_TOOL],
            options={"temperature": 1.0, "seed": seed, "num_predict": 64},
        )
        check_reply(reply.message)


def test_streamed_tool_answers_match_the_whole_ones(client: ollama.Client) -> None:
    args: dict[str, Any] = {
        "model": LLM,
        "messages": ask("What is the weather in Oslo? Use the tool."),
        "tools": [WEATHER_TOOL],
    }
    whole = client.chat(**args, options={"temperature": 0, "num_predict": 64})
    parts = list(client.chat(**args, options={"temperature": 0, "num_predict": 65}, stream=True))
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    text = "".join(p.message.content or "" for p in parts)
    check_reply(whole.message)
    if whole.message.tool_calls:
        assert [c.function for c in calls] == [c.function for c in whole.message.tool_calls]
        assert text == ""
    else:
        assert not calls
        assert_continues(text, whole.message.content or "", whole.done_reason)
    assert parts[-1].done is True


def test_a_tool_result_goes_back_to_the_model(client: ollama.Client) -> None:
    question = ask("What is the weather in Oslo?")
    history = [
        *question,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 21 degrees"},
    ]
    options = {"temperature": 0, "num_predict": 48}
    before = client.chat(model=LLM, messages=question, tools=[WEATHER_TOOL], options=options)
    after = client.chat(model=LLM, messages=history, tools=[WEATHER_TOOL], options=options)
    check_reply(after.message)
    assert after.prompt_eval_count is not None
    assert before.prompt_eval_count is not None
    # the call and its result are in the prompt: '{"tool_calls": ...}' and 'Tool result ...'
    assert after.prompt_eval_count > before.prompt_eval_count + 15


# -- embeddings --------------------------------------------------------------------------


def test_embed_gives_one_vector_per_input(client: ollama.Client) -> None:
    dim = client.show(EMBEDDER).modelinfo["onnx.embedding_length"]  # type: ignore[index]
    reply = client.embed(model=EMBEDDER, input=["a red apple", "the stock market", "a red apple"])
    vectors = reply.embeddings
    assert len(vectors) == 3
    assert all(len(v) == dim for v in vectors)
    assert vectors[0] == vectors[2]
    assert vectors[0] != vectors[1]
    assert reply.prompt_eval_count is not None
    assert reply.prompt_eval_count > 3
    one = client.embed(model=f"{EMBEDDER}:latest", input="a red apple")
    assert len(one.embeddings) == 1
    assert one.embeddings[0] == pytest.approx(vectors[0], abs=1e-6)


def test_embed_refuses_what_it_cannot_honour(client: ollama.Client) -> None:
    long_text = "word " * 2000
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model=EMBEDDER, input=["short", long_text], truncate=False)
    assert info.value.status_code == 400
    assert "input[1]" in info.value.error
    assert client.embed(model=EMBEDDER, input=long_text).embeddings  # truncate: the default
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model=EMBEDDER, input="x", dimensions=7)
    assert info.value.status_code == 400
    assert "dimensions" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model=LLM, input="x")
    assert info.value.status_code == 400


# -- models ------------------------------------------------------------------------------


def test_tags_list_every_model_with_a_tag(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    assert set(models) == {f"{LLM}:latest", f"{EMBEDDER}:latest"}
    llm = models[f"{LLM}:latest"]
    assert llm.details is not None
    assert llm.details.format == "gguf"
    assert llm.details.family == "gemma3"
    assert llm.details.quantization_level == "Q4_K_M"
    assert llm.size is not None
    assert llm.size > 100_000_000
    assert llm.digest is not None
    assert len(llm.digest) == 64
    assert isinstance(llm.modified_at, datetime)
    assert models[f"{EMBEDDER}:latest"].details.format == "onnx"  # type: ignore[union-attr]


def test_show_describes_what_a_model_can_do(client: ollama.Client) -> None:
    llm = client.show(f"{LLM}:latest")
    assert llm.capabilities == ["completion", "tools"]
    assert llm.details is not None
    assert llm.details.family == "gemma3"
    assert llm.modelinfo is not None
    assert llm.modelinfo["general.architecture"] == "gemma3"
    assert llm.modelinfo["gemma3.context_length"] > 0
    assert llm.parameters is not None
    assert "temperature" in llm.parameters
    assert client.show(EMBEDDER).capabilities == ["embedding"]


def test_ps_lists_the_loaded_models(client: ollama.Client) -> None:
    running = {m.model: m for m in client.ps().models}
    assert set(running) == {f"{LLM}:latest", f"{EMBEDDER}:latest"}
    llm = running[f"{LLM}:latest"]
    assert llm.size is not None
    assert llm.size > 0
    assert llm.size_vram == 0  # the test agent runs on the CPU
    assert isinstance(llm.expires_at, datetime)
    assert llm.context_length is not None
    assert llm.context_length > 0


def test_version_is_the_agents(agent: AgentProcess) -> None:
    reply = httpx.get(f"{agent.url}/api/version", timeout=10)
    assert reply.status_code == 200
    assert reply.json() == {"version": importlib.metadata.version("edgefleet")}


# -- bad input ---------------------------------------------------------------------------


def refused(call: Any, status: int = 400) -> str:
    with pytest.raises(ollama.ResponseError) as info:
        call()
    assert info.value.status_code == status, info.value.error
    return str(info.value.error)


def test_an_unknown_model_is_404_everywhere(client: ollama.Client) -> None:
    for call in (
        lambda: client.chat(model="no-such-model", messages=ask("hi")),
        lambda: client.chat(model=f"{LLM}:7b", messages=ask("hi")),
        lambda: client.generate(model="no-such-model", prompt="hi"),
        lambda: client.embed(model="no-such-model", input="hi"),
        lambda: client.show("no-such-model"),
    ):
        assert "not found" in refused(call, 404)


def test_bad_input_is_refused_by_name_and_the_agent_keeps_serving(
    client: ollama.Client, agent: AgentProcess
) -> None:
    bad_schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    assert "minimum" in refused(
        lambda: client.chat(model=LLM, messages=ask("hi"), format=bad_schema)
    )
    assert "images" in refused(
        lambda: client.generate(model=LLM, prompt="What is this?", images=[b"\x89PNG fake"])
    )
    assert "images" in refused(
        lambda: client.chat(
            model=LLM, messages=[{"role": "user", "content": "What?", "images": [b"\x89PNG"]}]
        )
    )
    assert "num_gpu" in refused(
        lambda: client.chat(model=LLM, messages=ask("hi"), options={"num_gpu": 99})
    )
    assert "num_ctx" in refused(
        lambda: client.chat(model=LLM, messages=ask("hi"), options={"num_ctx": 10**6})
    )
    assert "think" in refused(lambda: client.chat(model=LLM, messages=ask("hi"), think=True))
    assert "keep_alive" in refused(lambda: client.chat(model=LLM, messages=ask("hi"), keep_alive=0))
    assert "suffix" in refused(lambda: client.generate(model=LLM, prompt="def f(", suffix="):"))
    assert "num_predict" in refused(
        lambda: client.chat(model=LLM, messages=ask("hi"), options={"num_predict": 10**7})
    )
    for body in (b'{"model": "gemma3-270m", "messages": [', b"[1, 2]"):
        reply = httpx.post(
            f"{agent.url}/api/chat",
            content=body,
            headers={"content-type": "application/json"},
            timeout=10,
        )
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert isinstance(error, str)
        assert error
    after = client.chat(model=LLM, messages=ask("Name a colour."), options=GREEDY)
    assert after.done is True
    assert after.message.content


def test_an_answer_streams_as_ndjson_unless_told_not_to(agent: AgentProcess) -> None:
    """Ollama's default: one JSON object per line, the last one done."""
    with httpx.stream(
        "POST",
        f"{agent.url}/api/generate",
        json={"model": LLM, "prompt": "Hi", "options": GREEDY},
        timeout=60,
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in reply.iter_lines() if line]
    assert lines[-1]["done"] is True
    assert all(line["done"] is False for line in lines[:-1])
