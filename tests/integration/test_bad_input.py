"""Hostile and malformed requests: each gets a clear 4xx and the agent keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import AgentProcess

pytestmark = pytest.mark.integration

LLM = "gemma3-270m"
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


def ok_chat() -> dict[str, object]:
    return {"model": LLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


CASES: list[tuple[str, str, bytes | dict[str, object], int, str]] = [
    ("malformed json", CHAT, b'{"model": "gemma3-270m", "messages": [', 400, "not valid JSON"),
    ("json that is not an object", CHAT, b"[1, 2, 3]", 400, "must be a JSON object"),
    ("messages wrong type", CHAT, {"model": LLM, "messages": "hello"}, 400, "messages"),
    ("empty messages", CHAT, {"model": LLM, "messages": []}, 400, "messages"),
    ("missing model", CHAT, {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    (
        "unknown role",
        CHAT,
        {"model": LLM, "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "role",
    ),
    ("unknown model", CHAT, {**ok_chat(), "model": "no-such-model"}, 404, "does not exist"),
    ("negative max_tokens", CHAT, {**ok_chat(), "max_tokens": -5}, 400, "max_tokens"),
    ("absurd max_tokens", CHAT, {**ok_chat(), "max_tokens": 10**12}, 400, "max_tokens"),
    ("max_tokens wrong type", CHAT, {**ok_chat(), "max_tokens": "lots"}, 400, "max_tokens"),
    ("temperature out of range", CHAT, {**ok_chat(), "temperature": 7}, 400, "temperature"),
    ("n above the limit", CHAT, {**ok_chat(), "n": 17}, 400, "'n'"),
    ("too many stops", CHAT, {**ok_chat(), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("tool without a function", CHAT, {**ok_chat(), "tools": [{"type": "function"}]}, 400, "tools"),
    (
        "schema that is not an object",
        CHAT,
        {
            **ok_chat(),
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": 3}},
        },
        400,
        "schema",
    ),
    (
        "top_logprobs out of range",
        CHAT,
        {**ok_chat(), "logprobs": True, "top_logprobs": 99},
        400,
        "top_logprobs",
    ),
    (
        "echo with logprobs",
        "/v1/completions",
        {"model": LLM, "prompt": "x", "echo": True, "logprobs": 1},
        400,
        "echo",
    ),
    ("grammar that does not parse", CHAT, {**ok_chat(), "grammar": "root ::= ("}, 400, "grammar"),
    (
        "invalid utf-8",
        CHAT,
        b'{"model": "gemma3-270m", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        "",
    ),
    (
        "lone surrogate",
        CHAT,
        b'{"model": "gemma3-270m", "max_tokens": 2, '
        b'"messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
        "Unicode",
    ),
    (
        "token ids out of range",
        "/v1/completions",
        {"model": LLM, "prompt": [1, 99999999]},
        400,
        "token ids",
    ),
    ("empty prompt list", "/v1/completions", {"model": LLM, "prompt": []}, 400, "prompt"),
    (
        "embedding input wrong type",
        "/v1/embeddings",
        {"model": "minilm", "input": 42},
        400,
        "input",
    ),
    (
        "embedding dimensions mismatch",
        "/v1/embeddings",
        {"model": "minilm", "input": "x", "dimensions": 12},
        400,
        "384",
    ),
    ("unknown route", "/v1/nothing-here", {}, 404, "Not Found"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_gets_a_clear_openai_error(
    agent: AgentProcess, path: str, body: bytes | dict[str, object], status: int, needle: str
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(f"{agent.url}{path}", content=body, headers=JSON, timeout=30)
    else:
        r = httpx.post(f"{agent.url}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"]
    # and the agent still serves everyone else
    assert httpx.post(f"{agent.url}{CHAT}", json=ok_chat(), timeout=60).status_code == 200


def test_oversized_body_is_refused_before_it_is_read(agent: AgentProcess) -> None:
    huge = b'{"model": "gemma3-270m", "prompt": "' + b"x" * (5 * 2**20) + b'"}'
    r = httpx.post(f"{agent.url}/v1/completions", content=huge, headers=JSON, timeout=30)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_oversized_chunked_body_is_refused(agent: AgentProcess) -> None:
    def chunks():  # no Content-Length: the limit must be counted while reading
        yield b'{"model": "gemma3-270m", "prompt": "'
        for _ in range(6):
            yield b"x" * 2**20
        yield b'"}'

    r = httpx.post(f"{agent.url}/v1/completions", content=chunks(), headers=JSON, timeout=30)
    assert r.status_code == 413
    assert "larger than" in r.json()["error"]["message"]


def test_kserve_errors_use_the_open_inference_protocol_shape(agent: AgentProcess) -> None:
    r = httpx.post(
        f"{agent.url}/v2/models/minilm/infer", json={"inputs": [{"name": "nope"}]}, timeout=30
    )
    assert r.status_code == 400
    assert isinstance(r.json()["error"], str)
    r = httpx.get(f"{agent.url}/v2/models/unknown", timeout=30)
    assert r.status_code == 404
