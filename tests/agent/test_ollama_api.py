"""The Ollama API without a model: what is honoured, refused or renamed, and the shapes.

The request models and pure shapes are checked directly; the routes run in-process on
the fake decoder (its text is letters, so tool calls are shaped from scripted events),
and every body is parsed with the ``ollama`` client's own types.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import ollama
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from agent.api import ollama as routes
from agent.api.content_type import OllamaJsonBody
from agent.api.deps import AgentState, get_state
from agent.api.errors import install_error_handlers
from agent.api.generation import Delta, End
from agent.api.ollama_schemas import (
    ChatMessage,
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    Options,
    ShowRequest,
    keep_alive_seconds,
    served_name,
)
from agent.api.ollama_shapes import details, logprobs, running, stats, tag, timestamp, tool_calls
from agent.config import AgentSettings
from agent.errors import InvalidRequest, ModelNotFound, ModelNotReady
from agent.interaction_log import InteractionLog
from agent.metrics import AgentMetrics
from agent.runtime.base import RANDOM_SEED, RuntimeInfo, TokenLogprob
from agent.serving.cache import ResponseCache
from agent.serving.degraded import DegradedMode
from agent.serving.fallback import Served
from agent.serving.grammars import JSON_OBJECT_GBNF
from agent.serving.registry import ModelRegistry
from agent.serving.scheduler import BatchScheduler, GenerationResult
from agent.serving.tools import Tool, ToolCall
from models.manifest import ModelFormat, ModelManifest, RuntimeParams
from tests.fakes.decoder import FakeDecoder
from tests.fakes.models import FakeEmbedder

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def chat(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def refusal(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return str(exc.value.errors()[0]["msg"])


# -- options -----------------------------------------------------------------------------


def test_options_left_out_are_ollamas_defaults() -> None:
    sampling = Options().sampling(None)
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (0.8, 40, 0.9)
    assert sampling.repeat_penalty == 1.1
    assert sampling.seed == RANDOM_SEED
    assert Options().max_tokens() is None


def test_runtime_options_are_honoured() -> None:
    options = Options.model_validate(
        {
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 7,
            "min_p": 0.1,
            "seed": 42,
            "num_predict": 33,
            "stop": ["\n", "END"],
            "repeat_penalty": 1.3,
            "presence_penalty": 0.2,
            "frequency_penalty": 0.4,
            "repeat_last_n": 64,
            "mirostat": 0,
            "mirostat_tau": 5.0,  # no effect without mirostat, as in Ollama
            "typical_p": 1.0,
            "use_mmap": True,
            "an_option_from_the_future": 1,
        }
    )
    sampling = options.sampling("root ::= x")
    assert sampling.temperature == 0
    assert (sampling.top_p, sampling.top_k, sampling.min_p, sampling.seed) == (0.5, 7, 0.1, 42)
    assert (sampling.repeat_penalty, sampling.presence_penalty) == (1.3, 0.2)
    assert sampling.frequency_penalty == 0.4
    assert sampling.grammar == "root ::= x"
    assert options.max_tokens() == 33
    assert options.stops() == ("\n", "END")
    assert Options(stop="x").stops() == ("x",)


def test_a_negative_seed_draws_a_fresh_one_and_minus_one_predicts_the_default() -> None:
    options = Options(seed=-1, num_predict=-1)
    assert options.sampling(None).seed == RANDOM_SEED
    assert options.max_tokens() is None


def test_repeat_last_n_zero_turns_every_penalty_off() -> None:
    sampling = Options(
        repeat_last_n=0, repeat_penalty=1.5, presence_penalty=1, frequency_penalty=1
    ).sampling(None)
    assert (sampling.repeat_penalty, sampling.presence_penalty, sampling.frequency_penalty) == (
        1.0,
        0.0,
        0.0,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("num_gpu", 0),
        ("num_thread", 4),
        ("num_batch", 512),
        ("main_gpu", 0),
        ("numa", True),
        ("low_vram", True),
        ("use_mmap", False),
        ("use_mlock", True),
        ("f16_kv", False),
        ("vocab_only", True),
        ("logits_all", True),
        ("embedding_only", True),
        ("num_keep", 4),
        ("mirostat", 2),
        ("typical_p", 0.7),
        ("tfs_z", 0.9),
        ("penalize_newline", False),
        ("repeat_last_n", 128),
        ("num_predict", 0),
        ("num_predict", -2),
    ],
)
def test_an_option_that_cannot_be_honoured_is_refused_by_name(name: str, value: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        Options.model_validate({name: value})
    assert f"'{name}' cannot be honoured" in refusal(exc)


@pytest.mark.parametrize(
    ("name", "value"),
    [("numa", False), ("f16_kv", True), ("use_mmap", True), ("use_mlock", False), ("tfs_z", 1.0)],
)
def test_a_load_time_value_the_agent_already_has_passes(name: str, value: Any) -> None:
    Options.model_validate({name: value})


def test_num_ctx_is_checked_against_the_loaded_models_context() -> None:
    Options(num_ctx=2048).check_context("m", 2048)
    Options(num_ctx=512).check_context("m", 2048)  # the loaded window is at least as large
    with pytest.raises(InvalidRequest) as exc:
        Options(num_ctx=8192).check_context("m", 2048)
    assert exc.value.param == "options.num_ctx"
    assert "cannot resize" in exc.value.message


@pytest.mark.parametrize("value", [float("inf"), -0.5])
def test_temperature_must_be_finite_and_not_negative(value: float) -> None:
    with pytest.raises(ValidationError):
        Options(temperature=value)


# -- the request bodies --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(300, 300.0), ("300", 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("-1", -1.0), ("-1m", -60.0)],
)
def test_keep_alive_reads_seconds_and_go_durations(value: float | str, seconds: float) -> None:
    assert keep_alive_seconds(value) == seconds
    assert chat(keep_alive=value).keep_alive == value


@pytest.mark.parametrize("value", [0, "0", "0s", "0m"])
def test_keep_alive_zero_would_unload_and_is_refused(value: float | str) -> None:
    with pytest.raises(ValidationError) as exc:
        chat(keep_alive=value)
    assert "'keep_alive' cannot be honoured" in refusal(exc)


def test_keep_alive_that_is_no_duration_is_refused() -> None:
    with pytest.raises(ValidationError, match="keep_alive"):
        chat(keep_alive="forever")


@pytest.mark.parametrize("think", [True, "high"])
def test_thinking_is_refused(think: Any) -> None:
    with pytest.raises(ValidationError, match="'think' cannot be honoured"):
        chat(think=think)


def test_not_thinking_passes() -> None:
    chat(think=False)


def test_format_json_or_a_schema_becomes_a_grammar() -> None:
    assert chat().grammar() is None
    assert chat(format="").grammar() is None
    assert chat(format="json").grammar() == JSON_OBJECT_GBNF
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    grammar = chat(format=schema).grammar()
    assert grammar is not None
    assert "root" in grammar


def test_a_schema_the_grammar_cannot_enforce_is_refused_naming_the_keyword() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    with pytest.raises(InvalidRequest) as exc:
        chat(format=schema).grammar()
    assert "'minimum'" in exc.value.message
    assert exc.value.param == "format"


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValidationError, match="format must be"):
        chat(format="xml")


def test_logprobs_map_to_the_number_of_rivals() -> None:
    assert chat().top_logprobs_wanted() is None
    assert chat(logprobs=True).top_logprobs_wanted() == 0
    assert chat(logprobs=True, top_logprobs=3).top_logprobs_wanted() == 3
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        chat(top_logprobs=3)
    with pytest.raises(ValidationError):
        chat(logprobs=True, top_logprobs=21)


def test_the_client_defaults_and_ollamas_stream_default() -> None:
    body = ChatRequest.model_validate({"model": "m", "messages": [], "tools": []})
    assert body.stream is True
    assert body.tool_set() == []


def test_history_renders_tool_calls_and_results_in_the_agents_shape() -> None:
    call = ChatMessage.model_validate(
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}],
        }
    )
    assert json.loads(call.rendered()["content"]) == {
        "tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}}]
    }
    text_args = ChatMessage.model_validate(
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "weather", "arguments": '{"city": "Rome"}'}}],
        }
    )
    assert json.loads(text_args.rendered()["content"])["tool_calls"][0]["arguments"] == {
        "city": "Rome"
    }
    result = ChatMessage(role="tool", tool_name="weather", content="Sunny")
    assert result.rendered() == {"role": "user", "content": "Tool result (weather): Sunny"}
    assert ChatMessage(role="tool", content="Sunny").rendered()["content"] == "Tool result: Sunny"
    assert ChatMessage(role="assistant").rendered() == {"role": "assistant", "content": ""}


def test_images_and_unknown_roles_are_refused() -> None:
    with pytest.raises(ValidationError, match="'images' cannot be honoured"):
        chat(messages=[{"role": "user", "content": "what is this?", "images": ["aGk="]}])
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "wizard", "content": "hi"}])
    chat(messages=[{"role": "user", "content": "hi", "images": []}])


def test_tools_become_the_serving_layers_tools() -> None:
    tools = chat(tools=[WEATHER]).tool_set()
    assert [t.name for t in tools] == ["weather"]
    with pytest.raises(InvalidRequest) as exc:
        chat(tools=[WEATHER], format="json").tool_set()
    assert exc.value.param == "format"
    bad = {"type": "function", "function": {"name": "not a name"}}
    with pytest.raises(InvalidRequest, match="tools\\[0\\]"):
        chat(tools=[bad]).tool_set()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("suffix", "return x"),
        ("images", ["aGk="]),
        ("template", "{{ .Prompt }}"),
        ("context", [1, 2, 3]),
        ("width", 512),
        ("steps", 4),
    ],
)
def test_a_generate_field_that_cannot_be_honoured_is_refused(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        GenerateRequest.model_validate({"model": "m", "prompt": "x", field: value})
    assert f"'{field}' cannot be honoured" in refusal(exc)


def test_generate_fields_that_ask_for_nothing_pass() -> None:
    body = GenerateRequest.model_validate(
        {"model": "m", "prompt": "x", "suffix": "", "images": [], "template": "", "context": []}
    )
    assert body.raw is False


def test_a_raw_prompt_has_no_place_for_a_system_prompt() -> None:
    with pytest.raises(ValidationError, match="'system' cannot be honoured"):
        GenerateRequest.model_validate({"model": "m", "prompt": "x", "raw": True, "system": "s"})


def test_embed_takes_one_text_or_many_and_refuses_sampling_options() -> None:
    assert EmbedRequest(model="m", input="a").texts() == ["a"]
    assert EmbedRequest(model="m", input=["a", "b"]).texts() == ["a", "b"]
    assert EmbedRequest.model_validate({"model": "m", "input": "a"}).truncate is True
    EmbedRequest.model_validate({"model": "m", "input": "a", "options": {"num_ctx": 128}})
    with pytest.raises(ValidationError, match=r"'options\.temperature' cannot be honoured"):
        EmbedRequest.model_validate({"model": "m", "input": "a", "options": {"temperature": 1}})


def test_show_accepts_the_legacy_name_field() -> None:
    assert ShowRequest.model_validate({"name": "m"}).model == "m"
    assert ShowRequest.model_validate({"model": "m", "name": "other"}).model == "m"


# -- model names ---------------------------------------------------------------------------

SERVED = {"gemma3-270m": "q4_k_m-1.0.0", "minilm": "1.0.0"}


@pytest.mark.parametrize(
    ("name", "served"),
    [
        ("gemma3-270m", "gemma3-270m"),
        ("gemma3-270m:latest", "gemma3-270m"),
        ("gemma3-270m:q4_k_m-1.0.0", "gemma3-270m"),
        ("minilm:latest", "minilm"),
        ("loading", "loading"),
        ("loading:latest", "loading"),
    ],
)
def test_an_ollama_name_means_a_served_model(name: str, served: str) -> None:
    assert served_name(name, SERVED, ["loading"]) == served


@pytest.mark.parametrize("name", ["gemma3", "gemma3-270m:7b", "gemma3-270m:", "minilm:2.0.0"])
def test_any_other_name_is_not_found(name: str) -> None:
    with pytest.raises(ModelNotFound) as exc:
        served_name(name, SERVED, ["loading"])
    assert exc.value.message == f"model {name!r} not found"


# -- shapes --------------------------------------------------------------------------------


def manifest(name: str = "gemma3-270m", fmt: ModelFormat = ModelFormat.GGUF) -> ModelManifest:
    return ModelManifest(
        name=name,
        version="1.0.0",
        format=fmt,
        file="model.gguf" if fmt == ModelFormat.GGUF else "model.onnx",
        sha256="ab" * 32,
        size_bytes=253_113_024,
        runtime=RuntimeParams(embedding_dim=384 if fmt == ModelFormat.ONNX else None),
    )


def info(description: str = "gemma3 270M Q4_K - Medium", device: str = "cpu") -> RuntimeInfo:
    return RuntimeInfo(
        "llama.cpp",
        "0.3",
        device,
        "llama.cpp-cpu",
        memory_bytes=400_000_000,
        details={"description": description},
    )


@pytest.mark.parametrize(
    ("description", "family", "size", "quantization"),
    [
        ("gemma3 270M Q4_K - Medium", "gemma3", "270M", "Q4_K_M"),
        ("llama 8B Q8_0", "llama", "8B", "Q8_0"),
        ("qwen2 ?B Q4_K - Small", "qwen2", "", "Q4_K_S"),
        ("llama 1B IQ2_XXS - 2.0625 bpw", "llama", "1B", "IQ2_XXS"),
        ("", "", "", ""),
    ],
)
def test_details_are_read_from_llama_cpps_description(
    description: str, family: str, size: str, quantization: str
) -> None:
    out = details(manifest(), info(description))
    assert (out["family"], out["parameter_size"], out["quantization_level"]) == (
        family,
        size,
        quantization,
    )
    assert out["families"] == ([family] if family else [])
    assert out["format"] == "gguf"


def test_tags_and_ps_parse_as_the_client_reads_them() -> None:
    listing = ollama.ListResponse.model_validate(
        {"models": [tag(manifest(), info(), 1_700_000_000)]}
    )
    entry = listing.models[0]
    assert entry.model == "gemma3-270m:latest"
    assert entry.modified_at == datetime.fromisoformat("2023-11-14T22:13:20+00:00")
    assert entry.size == 253_113_024
    assert entry.digest == "ab" * 32
    ps = ollama.ProcessResponse.model_validate(
        {
            "models": [
                running(manifest(), info(), 2048),
                running(manifest("gpu"), info(device="gpu"), None),
            ]
        }
    )
    cpu, gpu = ps.models
    assert (cpu.size, cpu.size_vram, cpu.context_length) == (400_000_000, 0, 2048)
    assert gpu.size_vram == gpu.size
    assert gpu.context_length is None
    assert cpu.expires_at is not None
    assert cpu.expires_at.year == 9999


def test_stats_are_nanoseconds() -> None:
    result = GenerationResult("hi", "stop", 10, 4, 0, ttft_s=0.25, total_s=1.0)
    assert stats(result, 1.5) == {
        "total_duration": 1_500_000_000,
        "load_duration": 0,
        "prompt_eval_count": 10,
        "prompt_eval_duration": 250_000_000,
        "eval_count": 4,
        "eval_duration": 750_000_000,
    }


def test_timestamps_are_rfc3339_in_utc() -> None:
    text = timestamp(1_700_000_000.5)
    assert text == "2023-11-14T22:13:20.500000Z"
    assert datetime.fromisoformat(text).timestamp() == 1_700_000_000.5


def test_tool_calls_carry_their_arguments_as_objects() -> None:
    shaped = tool_calls([ToolCall("weather", '{"city": "Oslo"}'), ToolCall("time", "{}")])
    message = ollama.Message.model_validate({"role": "assistant", "tool_calls": shaped})
    assert message.tool_calls is not None
    assert [(c.function.name, dict(c.function.arguments)) for c in message.tool_calls] == [
        ("weather", {"city": "Oslo"}),
        ("time", {}),
    ]


def test_logprobs_shape() -> None:
    entries = [TokenLogprob(5, b"hi", -0.1, ((b"hi", -0.1), (b"yo", -2.5)))]
    shaped = logprobs(entries)
    response = ollama.ChatResponse.model_validate(
        {"message": {"role": "assistant", "content": "hi"}, "logprobs": shaped}
    )
    assert response.logprobs is not None
    (entry,) = response.logprobs
    assert (entry.token, entry.logprob) == ("hi", -0.1)
    assert entry.top_logprobs is not None
    assert [(t.token, t.logprob) for t in entry.top_logprobs] == [("hi", -0.1), ("yo", -2.5)]
    assert shaped[0]["bytes"] == [104, 105]


# -- streams and whole answers, from scripted events ----------------------------------------


class ScriptedRun:
    """What a route reads of a :class:`~agent.api.generation.Run`: events, then its end."""

    def __init__(self, deltas: Sequence[str], *, fail: Exception | None = None) -> None:
        self.deltas = deltas
        self.fail = fail
        self.started = time.monotonic()
        self.served = Served(by="m", tier="primary", degraded=False)
        text = "".join(deltas)
        self.result = GenerationResult(text, "stop", 3, len(deltas), 0, ttft_s=0.1, total_s=0.2)

    async def events(self) -> AsyncIterator[Delta | End]:
        for text in self.deltas:
            yield Delta(0, text)
        if self.fail is not None:
            raise self.fail
        yield End(0, self.result)


def stream(run: ScriptedRun, *, chat: bool = True, tools: Sequence[Tool] = ()) -> list[Any]:
    shape = routes._Shape(model="m:latest", chat=chat, tools=tools)

    async def collect() -> list[str]:
        return [line async for line in routes._stream(run, shape)]  # type: ignore[arg-type]

    lines = asyncio.run(collect())
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    return [json.loads(line) for line in lines]


TOOLS = [Tool.of("weather", None, None, param="tools[0].function")]
CALL = '{"tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}}]}'


def test_a_stream_is_one_object_per_text_piece_then_the_end() -> None:
    parts = stream(ScriptedRun(["Hel", "lo"]))
    chunks = [ollama.ChatResponse.model_validate(p) for p in parts]
    assert [c.message.content for c in chunks] == ["Hel", "lo", ""]
    assert [c.done for c in chunks] == [False, False, True]
    assert chunks[-1].done_reason == "stop"
    assert chunks[-1].eval_count == 2
    assert all(c.model == "m:latest" for c in chunks)
    generated = [
        ollama.GenerateResponse.model_validate(p) for p in stream(ScriptedRun(["a"]), chat=False)
    ]
    assert [g.response for g in generated] == ["a", ""]


def test_a_reply_in_the_call_shape_streams_as_tool_calls() -> None:
    pieces = [CALL[:1], CALL[1:20], CALL[20:]]
    parts = [
        ollama.ChatResponse.model_validate(p) for p in stream(ScriptedRun(pieces), tools=TOOLS)
    ]
    assert [p.message.content for p in parts] == ["", ""]
    calls = parts[0].message.tool_calls
    assert calls is not None
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("weather", {"city": "Oslo"})
    ]
    assert parts[1].done is True


def test_text_that_only_began_like_a_call_is_sent_once_it_is_not_one() -> None:
    parts = stream(ScriptedRun(["{not", " a call}"]), tools=TOOLS)
    assert [p["message"]["content"] for p in parts] == ["{not a call}", ""]
    plain = stream(ScriptedRun(["It is", " sunny"]), tools=TOOLS)
    assert [p["message"]["content"] for p in plain] == ["It is", " sunny", ""]


def test_an_error_mid_stream_is_the_last_line() -> None:
    parts = stream(ScriptedRun(["Hel"], fail=ModelNotReady("model 'm' was unloaded")))
    assert parts[-1] == {"error": "model 'm' was unloaded"}
    with pytest.raises(ollama.ResponseError):  # what the client does with such a line
        raise ollama.ResponseError(parts[-1]["error"])


def test_a_whole_answer_in_the_call_shape_is_tool_calls_with_empty_content() -> None:
    shape = routes._Shape(model="m", chat=True, tools=TOOLS)
    run = ScriptedRun([CALL])
    body = ollama.ChatResponse.model_validate(routes._whole(run, shape, run.result))  # type: ignore[arg-type]
    assert body.message.content == ""
    assert body.message.tool_calls is not None
    assert body.message.tool_calls[0].function.arguments == {"city": "Oslo"}
    assert body.done is True


# -- the routes, on the fake decoder ----------------------------------------------------------


@pytest.fixture
def api() -> Iterator[TestClient]:
    registry = ModelRegistry()
    registry.publish("fake", BatchScheduler(FakeDecoder(n_ctx=512, eog_after=40)))
    embedder = FakeEmbedder(manifest("minilm", ModelFormat.ONNX), dim=384)
    registry.publish("minilm", embedder)
    registry.expect("later")
    settings = AgentSettings()
    state = AgentState(
        settings=settings,
        registry=registry,
        metrics=AgentMetrics(registry.models, None),
        interactions=InteractionLog(settings.log),
        device=SimpleNamespace(),  # type: ignore[arg-type]
        cache=ResponseCache(16),
        started_at=1_700_000_000,
        degraded=DegradedMode(),
    )
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(routes.router)
    app.dependency_overrides[get_state] = lambda: state
    try:
        with TestClient(app) as client:
            yield client
    finally:
        registry.close()
        state.interactions.close()


def post(api: TestClient, path: str, body: dict[str, Any]) -> Any:
    return api.post(path, json=body)


def test_chat_and_generate_answer_whole_and_streamed(api: TestClient) -> None:
    body = {"model": "fake:latest", "messages": [{"role": "user", "content": "abc"}]}
    options = {"temperature": 0, "num_predict": 5}
    whole = post(api, "/api/chat", {**body, "stream": False, "options": options})
    assert whole.status_code == 200
    reply = ollama.ChatResponse.model_validate(whole.json())
    assert reply.model == "fake:latest"
    assert reply.eval_count == 5
    assert reply.done_reason == "length"
    assert reply.prompt_eval_count == 3
    streamed = post(api, "/api/chat", {**body, "options": {**options, "seed": 1}})
    assert streamed.headers["content-type"].startswith("application/x-ndjson")
    parts = [ollama.ChatResponse.model_validate_json(line) for line in streamed.text.splitlines()]
    assert "".join(p.message.content or "" for p in parts) == reply.message.content
    assert parts[-1].done is True
    generated = post(
        api,
        "/api/generate",
        {"model": "fake", "prompt": "abc", "stream": False, "options": options},
    )
    assert (
        ollama.GenerateResponse.model_validate(generated.json()).response == reply.message.content
    )


def test_no_prompt_only_loads_the_model(api: TestClient) -> None:
    chat_load = post(api, "/api/chat", {"model": "fake", "messages": []}).json()
    assert (chat_load["done"], chat_load["done_reason"]) == (True, "load")
    generate_load = post(api, "/api/generate", {"model": "fake"}).json()
    assert (generate_load["response"], generate_load["done_reason"]) == ("", "load")
    still_loading = post(api, "/api/generate", {"model": "later"})
    assert still_loading.status_code == 503


def test_num_ctx_beyond_the_loaded_context_is_a_400(api: TestClient) -> None:
    body = {"model": "fake", "prompt": "abc", "stream": False}
    ok = post(api, "/api/generate", {**body, "options": {"num_ctx": 512, "num_predict": 2}})
    assert ok.status_code == 200
    refused = post(api, "/api/generate", {**body, "options": {"num_ctx": 513}})
    assert refused.status_code == 400
    assert "num_ctx" in refused.json()["error"]


def test_errors_are_ollamas_plain_shape(api: TestClient) -> None:
    unknown = post(api, "/api/chat", {"model": "nope", "messages": []})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "model 'nope' not found"}
    malformed = api.post(
        "/api/chat", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    assert isinstance(malformed.json()["error"], str)
    load_time = post(
        api,
        "/api/chat",
        {
            "model": "fake",
            "messages": [{"role": "user", "content": "a"}],
            "options": {"num_gpu": 1},
        },
    )
    assert load_time.status_code == 400
    assert "num_gpu" in load_time.json()["error"]
    wrong_kind = post(api, "/api/embed", {"model": "fake", "input": "a"})
    assert wrong_kind.status_code == 400


def test_the_model_listings_parse_with_the_clients_types(api: TestClient) -> None:
    tags = ollama.ListResponse.model_validate(api.get("/api/tags").json())
    assert [m.model for m in tags.models] == ["fake:latest", "minilm:latest"]
    ps = ollama.ProcessResponse.model_validate(api.get("/api/ps").json())
    assert [(m.model, m.context_length) for m in ps.models] == [
        ("fake:latest", 512),
        ("minilm:latest", 256),
    ]
    llm = ollama.ShowResponse.model_validate(post(api, "/api/show", {"model": "fake"}).json())
    assert llm.capabilities == ["completion", "tools"]
    assert llm.template == "{{ .Prompt }}"  # the fake's template is the content itself
    assert llm.parameters is not None
    assert "num_ctx" in llm.parameters
    embedder = ollama.ShowResponse.model_validate(
        post(api, "/api/show", {"name": "minilm:latest"}).json()
    )
    assert embedder.capabilities == ["embedding"]
    assert embedder.modelinfo is not None
    assert embedder.modelinfo["onnx.embedding_length"] == 384
    assert api.get("/api/version").json()["version"]


def test_embed_answers_one_vector_per_input_and_refuses_what_it_cannot_do(
    api: TestClient,
) -> None:
    reply = ollama.EmbedResponse.model_validate(
        post(api, "/api/embed", {"model": "minilm", "input": ["a b", "c"]}).json()
    )
    assert [len(v) for v in reply.embeddings] == [384, 384]
    assert reply.prompt_eval_count == 3
    assert (
        post(api, "/api/embed", {"model": "minilm", "input": "a", "dimensions": 8}).status_code
        == 400
    )
    long_text = " ".join(["w"] * 300)  # the fake counts words; MiniLM's limit is 256 tokens
    cut = post(api, "/api/embed", {"model": "minilm", "input": ["a", long_text], "truncate": False})
    assert cut.status_code == 400
    assert "input[1]" in cut.json()["error"]


class Echo(BaseModel):
    model: str


def test_an_ollama_body_is_read_as_json_whatever_its_content_type() -> None:
    """``curl -d '{...}'`` sends form encoding; Ollama reads JSON anyway, and so does /api/."""
    app = FastAPI()
    app.add_middleware(OllamaJsonBody)

    @app.post("/api/echo")
    @app.post("/v1/echo")
    def echo(body: Echo) -> dict[str, str]:
        return {"model": body.model}

    form = {"content-type": "application/x-www-form-urlencoded"}
    with TestClient(app) as client:
        assert client.post("/api/echo", content='{"model": "m"}', headers=form).json() == {
            "model": "m"
        }
        assert client.post("/api/echo", content='{"model": "m"}').status_code == 200
        assert client.post("/v1/echo", content='{"model": "m"}', headers=form).status_code == 422
