"""The fallback walker on fake models: tiers, breakers, continuation and the final 503."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from agent.errors import ContextOverflow, Degraded, ModelFailed
from agent.serving.breaker import Transition
from agent.serving.degraded import DegradedMode
from agent.serving.fallback import Answer, Started
from agent.serving.faults import Fault, FaultInjector, FaultyDecoder
from agent.serving.registry import ModelRegistry
from agent.serving.scheduler import BatchScheduler, GenerationRequest
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
from models.wire import BreakerState
from tests.fakes.decoder import FakeDecoder
from tests.fakes.word_embedder import WordEmbedder, embedder_manifest

BREAKER = BreakerSettings(
    failure_rate_threshold=50,
    minimum_calls=2,
    sliding_window=4,
    wait_in_open=30,
    permitted_calls_in_half_open=1,
)
RULES = RulesTier(rules=(Rule(keywords=("router",), answer="Unplug it for ten seconds."),))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fake(name: str, *, n_ctx: int = 64) -> FakeDecoder:
    decoder = FakeDecoder(n_ctx=n_ctx, eog_after=None)
    decoder._manifest = decoder.manifest.model_copy(update={"name": name})
    return decoder


class World:
    """Two fake GGUF models (big, small), a fake embedder, faults, and a policy."""

    def __init__(self, chain: Chain | None) -> None:
        self.clock = Clock()
        self.faults = FaultInjector()
        self.registry = ModelRegistry()
        self.mode = DegradedMode(clock=self.clock)
        self.mode.set_policy(
            FallbackPolicy(name="test", version=1, breaker=BREAKER, chains={"big": chain})
            if chain is not None
            else None,
            "test",
        )
        self.moves: list[Transition] = []
        self.mode.listeners.append(self.moves.append)
        self.decoders = {name: fake(name) for name in ("big", "small")}
        for name, decoder in self.decoders.items():
            self.registry.publish(name, BatchScheduler(FaultyDecoder(decoder, self.faults)))
        self.embedder = WordEmbedder(embedder_manifest("words"))
        self.registry.publish("words", self.embedder)
        self.chain = chain
        self.asked = ""
        self.max_tokens = 8

    def close(self) -> None:
        self.registry.close()

    async def start(self, name: str, sent: str) -> Started:
        stack = ExitStack()
        try:
            sched = stack.enter_context(self.registry.lease(name, BatchScheduler))
            prompt = sched.decoder.tokenize(self.asked + sent, special=False)
            if len(prompt) + self.max_tokens > sched.context_length:
                raise ContextOverflow("prompt too long", param="prompt")
            gen = sched.submit(GenerationRequest(prompt=prompt, max_tokens=self.max_tokens))
        except BaseException:
            stack.close()
            raise
        return Started(gen, None, stack.close)

    def answer(
        self, text: str = "how do I reset the router", *, constrained: bool = False
    ) -> Answer:
        self.asked = text.replace(" ", "")
        chain = self.mode.chain("big")
        return Answer(
            "big", chain, text, self.mode, self.registry, self.start, constrained=constrained
        )

    def ask(
        self, text: str = "how do I reset the router", *, constrained: bool = False
    ) -> tuple[str, Answer]:
        answer = self.answer(text, constrained=constrained)

        async def run() -> str:
            return "".join([delta async for delta in answer])

        return asyncio.run(run()), answer


@pytest.fixture
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    chain = getattr(request, "param", Chain(tiers=(ModelTier(model="small"), RULES)))
    w = World(chain)
    yield w
    w.close()


def test_a_healthy_primary_answers_and_is_not_marked_degraded(world: World) -> None:
    text, answer = world.ask()
    assert len(text) == 8
    assert answer.served is not None
    assert (answer.served.by, answer.served.tier, answer.served.degraded) == (
        "big",
        "primary",
        False,
    )
    assert answer.served.headers()["X-Edgefleet-Degraded"] == "false"
    assert world.mode.breaker("big").state is BreakerState.CLOSED


def test_a_failing_primary_falls_back_then_its_breaker_opens_and_is_skipped(world: World) -> None:
    world.faults.set("big", Fault(error_rate=1.0))
    for _ in range(2):
        text, answer = world.ask()
        assert len(text) == 8
        assert answer.served is not None
        assert (answer.served.by, answer.served.tier, answer.served.degraded) == (
            "small",
            "model",
            True,
        )
        assert "injected fault" in (answer.served.reason or "")
        assert answer.served.failover_ms is not None  # the primary failed in this request
        assert answer.served.mark()["failover_ms"] == round(answer.served.failover_ms, 1)
    assert [(m.model, m.new) for m in world.moves] == [("big", BreakerState.OPEN)]
    assert world.moves[0].kind is FailureKind.ERROR
    decoded = world.decoders["big"].decoded_tokens
    _, answer = world.ask()  # the open breaker sends it straight to the fallback
    assert answer.served is not None
    assert answer.served.by == "small"
    assert "breaker open" in (answer.served.reason or "")
    assert answer.served.failover_ms is None  # nothing failed in this request
    assert world.decoders["big"].decoded_tokens == decoded
    assert [d.name for d in world.mode.degraded()] == ["big"]


def test_half_open_probes_bring_the_primary_back(world: World) -> None:
    world.faults.set("big", Fault(error_rate=1.0))
    world.ask()
    world.ask()
    assert world.mode.breaker("big").state is BreakerState.OPEN
    world.faults.clear("big")
    world.clock.now += 31  # past wait_in_open
    _, answer = world.ask()
    assert answer.served is not None
    assert answer.served.tier == "primary"
    assert [m.new for m in world.moves] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]
    assert world.mode.degraded() == []


def test_a_failed_half_open_probe_opens_again_and_the_request_still_gets_an_answer(
    world: World,
) -> None:
    world.faults.set("big", Fault(error_rate=1.0))
    world.ask()
    world.ask()
    world.clock.now += 31
    _, answer = world.ask()
    assert answer.served is not None
    assert answer.served.by == "small"
    assert world.mode.breaker("big").state is BreakerState.OPEN


def test_a_stream_failing_midway_is_continued_by_the_next_model(world: World) -> None:
    world.faults.set("big", Fault(error_rate=1.0, after_steps=3))
    answer = world.answer()

    async def run() -> list[tuple[str, str]]:
        out = []
        async for delta in answer:
            assert answer.served is not None
            out.append((delta, answer.served.by))
        return out

    deltas = asyncio.run(run())
    by = [who for _, who in deltas]
    assert by[0] == "big"
    assert by[-1] == "small"
    assert answer.result is not None
    assert answer.result.text == "".join(d for d, _ in deltas)
    # the continuation's prompt is the question plus what the primary had already sent
    partial = "".join(d for d, who in deltas if who == "big")
    assert len(partial) == 3
    expected = world.decoders["small"].tokenize(world.asked + partial, special=False)
    assert any(t[: len(expected)] == expected for t in world.decoders["small"].kv.values())


@pytest.mark.parametrize("world", [Chain(tiers=(RULES,))], indirect=True)
def test_a_stream_failing_midway_without_a_model_tier_ends_with_the_error(world: World) -> None:
    world.faults.set("big", Fault(error_rate=1.0, after_steps=3))
    answer = world.answer()

    async def run() -> list[str]:
        return [delta async for delta in answer]

    with pytest.raises(ModelFailed, match="injected fault"):
        asyncio.run(run())


@pytest.mark.parametrize("world", [Chain(tiers=(RULES,))], indirect=True)
def test_the_rules_tier_answers_by_keyword(world: World) -> None:
    world.faults.set("big", Fault(error_rate=1.0))
    text, answer = world.ask("my router blinks")
    assert text == "Unplug it for ten seconds."
    assert answer.served is not None
    assert (answer.served.by, answer.served.tier) == (
        "rules",
        "rules",
    )


@pytest.mark.parametrize("world", [Chain(tiers=(RULES,))], indirect=True)
def test_a_constrained_request_never_takes_a_rules_answer_that_cannot_match_its_grammar(
    world: World,
) -> None:
    world.faults.set("big", Fault(error_rate=1.0))
    with pytest.raises(Degraded, match="big and its fallbacks could not answer"):
        world.ask("my router blinks", constrained=True)


def test_a_constrained_stream_failing_midway_is_not_continued_by_another_model(
    world: World,
) -> None:
    world.faults.set("big", Fault(error_rate=1.0, after_steps=3))
    answer = world.answer(constrained=True)

    async def run() -> list[str]:
        return [delta async for delta in answer]

    with pytest.raises(ModelFailed, match="injected fault"):
        asyncio.run(run())
    assert not any(world.decoders["small"].kv.values())  # the small model never started


def test_a_constrained_request_failing_before_any_text_is_answered_afresh_by_the_next_model(
    world: World,
) -> None:
    world.faults.set("big", Fault(error_rate=1.0))
    text, answer = world.ask(constrained=True)
    assert answer.served is not None
    assert answer.served.by == "small"
    assert text


@pytest.mark.parametrize("world", [Chain(tiers=(RULES,), retry_after=7)], indirect=True)
def test_when_every_tier_fails_the_answer_is_a_503_with_retry_after(world: World) -> None:
    world.faults.set("big", Fault(error_rate=1.0))
    with pytest.raises(Degraded) as caught:
        world.ask("what is the weather")
    assert caught.value.status == 503
    assert 1 <= caught.value.retry_after <= 7
    assert "no rule matched" in caught.value.message


@pytest.mark.parametrize(
    "world", [Chain(tiers=(CacheTier(embedder="words", threshold=0.8), RULES))], indirect=True
)
def test_the_cache_tier_answers_a_paraphrase_with_a_past_good_answer(world: World) -> None:
    good, _ = world.ask("how do I reset the modem")

    async def settle() -> None:  # the answer is remembered off the request path
        while len(world.mode.cache) == 0:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(settle(), 10))
    world.faults.set("big", Fault(error_rate=1.0))
    text, answer = world.ask("how do I reset the modem please")
    assert text == good
    assert answer.served is not None
    assert answer.served.tier == "cache"


def test_a_request_fault_is_not_the_models_failure_and_never_falls_back(world: World) -> None:
    with pytest.raises(ContextOverflow):
        world.ask("x" * 100)
    assert world.mode.breaker("big").view().calls == 0


@pytest.mark.parametrize(
    "world",
    [Chain(tiers=(ModelTier(model="small", when=(FailureKind.OUT_OF_MEMORY,)), RULES))],
    indirect=True,
)
def test_a_tier_limited_to_a_failure_kind_is_skipped_for_other_kinds(world: World) -> None:
    world.faults.set("big", Fault(error_rate=1.0, failure=FailureKind.ERROR))
    _, answer = world.ask("my router")
    assert answer.served is not None
    assert answer.served.tier == "rules"
    world.faults.set("big", Fault(error_rate=1.0, failure=FailureKind.OUT_OF_MEMORY))
    world.mode.set_policy(world.mode.policy, "again")
    world.clock.now += 31
    _, answer = world.ask("my router")
    assert answer.served is not None
    assert answer.served.by == "small"


@pytest.mark.parametrize("world", [None, Chain(tiers=(RULES,))], indirect=True)
def test_a_client_leaving_mid_stream_frees_the_slot(world: World) -> None:
    world.faults.set("big", Fault(delay_s=0.02))  # slow enough to leave in the middle
    world.max_tokens = 40
    answer = world.answer("leave")
    assert answer.alone is (world.chain is None)

    async def leave_after_one_delta() -> None:
        async def read() -> None:
            async for _ in answer:
                await asyncio.sleep(3600)  # the client stops reading; the server cancels

        task = asyncio.create_task(read())
        while answer.served is None:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with world.registry.lease("big", BatchScheduler) as sched:
            while sched.active:
                await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(leave_after_one_delta(), 10))
    assert world.decoders["big"].decoded_tokens < len(world.asked) + 20  # not all 40
