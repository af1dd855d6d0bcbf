"""Continuous batching against the fake decoder: correctness of slots, queue and cancellation.

Every wait has a deadline (:data:`WITHIN_S`), so a scheduler bug fails a test with
what it waited for instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from agent.errors import (
    ContextOverflow,
    InvalidRequest,
    ModelFailed,
    ModelNotReady,
    Overloaded,
    RequestTimeout,
    Transient,
)
from agent.runtime.base import SamplingParams
from agent.serving.scheduler import (
    BatchScheduler,
    Generation,
    GenerationRequest,
    GenerationResult,
)
from tests.fakes.decoder import FakeDecoder
from tests.polling import eventually, in_time

WITHIN_S = 10.0  # seconds; each wait here takes milliseconds
PROMPTS = ["hello", "world wide", "abc", "the quick brown fox", "zz", "edge fleet", "q", "batching"]


@pytest.fixture
def decoder() -> FakeDecoder:
    return FakeDecoder(slots=4, n_ctx=64, n_batch=32)


@pytest.fixture
def sched(decoder: FakeDecoder) -> Iterator[BatchScheduler]:
    s = BatchScheduler(decoder, queue_size=8)
    yield s
    if decoder.step_gate is not None:
        decoder.step_gate.set()
    s.close()


def fresh_text(text: str, max_tokens: int) -> str:
    """What a scheduler with an empty cache generates for ``text``."""
    decoder = FakeDecoder()
    sched = BatchScheduler(decoder)
    try:
        return asyncio.run(run(sched, req(text, decoder, max_tokens=max_tokens)))[1].text
    finally:
        sched.close()


def req(text: str, decoder: FakeDecoder, **kw: object) -> GenerationRequest:
    params: dict[str, object] = {"max_tokens": 12}
    params.update(kw)
    return GenerationRequest(prompt=decoder.tokenize(text, special=False), **params)  # type: ignore[arg-type]


async def run(sched: BatchScheduler, request: GenerationRequest) -> tuple[str, GenerationResult]:
    gen = sched.submit(request)

    async def stream() -> list[str]:
        return [p async for p in gen]

    parts = await in_time(stream(), "the generation to finish", within_s=WITHIN_S)
    assert gen.result is not None
    return "".join(parts), gen.result


def test_generates_max_tokens_and_streams_the_same_text(
    sched: BatchScheduler, decoder: FakeDecoder
) -> None:
    streamed, result = asyncio.run(run(sched, req("hello", decoder, max_tokens=10)))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 10
    assert len(streamed) == 10
    assert streamed == result.text
    assert result.prompt_tokens == 5


def test_batched_output_equals_output_alone(decoder: FakeDecoder) -> None:
    alone_sched = BatchScheduler(FakeDecoder(slots=1), queue_size=8)
    try:
        alone = [asyncio.run(run(alone_sched, req(p, decoder)))[1].text for p in PROMPTS]
    finally:
        alone_sched.close()
    sched = BatchScheduler(decoder, queue_size=8)

    async def together() -> list[str]:
        results = await asyncio.gather(*(run(sched, req(p, decoder)) for p in PROMPTS))
        return [r.text for _, r in results]

    try:
        batched = asyncio.run(together())
    finally:
        sched.close()
    assert batched == alone


def test_eog_ends_generation_unless_ignored(decoder: FakeDecoder) -> None:
    decoder.eog_after = 8  # prompt of 5 + 3 generated
    sched = BatchScheduler(decoder)
    try:
        _, stopped = asyncio.run(run(sched, req("hello", decoder, max_tokens=20)))
        _, forced = asyncio.run(run(sched, req("world", decoder, max_tokens=20, ignore_eos=True)))
    finally:
        sched.close()
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens == 3
    assert forced.finish_reason == "length"
    assert forced.completion_tokens == 20


def test_stop_string_cuts_text_before_it(sched: BatchScheduler, decoder: FakeDecoder) -> None:
    _, full = asyncio.run(run(sched, req("hello", decoder, max_tokens=12)))
    stop = full.text[5:7]
    first = full.text.find(stop)
    streamed, result = asyncio.run(run(sched, req("hello", decoder, max_tokens=12, stop=(stop,))))
    assert result.finish_reason == "stop"
    assert result.text == full.text[:first]
    assert streamed == result.text


def test_prompt_prefix_is_reused_from_the_slot_cache(
    sched: BatchScheduler, decoder: FakeDecoder
) -> None:
    prompt = "a shared system prompt then a question"
    _, first = asyncio.run(run(sched, req(prompt, decoder, max_tokens=4)))
    before = decoder.decoded_tokens
    _, second = asyncio.run(run(sched, req(prompt + " more", decoder, max_tokens=4)))
    assert first.cached_tokens == 0
    assert second.cached_tokens >= len(prompt)
    assert second.text == fresh_text(prompt + " more", 4)
    # only what follows the reused chunks was decoded the second time
    assert decoder.decoded_tokens - before == second.prompt_tokens - second.cached_tokens + 3


def test_identical_prompt_reuses_all_but_one_token(
    sched: BatchScheduler, decoder: FakeDecoder
) -> None:
    _, first = asyncio.run(run(sched, req("repeat me", decoder, max_tokens=6)))
    _, second = asyncio.run(run(sched, req("repeat me", decoder, max_tokens=6)))
    assert second.cached_tokens == len("repeat me") - 1
    assert second.text == first.text


def test_next_chat_turn_reuses_the_previous_answer_from_the_cache(
    sched: BatchScheduler, decoder: FakeDecoder
) -> None:
    _, first = asyncio.run(run(sched, req("question", decoder, max_tokens=6)))
    follow_up = "question" + first.text + "and more"
    _, second = asyncio.run(run(sched, req(follow_up, decoder, max_tokens=3)))
    assert second.cached_tokens >= len("question") + 5  # the answer's tokens were in the KV cache
    assert second.text == fresh_text(follow_up, 3)


def test_long_prompt_is_prefilled_in_budgeted_chunks_without_stalling_others(
    decoder: FakeDecoder,
) -> None:
    decoder.n_ctx_slot = 256
    decoder.step_gate = threading.Event()
    sched = BatchScheduler(decoder)

    async def scenario() -> None:
        running = sched.submit(req("short", decoder, max_tokens=60, ignore_eos=True))
        # admitted; the decode thread now waits at the gate
        await eventually(
            lambda: sched.active, "the short request admitted", within_s=WITHIN_S, every_s=0.001
        )
        long = sched.submit(req("x" * 100, decoder, max_tokens=2))
        decoder.step_gate.set()
        await in_time(long.complete(), "the long prompt's answer", within_s=WITHIN_S)
        await in_time(running.complete(), "the running stream's answer", within_s=WITHIN_S)

    try:
        asyncio.run(scenario())
    finally:
        decoder.step_gate.set()
        sched.close()
    prefill = [call for call in decoder.calls if any(seq == 1 and n > 1 for seq, _, n in call)]
    assert len(prefill) >= 4  # 100 prompt tokens through a 32-token batch
    for call in prefill:
        assert sum(n for _, _, n in call) <= decoder.n_batch
        assert (0, 1) in [(seq, n) for seq, _, n in call], "the running stream was stalled"


def test_cancel_frees_the_slot_within_one_decode_step(decoder: FakeDecoder) -> None:
    decoder.n_slots = 1
    sched = BatchScheduler(decoder)

    async def scenario() -> tuple[int, str]:
        gen = sched.submit(req("long one", decoder, max_tokens=10_000, ignore_eos=True))
        it = gen.__aiter__()
        await in_time(it.__anext__(), "the first token", within_s=WITHIN_S)
        steps_at_cancel = sched.steps
        gen.cancel()
        await eventually(
            lambda: not sched.active,
            "the cancelled request's slot freed",
            within_s=WITHIN_S,
            every_s=0.001,
        )
        extra = sched.steps - steps_at_cancel
        _, other = await run(sched, req("next", decoder, max_tokens=3))
        return extra, other.text

    try:
        extra_steps, text = asyncio.run(scenario())
    finally:
        sched.close()
    assert extra_steps <= 1
    assert len(text) == 3


def test_full_queue_is_refused_with_retry_after(decoder: FakeDecoder) -> None:
    decoder.n_slots = 1
    decoder.step_gate = threading.Event()
    sched = BatchScheduler(decoder, queue_size=2)

    async def scenario() -> list[GenerationResult]:
        first = sched.submit(req("one", decoder))
        # the thread has admitted it and is blocked in decode
        await eventually(
            lambda: sched.active, "the first request admitted", within_s=WITHIN_S, every_s=0.001
        )
        queued = [sched.submit(req("two", decoder)), sched.submit(req("three", decoder))]
        with pytest.raises(Overloaded) as refused:
            sched.submit(req("four", decoder))
        assert refused.value.retry_after >= 1
        assert refused.value.status == 429
        decoder.step_gate.set()
        return [
            await in_time(g.complete(), f"answer {n} of 3", within_s=WITHIN_S)
            for n, g in enumerate((first, *queued), 1)
        ]

    try:
        results = asyncio.run(scenario())
    finally:
        decoder.step_gate.set()
        sched.close()
    assert [r.completion_tokens for r in results] == [12, 12, 12]


def test_a_burst_fills_free_slots_and_the_queue_whether_or_not_the_thread_admitted_yet(
    decoder: FakeDecoder,
) -> None:
    """Capacity is free slots plus queue room, however far the scheduler thread has got.

    Counting only the queue refused the second request of a burst whenever the
    thread had not yet moved the first into the free slot.
    """
    decoder.n_slots = 1
    decoder.step_gate = threading.Event()  # nothing finishes during the burst
    sched = BatchScheduler(decoder, queue_size=1)

    async def burst() -> tuple[list[Generation], int]:
        accepted: list[Generation] = []
        refused = 0
        for n in range(6):  # no await in between: the thread may or may not have admitted
            try:
                accepted.append(sched.submit(req(f"burst {n}", decoder)))
            except Overloaded:
                refused += 1
        decoder.step_gate.set()
        for gen in accepted:
            await in_time(gen.complete(), "an accepted request", within_s=WITHIN_S)
        return accepted, refused

    try:
        accepted, refused = asyncio.run(burst())
    finally:
        decoder.step_gate.set()
        sched.close()
    assert (len(accepted), refused) == (2, 4)


def test_request_past_its_deadline_times_out(decoder: FakeDecoder) -> None:
    decoder.n_slots = 1
    decoder.step_gate = threading.Event()
    sched = BatchScheduler(decoder)

    async def scenario() -> None:
        blocker = sched.submit(req("one", decoder))
        late = sched.submit(req("two", decoder, timeout_s=0.05))
        await asyncio.sleep(0.1)  # the deadline itself is what is under test
        decoder.step_gate.set()
        await in_time(blocker.complete(), "the blocking request's answer", within_s=WITHIN_S)
        with pytest.raises(RequestTimeout):
            await in_time(late.complete(), "the late request's end", within_s=WITHIN_S)

    try:
        asyncio.run(scenario())
    finally:
        decoder.step_gate.set()
        sched.close()


def test_prompt_longer_than_context_is_rejected_up_front(
    sched: BatchScheduler, decoder: FakeDecoder
) -> None:
    async def scenario() -> None:
        with pytest.raises(ContextOverflow, match="maximum context length is 64"):
            sched.submit(req("x" * 64, decoder))
        with pytest.raises(InvalidRequest):
            sched.submit(GenerationRequest(prompt=[], max_tokens=4))

    asyncio.run(scenario())


def test_generation_stops_at_the_end_of_the_context(
    sched: BatchScheduler, decoder: FakeDecoder
) -> None:
    _, result = asyncio.run(run(sched, req("x" * 60, decoder, max_tokens=100, ignore_eos=True)))
    assert result.finish_reason == "length"
    assert result.prompt_tokens + result.completion_tokens <= decoder.n_ctx_slot


def test_decode_failure_fails_that_step_and_the_scheduler_keeps_serving(
    sched: BatchScheduler, decoder: FakeDecoder
) -> None:
    decoder.fail_next = True
    with pytest.raises(Transient, match="llama_decode failed"):
        asyncio.run(run(sched, req("boom", decoder)))
    _, result = asyncio.run(run(sched, req("fine", decoder, max_tokens=5)))
    assert result.completion_tokens == 5


def test_an_internal_error_fails_requests_as_a_model_failure_and_refuses_new_ones() -> None:
    class Broken(FakeDecoder):
        def set_sampler(self, seq: int, params: SamplingParams) -> None:
            raise TypeError("a bug in the sampler setup")

    broken = Broken(slots=2, n_ctx=64, n_batch=32)
    sched = BatchScheduler(broken)
    try:
        with pytest.raises(ModelFailed, match="TypeError: a bug in the sampler setup"):
            asyncio.run(run(sched, req("hello", broken)))

        async def later() -> None:  # nothing would ever take it: refused at once, not hung
            sched.submit(req("again", broken))

        with pytest.raises(ModelFailed, match="reload the model"):
            asyncio.run(later())
    finally:
        sched.close()


def test_close_fails_waiting_requests_and_frees_the_model(decoder: FakeDecoder) -> None:
    decoder.n_slots = 1
    decoder.step_gate = threading.Event()
    sched = BatchScheduler(decoder)

    async def scenario() -> None:
        running = sched.submit(req("one", decoder))
        waiting = sched.submit(req("two", decoder))
        closer = threading.Thread(target=sched.close, daemon=True)
        closer.start()
        decoder.step_gate.set()
        closer.join(timeout=WITHIN_S)
        assert not closer.is_alive(), f"close() did not return within {WITHIN_S:g} s"
        for gen in (running, waiting):
            with pytest.raises(ModelNotReady):
                await in_time(gen.complete(), "the request's end after close", within_s=WITHIN_S)
        with pytest.raises(ModelNotReady):
            sched.submit(req("three", decoder))

    asyncio.run(scenario())
    assert decoder.closed


def test_logprobs_come_one_per_generated_token_only_when_asked(
    sched: BatchScheduler, decoder: FakeDecoder
) -> None:
    _, plain = asyncio.run(run(sched, req("hello", decoder, max_tokens=5)))
    assert plain.logprobs is None
    _, asked = asyncio.run(run(sched, req("hello", decoder, max_tokens=5, logprobs=3)))
    assert asked.logprobs is not None
    assert len(asked.logprobs) == asked.completion_tokens == 5
    assert asked.text == "".join(lp.piece.decode() for lp in asked.logprobs)
    assert all(len(lp.top) == 3 and lp.top[0] == (lp.piece, 0.0) for lp in asked.logprobs)


def test_n_choices_decode_the_prompt_once_and_each_continues_it(
    sched: BatchScheduler, decoder: FakeDecoder
) -> None:
    alone = fresh_text("shared prompt", 6)
    request = req("shared prompt", decoder, max_tokens=6)

    async def three() -> list[GenerationResult]:
        gens = sched.submit_many(request, 3)
        return [await in_time(g.complete(), "a choice", within_s=WITHIN_S) for g in gens]

    results = asyncio.run(three())
    # the fake picks tokens from the KV alone: a bad copy would change the text
    assert [r.text for r in results] == [alone] * 3
    prompt_tokens = len(request.prompt)
    decoded = sum(n for call in decoder.calls for _, _, n in call)
    assert decoded == prompt_tokens + 3 * 5  # the prompt once, then 5 more tokens per choice
    assert [r.cached_tokens for r in results] == [0, 0, 0]


def test_more_choices_than_slots_is_a_400_naming_n(
    sched: BatchScheduler, decoder: FakeDecoder
) -> None:
    async def too_many() -> None:
        sched.submit_many(req("x", decoder), decoder.n_slots + 1)

    with pytest.raises(InvalidRequest, match=r"n=5 is more than .* 4 parallel slots") as refused:
        asyncio.run(too_many())
    assert refused.value.param == "n"


def test_a_group_waits_until_it_fits_and_counts_every_choice_against_capacity(
    decoder: FakeDecoder,
) -> None:
    decoder.n_slots = 2
    decoder.step_gate = threading.Event()
    sched = BatchScheduler(decoder, queue_size=1)

    async def scenario() -> list[GenerationResult]:
        first = sched.submit(req("one", decoder))
        await eventually(lambda: sched.active, "one admitted", within_s=WITHIN_S, every_s=0.001)
        pair = sched.submit_many(req("pair", decoder), 2)  # one slot is free: it waits
        assert (sched.active, sched.queue_depth) == (1, 2)
        with pytest.raises(Overloaded):
            sched.submit(req("more", decoder))  # 1 generating + 2 waiting = 2 slots + 1 queued
        decoder.step_gate.set()
        return [await in_time(g.complete(), "answer", within_s=WITHIN_S) for g in (first, *pair)]

    try:
        results = asyncio.run(scenario())
    finally:
        decoder.step_gate.set()
        sched.close()
    assert [r.completion_tokens for r in results] == [12, 12, 12]


def test_cancelling_the_first_choice_before_its_prompt_is_decoded_ends_the_others(
    decoder: FakeDecoder,
) -> None:
    decoder.step_gate = threading.Event()
    sched = BatchScheduler(decoder)

    async def scenario() -> list[BaseException | GenerationResult]:
        # longer than n_batch: the gate holds the first chunk, before any logits
        gens = sched.submit_many(req("a shared prompt longer than one batch of tokens", decoder), 3)
        await eventually(lambda: sched.active == 3, "3 admitted", within_s=WITHIN_S, every_s=0.001)
        gens[0].cancel()
        decoder.step_gate.set()
        return list(
            await asyncio.gather(
                *(in_time(g.complete(), "an end", within_s=WITHIN_S) for g in gens),
                return_exceptions=True,
            )
        )

    try:
        outcomes = asyncio.run(scenario())
    finally:
        decoder.step_gate.set()
        sched.close()
    assert all(isinstance(o, Transient) for o in outcomes), outcomes
    assert sched.active == 0
