"""The official openai client, unmodified, against a real agent serving real models."""

from __future__ import annotations

import math

import openai
import pytest

from tests.conftest import AgentProcess

pytestmark = pytest.mark.integration

LLM = "gemma3-270m"


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0)


def test_lists_both_models_with_where_they_run(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {LLM, "minilm"}
    extra = models[LLM].model_extra or {}
    assert extra["edgefleet"]["runtime"] == "llama.cpp"
    assert extra["edgefleet"]["device"] == "cpu"


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=LLM,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
        ],
        max_tokens=12,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert reply.usage is not None
    assert reply.usage.completion_tokens <= 12
    assert reply.usage.prompt_tokens > 5
    assert reply.id.startswith("chatcmpl-")


def test_streamed_chat_matches_the_unstreamed_text(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write a sentence about rivers."}]
    whole = client.chat.completions.create(
        model=LLM, messages=messages, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    stream = client.chat.completions.create(
        model=LLM,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content
    assert text.startswith(whole.choices[0].message.content)  # greedy: 20 tokens are a prefix of 24
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 24


def test_streamed_text_completion(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=LLM, prompt="The sky is", max_tokens=8, temperature=0, stream=True
    )
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert len(pieces) >= 2
    assert "".join(pieces).strip()


def test_embeddings_base64_default_and_float(client: openai.OpenAI) -> None:
    texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "A man is riding a horse.",
    ]
    default = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    vectors = [d.embedding for d in default.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-3) for v in vectors)
    assert all(
        math.isclose(a, b, abs_tol=1e-6)
        for va, vb in zip(vectors, (d.embedding for d in floats.data), strict=True)
        for a, b in zip(va, vb, strict=True)
    )

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    assert default.usage.prompt_tokens > 0


def test_unknown_model_is_a_not_found_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_embedding_model_refuses_chat_and_llm_refuses_embeddings(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not support"):
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="does not support"):
        client.embeddings.create(model=LLM, input="hi")
