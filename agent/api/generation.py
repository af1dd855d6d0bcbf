"""One generation request's flow, shared by the OpenAI and Ollama routes.

A route translates its own request shape into a :class:`Job`, then :func:`begin`
leases the model, plans the request against the context window and starts it:
through the degraded-mode chain for one choice, or straight on the model's
scheduler for ``n`` choices sharing one prompt. The route then reads :class:`Run`
events (text deltas and each choice's end) and shapes them for its wire format.
Metrics and the interaction log are written here, once, whatever the shape.

A lease is held until the last event is read, so a hot swap never pulls a model
out from under a stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import ExitStack, aclosing, suppress
from dataclasses import dataclass, replace
from typing import TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from agent.api.deps import AgentState
from agent.errors import AgentError, ContextOverflow, InvalidRequest, Overloaded
from agent.interaction_log import Interaction
from agent.runtime.base import SamplingParams
from agent.serving.cache import cache_key
from agent.serving.fallback import Answer, Served, Start, Started
from agent.serving.scheduler import (
    BatchScheduler,
    Generation,
    GenerationRequest,
    GenerationResult,
)

__all__ = ["CLIENT_GONE", "Delta", "End", "Job", "Run", "begin", "combined"]

CLIENT_GONE = 499  # nginx's code for "client closed request", used in metrics and logs
_INLINE_TOKENIZE_CHARS = 4096  # longer prompts are tokenised off the event loop
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """A generation request in the serving layer's terms, whichever API it came from."""

    request_id: str
    model: str
    endpoint: str  # metrics label: "chat", "completions", "ollama_chat", ...
    make_prompt: Callable[[BatchScheduler], list[int]]
    prompt_chars: int  # long prompts are tokenised off the event loop
    asked: str  # the last user text: what a rules tier matches on
    sampling: SamplingParams
    max_tokens: int | None = None  # None: the model's default, within the context
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    prompt_param: str = "messages"  # names the field in a context-overflow error
    grammar_param: str = "grammar"  # names the field a grammar came from
    max_tokens_param: str = "max_tokens"
    log_prompt: str | None = None  # kept in the interaction log when bodies are logged

    @property
    def exact(self) -> bool:
        """Only this model's own tokens will do: no canned answer, no mid-stream handover."""
        return self.sampling.grammar is not None or self.logprobs is not None


@dataclass(frozen=True)
class Delta:
    """More text of choice ``index``."""

    index: int
    text: str


@dataclass(frozen=True)
class End:
    """Choice ``index`` is over: its whole result, usage and logprobs included."""

    index: int
    result: GenerationResult


Event = Delta | End


async def begin(state: AgentState, request: Request, job: Job) -> Run | None:
    """Start ``job``: raises what refuses it, None if the client left before the first text."""
    run = Run(state, job)
    try:
        if job.n == 1:
            answer = _answer(state, job)
            run.answer = answer
            if await _unless_gone(answer.prime(), answer.cancel, request) is None:
                await answer.aclose()
                run.record(CLIENT_GONE, [], "client disconnected")
                return None
            assert answer.served is not None
            run.served = answer.served
        else:
            run.stack, run.gens = await _start_many(state, job)
    except AgentError as exc:
        run.record(exc.status, [], exc.message)
        raise
    return run


