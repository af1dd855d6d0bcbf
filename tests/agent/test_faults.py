"""Fault injection: a FaultyDecoder under a real BatchScheduler, and the /v1/faults routes.

The fake decoder stands in for llama.cpp; the fake ``sleep`` and seeded ``draw`` stand in
for the clock and the dice, so nothing here depends on wall-clock timing. Every wait
has a deadline (:data:`WITHIN_S`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

import agent.serving.faults
from agent.api.deps import get_state
from agent.api.errors import install_error_handlers
from agent.api.faults import router
from agent.errors import ModelFailed
from agent.runtime.llama_cpp import BatchEntry
from agent.serving.faults import Fault, FaultInjector, FaultyDecoder
from agent.serving.registry import ModelRegistry
from agent.serving.scheduler import BatchScheduler, GenerationRequest
from models.manifest import ModelFormat, ModelManifest
from models.policy import FailureKind
from tests.fakes.decoder import FakeDecoder
from tests.fakes.models import FakeModel
from tests.polling import in_time

WITHIN_S = 10.0  # seconds; each wait here takes milliseconds


class FakeSleep:
    """Records the delays asked for instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def never_drawn() -> float:
    raise AssertionError("a rate of 0 or 1 must not draw a random number")


@pytest.fixture
def injector() -> FaultInjector:
    return FaultInjector()


@pytest.fixture
def sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
def fake() -> FakeDecoder:
    return FakeDecoder(slots=2, n_ctx=64, n_batch=32)


@pytest.fixture
def sched(fake: FakeDecoder, injector: FaultInjector, sleep: FakeSleep) -> Iterator[BatchScheduler]:
    s = BatchScheduler(FaultyDecoder(fake, injector, sleep=sleep, draw=never_drawn), queue_size=8)
    yield s
    s.close()


