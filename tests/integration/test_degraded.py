"""Degraded mode on a real agent and the real Gemma: injected faults, served-by marks, recovery.

The primary is Gemma 3 270M; its warm fallback ("gemma-small") is the same GGUF file
served under a second name, since the bundled models hold no smaller Gemma. Faults
are injected through /v1/faults (``fault_injection = true``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from agent.store import ModelStore
from models.policy import (
    BreakerSettings,
    CacheTier,
    Chain,
    FailureKind,
    FallbackPolicy,
    ModelTier,
    Rule,
    RulesTier,
)
from tests.conftest import AgentProcess, start_agent
from tests.integration.test_serving import metric
from tests.polling import wait_until

pytestmark = pytest.mark.integration

PRIMARY, SMALL = "gemma3-270m", "gemma-small"
ROUTER_ANSWER = "Unplug the router for ten seconds, then plug it back in."
POLICY = FallbackPolicy(
    name="drill",
    version=1,
    breaker=BreakerSettings(
        failure_rate_threshold=50,
        slow_call_duration=1.0,
        slow_call_rate_threshold=50,
        minimum_calls=2,
        sliding_window=4,
        wait_in_open=2,
        permitted_calls_in_half_open=1,
    ),
    chains={
        PRIMARY: Chain(
            tiers=(
                ModelTier(model="gemma-tiny"),  # named, but not on this device: skipped
                ModelTier(model=SMALL),
                CacheTier(embedder="minilm", threshold=0.95),
                RulesTier(rules=(Rule(keywords=("router",), answer=ROUTER_ANSWER),)),
            ),
            retry_after=5,
        )
    },
)


def gemma_file(store: Path) -> Path:
    return ModelStore(store).resolve(PRIMARY)[1]


def agent_with(
    tmp: Path,
    store: Path,
    models: list[dict[str, Any]],
    policy: FallbackPolicy = POLICY,
    *,
    wait: bool = True,
    **settings: Any,
) -> AgentProcess:
    return start_agent(
        tmp,
        store,
        settings={"fault_injection": True, "queue_size": 2, **settings},
        models=models,
        env={"EDGEFLEET_AGENT_FALLBACK": policy.model_dump_json()},
        wait=wait,
    )


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[AgentProcess]:
    tmp = tmp_path_factory.mktemp("degraded")
    models = [
        {"name": PRIMARY},
        {"name": SMALL, "path": gemma_file(model_store)},
        {"name": "minilm"},
    ]
    agent = agent_with(tmp, model_store, models)
    yield agent
    agent.stop()


def chat(url: str, text: str = "Say hello", **extra: Any) -> httpx.Response:
    body = {"model": PRIMARY, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    return httpx.post(f"{url}/v1/chat/completions", json={**body, **extra}, timeout=120)


def served_by(response: httpx.Response) -> str:
    return response.headers["x-edgefleet-served-by"]


def set_fault(url: str, model: str, **fault: Any) -> None:
    httpx.put(f"{url}/v1/faults/{model}", json=fault, timeout=10).raise_for_status()


@pytest.fixture
def agent(drill: AgentProcess) -> Iterator[AgentProcess]:
    """The shared agent, healthy again after each test: faults cleared, primary serving."""
    yield drill
    for model in (PRIMARY, SMALL):
        httpx.delete(f"{drill.url}/v1/faults/{model}", timeout=10)
    seed = iter(range(10_000, 20_000))
    wait_until(
        lambda: served_by(chat(drill.url, seed=next(seed))) == PRIMARY,
        "the primary to answer again",
        within_s=60,
        every_s=0.2,
        detail=drill.tail,
    )


def test_a_failing_primary_is_answered_by_its_fallback_and_comes_back(agent: AgentProcess) -> None:
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="none", max_retries=0)
    healthy = client.chat.completions.with_raw_response.create(
        model=PRIMARY, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4
    )
    assert healthy.headers["x-edgefleet-degraded"] == "false"
    assert healthy.parse().model_extra["edgefleet"]["served_by"] == PRIMARY
    fallbacks_before = metric(agent.url, "edgefleet_fallbacks_total", 'tier="model"')

    set_fault(agent.url, PRIMARY, error_rate=1.0)
    for seed in (1, 2, 3):
        raw = client.chat.completions.with_raw_response.create(
            model=PRIMARY,
            messages=[{"role": "user", "content": "Say hi"}],
            max_tokens=4,
            seed=seed,
        )
        assert raw.status_code == 200
        assert raw.headers["x-edgefleet-served-by"] == SMALL
        assert raw.headers["x-edgefleet-degraded"] == "true"
        mark = raw.parse().model_extra["edgefleet"]
        assert (mark["served_by"], mark["tier"], mark["degraded"]) == (SMALL, "model", True)
        assert mark["reason"].startswith(PRIMARY)
        assert raw.parse().choices[0].message.content
    ready = agent.readiness("degraded", timeout=10)
    assert [d["model"] for d in ready["degraded"]] == [PRIMARY]
    assert ready["degraded"][0]["breaker"] == "open"
    assert ready["degraded"][0]["kind"] == "error"
    assert "injected fault" in ready["degraded"][0]["reason"]
    assert metric(agent.url, "edgefleet_breaker_state", f'model="{PRIMARY}",state="open"') == 1
    assert metric(agent.url, "edgefleet_fallbacks_total", 'tier="model"') - fallbacks_before == 3
    # The missing tier model was skipped with its reason, never answered.
    assert metric(agent.url, "edgefleet_breaker_state", 'model="gemma-tiny",state="closed"') == 1

    httpx.delete(f"{agent.url}/v1/faults/{PRIMARY}", timeout=10).raise_for_status()
    seed = iter(range(100, 1000))
    wait_until(
        lambda: served_by(chat(agent.url, seed=next(seed))) == PRIMARY,
        "half-open probes to bring the primary back",
        within_s=30,
        every_s=0.2,
    )
    agent.readiness("ready", timeout=10)
    assert metric(agent.url, "edgefleet_breaker_transitions_total", 'to="closed"') >= 1


def test_a_stream_failing_midway_is_continued_by_the_fallback(agent: AgentProcess) -> None:
    set_fault(agent.url, PRIMARY, error_rate=1.0, after_steps=4)
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="none", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model=PRIMARY,
        messages=[{"role": "user", "content": "Tell me about rivers"}],
        max_tokens=16,
        stream=True,
        seed=7,
    )
    chunks = list(stream)
    marks = [c.model_extra["edgefleet"] for c in chunks]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert marks[0]["served_by"] == PRIMARY
    assert marks[-1]["served_by"] == SMALL
    assert marks[-1]["degraded"] is True
    assert "injected fault" in marks[-1]["reason"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in {"stop", "length"}
    assert text.strip()


def test_latency_past_the_slow_call_threshold_opens_the_breaker(agent: AgentProcess) -> None:
    set_fault(agent.url, PRIMARY, delay_s=1.2)  # every decode step: the first token comes late
    first = [chat(agent.url, seed=s) for s in (21, 22)]
    assert [served_by(r) for r in first] == [PRIMARY, PRIMARY]  # slow, but answered
    ready = agent.readiness("degraded", timeout=10)
    assert ready["degraded"][0]["kind"] == "slow"
    assert "slow" in ready["degraded"][0]["reason"]
    after = chat(agent.url, seed=23)
    assert after.status_code == 200
    assert served_by(after) == SMALL


def test_an_overload_of_ten_times_the_slots_spills_over_and_nothing_hangs(
    agent: AgentProcess,
) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": PRIMARY, "max_tokens": 8}
            return await asyncio.gather(
                *(
                    client.post(
                        f"{agent.url}/v1/chat/completions",
                        json={
                            **body,
                            "messages": [{"role": "user", "content": f"my router {i} is down"}],
                        },
                    )
                    for i in range(80)  # 8 slots
                )
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 80
    tiers = [r.json()["edgefleet"]["tier"] for r in responses]
    assert "primary" in tiers
    assert "model" in tiers or "rules" in tiers  # the overflow went down the chain
    for response, tier in zip(responses, tiers, strict=True):
        assert (response.headers["x-edgefleet-degraded"] == "true") == (tier != "primary")
    spilled = [r for r, t in zip(responses, tiers, strict=True) if t == "rules"]
    assert all(r.json()["choices"][0]["message"]["content"] == ROUTER_ANSWER for r in spilled)


def test_when_every_tier_fails_the_client_gets_a_503_with_retry_after(agent: AgentProcess) -> None:
    set_fault(agent.url, PRIMARY, error_rate=1.0)
    set_fault(agent.url, SMALL, error_rate=1.0)
    response = chat(agent.url, "What is the capital of France?", seed=31)
    assert response.status_code == 503
    assert 1 <= int(response.headers["retry-after"]) <= 5
    error = response.json()["error"]
    assert error["code"] == "degraded_unavailable"
    assert "gemma-tiny" in error["message"]  # the missing model, named with its reason
    assert "no rule matched" in error["message"]


def test_the_rules_tier_answers_when_the_models_fail(agent: AgentProcess) -> None:
    set_fault(agent.url, PRIMARY, error_rate=1.0)
    set_fault(agent.url, SMALL, error_rate=1.0)
    response = chat(agent.url, "My router keeps blinking red", stream=True, seed=41)
    assert response.status_code == 200
    assert response.headers["x-edgefleet-served-by"] == "rules"
    events = [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")
    ]
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        == ROUTER_ANSWER
    )
    assert {e["edgefleet"]["tier"] for e in events} == {"rules"}


def test_a_corrupted_primary_file_is_served_by_its_fallback(
    tmp_path: Path, model_store: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    data = gemma_file(model_store).read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # truncated mid-tensor data
    agent = agent_with(
        tmp_path,
        model_store,
        [{"name": PRIMARY, "path": broken}, {"name": SMALL, "path": gemma_file(model_store)}],
        wait=False,
    )
    try:
        ready = agent.readiness("degraded", timeout=120)
        assert ready["degraded"][0]["model"] == PRIMARY
        assert ready["degraded"][0]["kind"] == "load_failed"
        response = chat(agent.url, seed=51)
        assert response.status_code == 200
        assert served_by(response) == SMALL
        assert "failed to load" in response.headers["x-edgefleet-degraded-reason"]
    finally:
        agent.stop()


def test_an_exhausted_memory_budget_goes_to_the_smaller_variant(
    tmp_path: Path, model_store: Path
) -> None:
    policy = POLICY.model_copy(
        update={
            "chains": {
                PRIMARY: Chain(
                    tiers=(
                        ModelTier(model=SMALL, when=(FailureKind.OUT_OF_MEMORY,)),
                        RulesTier(default="The assistant is unavailable."),
                    )
                )
            }
        }
    )
    gemma = gemma_file(model_store)
    agent = agent_with(
        tmp_path,
        model_store,
        [
            {"name": SMALL, "path": gemma, "runtime": {"context_length": 256, "parallel_slots": 1}},
            {"name": PRIMARY, "runtime": {"context_length": 32768, "parallel_slots": 4}},
        ],
        policy=policy,
        memory_budget_mb=int(gemma.stat().st_size * 2.5) >> 20,
        wait=False,
    )
    try:
        ready = agent.readiness("degraded", timeout=120)
        assert ready["degraded"][0]["kind"] == "out_of_memory"
        assert "memory budget" in ready["degraded"][0]["reason"]
        response = chat(agent.url, seed=61)
        assert response.status_code == 200
        assert served_by(response) == SMALL
    finally:
        agent.stop()