class Run:
    """A started job: read :meth:`events` (streams) or :meth:`complete` (whole answers)."""

    def __init__(self, state: AgentState, job: Job) -> None:
        self.state = state
        self.job = job
        self.created = int(time.time())
        self.started = time.monotonic()
        self.served = Served(by=job.model, tier="primary", degraded=False)
        self.answer: Answer | None = None
        self.gens: list[Generation] = []
        self.stack = ExitStack()

    def headers(self) -> dict[str, str]:
        return self.served.headers()

    async def events(self) -> AsyncGenerator[Event, None]:
        """Text deltas and each choice's end; ``served`` is current at every event."""
        status, error = CLIENT_GONE, "client disconnected"
        results: list[GenerationResult] = []
        try:
            async for event in self._events():
                if isinstance(event, End):
                    results.append(event.result)
                yield event
            status, error = 200, ""
        except AgentError as exc:
            status, error = exc.status, exc.message
            raise
        finally:
            await self._close()
            self.record(status, results, error or None)

    async def complete(self, request: Request) -> list[GenerationResult] | None:
        """Every choice's result in index order; None if the client hung up first."""

        async def collect() -> list[GenerationResult]:
            async with aclosing(self.events()) as events:
                ends = [e async for e in events if isinstance(e, End)]
            return [e.result for e in sorted(ends, key=lambda e: e.index)]

        return await _unless_gone(collect(), self._cancel, request)

    def record(self, status: int, results: Sequence[GenerationResult], error: str | None) -> None:
        result = combined(results) if results else None
        m, model, endpoint = self.state.metrics, self.job.model, self.job.endpoint
        elapsed = time.monotonic() - self.started
        m.requests.labels(model, endpoint, str(status)).inc()
        m.latency.labels(model, endpoint).observe(elapsed)
        fallback = self.served.tier if self.served.degraded and status < 400 else None
        if fallback is not None:
            m.fallbacks.labels(model, fallback).inc()
        if self.served.failover_ms is not None:
            m.failover.labels(model).observe(self.served.failover_ms / 1000)
        m.window.observe(
            status,
            elapsed,
            ttft_s=result.ttft_s if result else None,
            completion_tokens=result.completion_tokens if result else 0,
            fallback_tier=fallback,
        )
        if result is not None:
            m.ttft.labels(model).observe(result.ttft_s)
            m.tokens.labels(model, "prompt").inc(result.prompt_tokens)
            m.tokens.labels(model, "completion").inc(result.completion_tokens)
            m.tokens.labels(model, "prompt_cached").inc(result.cached_tokens)
            if result.decode_tokens_per_s > 0:
                m.tokens_per_s.labels(model).observe(result.decode_tokens_per_s)
        bodies = self.state.settings.log.include_bodies
        self.state.interactions.record(
            Interaction(
                request_id=self.job.request_id,
                model=model,
                endpoint=endpoint,
                status=status,
                prompt_tokens=result.prompt_tokens if result else 0,
                completion_tokens=result.completion_tokens if result else 0,
                latency_ms=elapsed * 1000,
                ttft_ms=result.ttft_s * 1000 if result else None,
                error=error,
                prompt=self.job.log_prompt if bodies else None,
                response=result.text if result and bodies else None,
            )
        )

    async def _events(self) -> AsyncIterator[Event]:
        if self.answer is not None:
            async for text in self.answer:
                if self.answer.served is not None:
                    self.served = self.answer.served  # a model tier may take over mid-stream
                yield Delta(0, text)
            assert self.answer.result is not None
            yield End(0, self.answer.result)
            return
        async for event in _merged(self.gens):
            yield event

    def _cancel(self) -> None:
        if self.answer is not None:
            self.answer.cancel()
        for gen in self.gens:
            gen.cancel()

    async def _close(self) -> None:
        self._cancel()
        if self.answer is not None:
            await self.answer.aclose()
        self.stack.close()