def req(text: str, max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(
        prompt=FakeDecoder().tokenize(text, special=False), max_tokens=max_tokens
    )


async def stream(sched: BatchScheduler, request: GenerationRequest) -> tuple[list[str], Exception]:
    """The text deltas a request streamed before it failed, and its error."""
    parts: list[str] = []
    gen = sched.submit(request)

    async def consume() -> None:
        async for part in gen:
            parts.append(part)

    try:
        await in_time(consume(), "the generation to end", within_s=WITHIN_S)
    except ModelFailed as exc:
        return parts, exc
    raise AssertionError(f"the request did not fail; it streamed {''.join(parts)!r}")


def complete(sched: BatchScheduler, request: GenerationRequest) -> str:
    async def go() -> str:
        gen = sched.submit(request)
        return (await in_time(gen.complete(), "the generation to finish", within_s=WITHIN_S)).text

    return asyncio.run(go())


def clean_text(request: GenerationRequest) -> str:
    """What the model answers with no fault set."""
    sched = BatchScheduler(FakeDecoder(slots=2, n_ctx=64, n_batch=32))
    try:
        return complete(sched, request)
    finally:
        sched.close()


# -- the decoder under a scheduler -----------------------------------------------------


@pytest.mark.parametrize(
    "kind", [FailureKind.ERROR, FailureKind.OUT_OF_MEMORY, FailureKind.GPU_FAULT]
)
def test_rate_one_fails_every_request_with_the_fault_kind(
    sched: BatchScheduler, injector: FaultInjector, kind: FailureKind
) -> None:
    injector.set("fake", Fault(error_rate=1.0, failure=kind))

    async def both() -> list[tuple[list[str], Exception]]:
        return list(await asyncio.gather(stream(sched, req("hello")), stream(sched, req("world"))))

    for parts, exc in asyncio.run(both()):
        assert parts == []
        assert isinstance(exc, ModelFailed)
        assert exc.failure is kind
        assert exc.message.startswith(f"injected fault: {kind.value} in model 'fake'")
    assert sched.steps == 0  # the real decode never ran


def test_after_steps_fails_a_stream_midway(sched: BatchScheduler, injector: FaultInjector) -> None:
    request = req("hello", max_tokens=10)
    full = clean_text(request)
    injector.set("fake", Fault(error_rate=1.0, failure=FailureKind.GPU_FAULT, after_steps=4))
    parts, exc = asyncio.run(stream(sched, request))
    # step 1 decodes the prompt and samples the first token; steps 2-4 one token each
    assert len(parts) == 4
    assert "".join(parts) == full[:4]
    assert isinstance(exc, ModelFailed)
    assert exc.failure is FailureKind.GPU_FAULT
    assert "decode step 5 since the fault was set" in exc.message


def test_the_fault_stays_until_cleared_and_then_answers_are_normal(
    sched: BatchScheduler, injector: FaultInjector
) -> None:
    request = req("edge fleet")
    injector.set("fake", Fault(error_rate=1.0))
    for _ in range(2):
        _, exc = asyncio.run(stream(sched, request))
        assert isinstance(exc, ModelFailed)
    assert injector.clear("fake") is True
    assert injector.get("fake") is None
    assert complete(sched, request) == clean_text(request)


def test_a_fault_on_another_model_leaves_this_one_alone(
    sched: BatchScheduler, injector: FaultInjector, sleep: FakeSleep
) -> None:
    injector.set("other", Fault(error_rate=1.0, delay_s=5.0))
    request = req("hello")
    assert complete(sched, request) == clean_text(request)
    assert sleep.calls == []


def test_delay_sleeps_before_every_step_and_the_answer_is_unchanged(
    sched: BatchScheduler, injector: FaultInjector, sleep: FakeSleep
) -> None:
    request = req("hello", max_tokens=3)
    injector.set("fake", Fault(delay_s=2.5))
    assert complete(sched, request) == clean_text(request)
    assert sleep.calls == [2.5] * sched.steps
    assert sched.steps == 3  # the prompt with the first token, then one step per token


def test_a_delayed_failing_step_sleeps_first(
    sched: BatchScheduler, injector: FaultInjector, sleep: FakeSleep
) -> None:
    injector.set("fake", Fault(error_rate=1.0, delay_s=1.5, failure=FailureKind.OUT_OF_MEMORY))
    _, exc = asyncio.run(stream(sched, req("hello")))
    assert isinstance(exc, ModelFailed)
    assert exc.failure is FailureKind.OUT_OF_MEMORY
    assert sleep.calls == [1.5]


# -- the decoder alone: step counting and the dice --------------------------------------


def step_entry(fake: FakeDecoder) -> BatchEntry:
    """One token for sequence 0 at the end of what its KV holds."""
    return BatchEntry(0, [1], len(fake.kv[0]), True)


def outcomes(decoder: FaultyDecoder, fake: FakeDecoder, n: int) -> list[bool]:
    """For ``n`` steps: whether each one failed."""
    failed = []
    for _ in range(n):
        try:
            decoder.decode([step_entry(fake)])
        except ModelFailed:
            failed.append(True)
        else:
            failed.append(False)
    return failed


def test_fractional_rate_follows_the_seeded_dice(injector: FaultInjector) -> None:
    fake = FakeDecoder()
    decoder = FaultyDecoder(fake, injector, sleep=FakeSleep(), draw=random.Random(42).random)
    injector.set("fake", Fault(error_rate=0.3, after_steps=2))
    got = outcomes(decoder, fake, 200)
    dice = random.Random(42)
    expected = [False, False] + [dice.random() < 0.3 for _ in range(198)]
    assert got == expected
    assert 20 < sum(got) < 100  # about 30 % of 198, not all or nothing
    assert len(fake.kv[0]) == got.count(False)  # a failed step never reached the model


def test_rates_zero_and_one_are_deterministic(injector: FaultInjector) -> None:
    fake = FakeDecoder()
    decoder = FaultyDecoder(fake, injector, sleep=FakeSleep(), draw=never_drawn)
    injector.set("fake", Fault(error_rate=0.0, delay_s=0.1))
    assert outcomes(decoder, fake, 5) == [False] * 5
    injector.set("fake", Fault(error_rate=1.0))
    assert outcomes(decoder, fake, 5) == [True] * 5


def test_setting_a_fault_again_restarts_its_step_count(injector: FaultInjector) -> None:
    fake = FakeDecoder()
    decoder = FaultyDecoder(fake, injector, sleep=FakeSleep(), draw=never_drawn)
    fault = Fault(error_rate=1.0, after_steps=2)
    injector.set("fake", fault)
    assert outcomes(decoder, fake, 3) == [False, False, True]
    injector.set("fake", fault)
    assert outcomes(decoder, fake, 3) == [False, False, True]


def test_the_wrapper_is_transparent_without_a_fault(injector: FaultInjector) -> None:
    fake = FakeDecoder(slots=3, n_ctx=48, n_batch=16)
    decoder = FaultyDecoder(fake, injector)
    assert (decoder.n_slots, decoder.n_ctx_slot, decoder.n_batch, decoder.n_vocab) == (
        3,
        48,
        16,
        fake.n_vocab,
    )
    assert decoder.manifest is fake.manifest
    assert decoder.tokenize("abc", special=False) == [1, 2, 3]
    assert decoder.piece(2) == b"b"
    assert decoder.is_eog(0)
    assert decoder.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    decoder.close()
    assert fake.closed


def test_set_and_clear_log_warnings(
    injector: FaultInjector, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.serving.faults"):
        injector.set("fake", Fault(error_rate=0.5))
        assert injector.clear("fake") is True
        assert injector.clear("fake") is False
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2
    assert "set on model 'fake'" in messages[0]
    assert '"error_rate":0.5' in messages[0]
    assert "cleared on model 'fake'" in messages[1]


@pytest.mark.parametrize(
    ("field", "value"),
    [("error_rate", 1.5), ("error_rate", -0.1), ("delay_s", 31.0), ("after_steps", -1)],
)
def test_fault_refuses_out_of_range_values(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        Fault.model_validate({field: value})


def test_public_api() -> None:
    assert sorted(agent.serving.faults.__all__) == sorted(
        ["MAX_DELAY_S", "Fault", "FaultInjector", "FaultyDecoder"]
    )


# -- the routes --------------------------------------------------------------------------


def manifest(name: str) -> ModelManifest:
    return ModelManifest(
        name=name,
        version="1",
        format=ModelFormat.GGUF,
        file="m.gguf",
        sha256="0" * 64,
        size_bytes=1,
    )


@pytest.fixture
def registry() -> Iterator[ModelRegistry]:
    reg = ModelRegistry()
    reg.publish("gemma", FakeModel(manifest("gemma")))
    reg.expect("loading")
    reg.fail("broken", "the file is corrupt")
    yield reg
    reg.close()


def make_client(
    registry: ModelRegistry, faults: FaultInjector | None, api_keys: list[str] | None = None
) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    state = SimpleNamespace(
        registry=registry,
        settings=SimpleNamespace(api_keys=[SecretStr(k) for k in api_keys or []]),
        faults=faults,
    )
    app.dependency_overrides[get_state] = lambda: state
    return TestClient(app)


@pytest.fixture
def client(registry: ModelRegistry, injector: FaultInjector) -> TestClient:
    return make_client(registry, injector)


def test_put_list_and_delete(client: TestClient, injector: FaultInjector) -> None:
    body = {"error_rate": 1.0, "failure": "out_of_memory", "after_steps": 3}
    put = client.put("/v1/faults/gemma", json=body)
    assert put.status_code == 200, put.text
    assert put.json() == {**body, "delay_s": 0.0}
    assert injector.get("gemma") == Fault(
        error_rate=1.0, failure=FailureKind.OUT_OF_MEMORY, after_steps=3
    )
    for name in ("loading", "broken"):  # a fault can wait for a model still loading
        assert client.put(f"/v1/faults/{name}", json={"delay_s": 2}).status_code == 200
    listed = client.get("/v1/faults")
    assert listed.status_code == 200
    assert listed.json() == {
        "broken": Fault(delay_s=2).model_dump(mode="json"),
        "gemma": {**body, "delay_s": 0.0},
        "loading": Fault(delay_s=2).model_dump(mode="json"),
    }
    gone = client.delete("/v1/faults/gemma")
    assert gone.status_code == 204
    assert gone.content == b""
    assert injector.get("gemma") is None
    again = client.delete("/v1/faults/gemma")
    assert again.status_code == 404
    assert "no fault is set on model 'gemma'" in again.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"delay_s": 60}, "delay_s"),
        ({"after_steps": -2}, "after_steps"),
        ({"failure": "meltdown"}, "failure"),
        ({"error_rate": 0.5, "bogus": True}, "bogus"),
    ],
)
def test_put_rejects_a_bad_fault_naming_the_field(
    client: TestClient, injector: FaultInjector, body: dict[str, object], field: str
) -> None:
    response = client.put("/v1/faults/gemma", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field
    assert field in error["message"]
    assert injector.all() == {}


def test_put_on_an_unknown_model_is_404(client: TestClient, injector: FaultInjector) -> None:
    response = client.put("/v1/faults/nope", json={"error_rate": 1.0})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert injector.all() == {}


def test_routes_answer_404_when_fault_injection_is_disabled(registry: ModelRegistry) -> None:
    client = make_client(registry, None)
    for response in (
        client.get("/v1/faults"),
        client.put("/v1/faults/gemma", json={"error_rate": 1.0}),
        client.delete("/v1/faults/gemma"),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["message"] == "fault injection is disabled"


def test_routes_need_the_api_key(registry: ModelRegistry, injector: FaultInjector) -> None:
    client = make_client(registry, injector, api_keys=["sesame"])
    assert client.get("/v1/faults").status_code == 401
    assert client.put("/v1/faults/gemma", json={"error_rate": 1.0}).status_code == 401
    assert injector.all() == {}
    ok = client.put(
        "/v1/faults/gemma", json={"error_rate": 1.0}, headers={"Authorization": "Bearer sesame"}
    )
    assert ok.status_code == 200