def combined(results: Sequence[GenerationResult]) -> GenerationResult:
    """Several choices of one prompt as one result: the prompt counted once."""
    first = results[0]
    if len(results) == 1:
        return first
    return replace(
        first,
        text="\n".join(r.text for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        total_s=max(r.total_s for r in results),
        logprobs=None,
    )


# -- starting ----------------------------------------------------------------------------


def _answer(state: AgentState, job: Job) -> Answer:
    chain = state.degraded.chain(job.model)
    return Answer(
        job.model,
        chain,
        job.asked,
        state.degraded,
        state.registry,
        _starter(state, job),
        constrained=job.exact,
    )


def _starter(state: AgentState, job: Job) -> Start:
    """How the fallback walker begins generating on a model: a continuation when ``sent``."""

    async def start(name: str, sent: str) -> Started:
        stack = ExitStack()
        try:
            sched, gen_request = await _prepare(state, job, name, stack, sent)
            key = (
                None
                if sent
                else cache_key(sched.manifest.name, sched.manifest.version, gen_request)
            )
            cached = state.cache.get(key)
            if key is not None:  # only deterministic requests are cacheable
                state.metrics.cache.labels(name, "hit" if cached else "miss").inc()
            gen = None if cached else sched.submit(gen_request)
        except AgentError as exc:
            stack.close()
            _count_rejection(state, name, exc)
            raise
        return Started(gen, cached, stack.close, lambda result: state.cache.put(key, result))

    return start


async def _start_many(state: AgentState, job: Job) -> tuple[ExitStack, list[Generation]]:
    """``n`` choices straight on the model: they share one prompt, so no fallback or cache."""
    stack = ExitStack()
    try:
        sched, gen_request = await _prepare(state, job, job.model, stack, "")
        return stack, sched.submit_many(gen_request, job.n)
    except AgentError as exc:
        stack.close()
        _count_rejection(state, job.model, exc)
        raise


async def _prepare(
    state: AgentState, job: Job, name: str, stack: ExitStack, sent: str
) -> tuple[BatchScheduler, GenerationRequest]:
    sched = stack.enter_context(state.registry.lease(name, BatchScheduler))
    if job.prompt_chars > _INLINE_TOKENIZE_CHARS:
        prompt = await run_in_threadpool(job.make_prompt, sched)
    else:
        prompt = job.make_prompt(sched)
    if sent:
        prompt += sched.decoder.tokenize(sent, special=False)
    return sched, plan(sched, prompt, job, state.settings.request_timeout_s)


def _count_rejection(state: AgentState, name: str, exc: AgentError) -> None:
    if isinstance(exc, Overloaded):
        state.metrics.rejections.labels(name, "queue_full").inc()
    elif isinstance(exc, ContextOverflow):
        state.metrics.rejections.labels(name, "context_overflow").inc()


def plan(sched: BatchScheduler, prompt: list[int], job: Job, timeout_s: float) -> GenerationRequest:
    """Fit the request to the model: too long a prompt, a bad grammar or token id is a 400."""
    n_ctx = sched.context_length
    room = n_ctx - len(prompt)
    if room <= 0:
        raise ContextOverflow(
            f"This model's maximum context length is {n_ctx} tokens, but the prompt has "
            f"{len(prompt)} tokens. Shorten the prompt.",
            param=job.prompt_param,
        )
    if job.max_tokens is None:
        max_tokens = min(sched.manifest.runtime.max_tokens_default, room)
    elif job.max_tokens > room:
        raise ContextOverflow(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{len(prompt) + job.max_tokens} tokens ({len(prompt)} in the prompt, "
            f"{job.max_tokens} for the completion). Reduce the prompt or "
            f"{job.max_tokens_param}.",
            param=job.max_tokens_param,
        )
    else:
        max_tokens = job.max_tokens
    vocab = sched.decoder.n_vocab
    outside = [token for token, _ in job.sampling.logit_bias if token >= vocab]
    if outside:
        raise InvalidRequest(
            f"logit_bias: token {outside[0]} is not in this model's vocabulary "
            f"(ids 0 to {vocab - 1})",
            param="logit_bias",
        )
    if job.sampling.grammar is not None:
        sched.decoder.check_grammar(job.sampling.grammar, param=job.grammar_param)
    return GenerationRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=job.sampling,
        stop=job.stop,
        ignore_eos=job.ignore_eos,
        timeout_s=timeout_s,
        logprobs=job.logprobs,
    )


# -- waiting -----------------------------------------------------------------------------


async def _merged(gens: Sequence[Generation]) -> AsyncIterator[Event]:
    """Several generations' deltas as they come, each ended by its result."""
    queue: asyncio.Queue[Event | AgentError] = asyncio.Queue()

    async def pump(index: int, gen: Generation) -> None:
        try:
            async for text in gen:
                queue.put_nowait(Delta(index, text))
            assert gen.result is not None
            queue.put_nowait(End(index, gen.result))
        except AgentError as exc:
            queue.put_nowait(exc)

    tasks = [asyncio.ensure_future(pump(i, gen)) for i, gen in enumerate(gens)]
    try:
        ended = 0
        while ended < len(gens):
            item = await queue.get()
            if isinstance(item, AgentError):
                raise item
            ended += isinstance(item, End)
            yield item
    finally:
        for task in tasks:
            task.cancel()


async def _unless_gone(
    work: Awaitable[T], cancel: Callable[[], None], request: Request
) -> T | None:
    """Wait for ``work``, or cancel it the moment the client hangs up (None)."""

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(client_gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    cancel()
    task.cancel()
    with suppress(asyncio.CancelledError, AgentError):
        await task  # let it clean up (and record) before the route answers
    return None
