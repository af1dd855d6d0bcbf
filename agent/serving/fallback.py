"""Walk a model's fallback chain for one request: the primary, then each tier in turn.

Each model tier goes through its breaker: an open breaker is skipped at once (that
is what makes a failover fast), a call let through is counted as a success, a slow
success or a failure. A request's own fault (a 4xx) never falls back. When a model
fails mid-stream, the next *model* tier continues the text already sent (it gets the
prompt plus that text); a cache or rules answer cannot continue a text, so the
stream then ends with the error. When every tier fails the request gets
:class:`~agent.errors.Degraded` (503 with Retry-After), never silence.

Without a chain (no policy for the model) the answer is the model's alone: no breaker,
and its errors reach the client as they are (a full queue stays a 429).

A constrained request (a grammar: JSON mode, a schema, a forced tool call) never
takes a cache or rules answer, which could not match its grammar, and a model tier
answers it afresh rather than continuing a text the failed model began: a grammar's
state cannot be carried from one model to another.

The route supplies :data:`Start`, which knows how to build a prompt for a model; this
module knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from agent.errors import AgentError, Degraded, ModelNotReady, Overloaded
from agent.runtime.base import Embedder
from agent.serving.breaker import Breaker, Permit
from agent.serving.chain import failure_kind, served_name, tier_label, tiers_for
from agent.serving.degraded import DegradedMode
from agent.serving.registry import ModelRegistry
from agent.serving.rules import rule_answer
from agent.serving.scheduler import Generation, GenerationResult
from models.policy import CacheTier, Chain, FailureKind, ModelTier, RulesTier, Tier

__all__ = ["Answer", "Served", "Start", "Started"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """Who answered a request, and whether that was the degraded path."""

    by: str  # the model that answered, or "cache" / "rules"
    tier: str  # "primary", "model", "cpu", "cache" or "rules"
    degraded: bool
    reason: str | None = None  # why the primary did not answer
    failover_ms: float | None = None  # a model failed in this request: until the next text

    def mark(self) -> dict[str, object]:
        """The ``edgefleet`` field of a response body."""
        mark: dict[str, object] = {
            "served_by": self.by,
            "tier": self.tier,
            "degraded": self.degraded,
        }
        if self.reason is not None:
            mark["reason"] = self.reason
        if self.failover_ms is not None:
            mark["failover_ms"] = round(self.failover_ms, 1)
        return mark

    def headers(self) -> dict[str, str]:
        headers = {
            "X-Edgefleet-Served-By": self.by,
            "X-Edgefleet-Degraded": str(self.degraded).lower(),
        }
        if self.reason is not None:
            headers["X-Edgefleet-Degraded-Reason"] = _header_safe(self.reason)
        return headers


@dataclass
class Started:
    """A generation begun on one model (or its exact-cache answer) and the lease behind it."""

    gen: Generation | None
    cached: GenerationResult | None
    release: Callable[[], None]
    on_result: Callable[[GenerationResult], None] = lambda result: None  # e.g. fill a cache


Start = Callable[[str, str], Awaitable[Started]]
"""Begin generating on the model served under a name, continuing a text (usually "")."""


class Answer:
    """One request's answer from whichever tier can give it; iterate it for text deltas.

    :meth:`prime` runs the chain until the first text (or the end), so the route knows
    who serves before it sends headers. ``served`` may change once more if a model
    fails mid-stream and the next model tier continues.
    """

    def __init__(
        self,
        model: str,
        chain: Chain | None,
        prompt_text: str,
        mode: DegradedMode,
        registry: ModelRegistry,
        start: Start,
        *,
        constrained: bool = False,
    ) -> None:
        self.model = model
        self.constrained = constrained
        self.chain = chain or Chain()
        self.alone = chain is None  # no policy for this model: no breaker, errors as they are
        self.prompt_text = prompt_text
        self.mode = mode
        self.registry = registry
        self.start = start
        self.served: Served | None = None
        self.result: GenerationResult | None = None
        self.started_at = time.monotonic()
        self._sent: list[str] = []
        self._reasons: list[str] = []
        self._current: Generation | None = None
        self._cancelled = False
        self._it = self._run()
        self._first: str | None = None
        self._primed = False
        self._done = False

    # -- for the route -----------------------------------------------------------------

    async def prime(self) -> Answer:
        """Run until the first delta or the end; raises what the whole chain failed with."""
        self._primed = True
        try:
            self._first = await anext(self._it)
        except StopAsyncIteration:
            self._done = True
        return self

    async def __aiter__(self) -> AsyncIterator[str]:
        if not self._primed:
            await self.prime()
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        if self._done:
            return
        async for delta in self._it:
            yield delta

    async def complete(self) -> GenerationResult:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    def cancel(self) -> None:
        self._cancelled = True
        if self._current is not None:
            self._current.cancel()

    async def aclose(self) -> None:
        await self._it.aclose()

    # -- the walk ----------------------------------------------------------------------

    async def _run(self) -> AsyncGenerator[str, None]:
        if self.alone:
            async for delta in self._alone():
                yield delta
            return
        async for delta in self._try_model(self.model, "primary"):
            yield delta
        if self.result is not None:
            return
        for tier in tiers_for(self.chain, self._kind):
            if self._cancelled:
                return
            if isinstance(tier, ModelTier):
                async for delta in self._try_model(served_name(tier), tier_label(tier), tier):
                    self._first_fallback_text()
                    yield delta
            elif not self._sent and not self.constrained:
                text = await self._canned(tier)
                if text is not None:
                    self._first_fallback_text()
                    yield text
            if self.result is not None:
                return
        view = self.mode.breaker(self.model).view()
        retry = (
            max(int(view.retry_after_s + 0.999), 1)
            if view.retry_after_s
            else self.chain.retry_after
        )
        raise Degraded(
            f"{self.model} and its fallbacks could not answer: {'; '.join(self._reasons)}",
            retry_after=min(retry, self.chain.retry_after),
        )

    async def _alone(self) -> AsyncGenerator[str, None]:
        """No chain: the model answers, or its error is the answer (a 429 stays a 429)."""
        started = await self.start(self.model, "")
        self.served = self._served(self.model, "primary")
        try:
            if started.cached is not None:
                self.result = started.cached
                yield started.cached.text
                return
            gen = started.gen
            assert gen is not None
            self._current = gen
            async for delta in gen:
                yield delta
            assert gen.result is not None
            started.on_result(gen.result)
            self.result = gen.result
        finally:
            self._let_go()
            started.release()

    def _let_go(self) -> None:
        """Stop the generation unless it ended (a client gone mid-stream frees its slot)."""
        if self._current is not None:
            self._current.cancel()  # a no-op once it ended
            self._current = None

    _kind: FailureKind | None = None
    _failed_at: float | None = None  # when a model first failed in this request
    failover_s: float | None = None  # from then to the first text of a later tier

    def _fail(self, name: str, kind: FailureKind | None, reason: str) -> None:
        self._reasons.append(f"{name}: {reason}")
        if self._kind is None:
            self._kind = kind

    def _failed(self) -> None:
        if self._failed_at is None:
            self._failed_at = time.monotonic()

    def _first_fallback_text(self) -> None:
        if self._failed_at is None or self.failover_s is not None or self.served is None:
            return
        self.failover_s = time.monotonic() - self._failed_at
        self.served = replace(self.served, failover_ms=self.failover_s * 1000)

    async def _try_model(
        self, name: str, label: str, tier: Tier | None = None
    ) -> AsyncIterator[str]:
        breaker = self.mode.breaker(name)
        permit = breaker.acquire()
        self.mode.note(breaker.poll())  # an open breaker may have just gone half-open
        if permit is None:
            view = breaker.view()
            self._fail(name, view.kind, f"breaker {view.state.value} ({view.reason})")
            return
        try:
            started = await self.start(name, "".join(self._sent))
        except AgentError as exc:
            self._settle_start_failure(breaker, permit, name, exc, primary=tier is None)
            return
        self.served = self._served(name, label)
        settled = False
        try:
            if started.cached is not None:
                self._finish(started.cached, "".join(self._sent))
                yield started.cached.text
                return
            gen = started.gen
            assert gen is not None
            self._current = gen
            try:
                async for delta in gen:
                    self._sent.append(delta)
                    yield delta
            except AgentError as exc:
                kind = failure_kind(exc)
                if kind is None:
                    raise
                settled = True
                self._failed()
                self.mode.note(breaker.failure(permit, kind, exc.message))
                self._fail(name, kind, exc.message)
                if self._sent and (self.constrained or not self._model_tier_follows(tier)):
                    raise
                return
            result = gen.result
            assert result is not None
            started.on_result(result)
            settled = True
            self.mode.note(breaker.success(permit, result.ttft_s))
            self._finish(result, "".join(self._sent))
            if tier is None and self.result is not None:
                self._remember(self.result.text)
        finally:
            if not settled:  # an exact-cache answer, the client left, or the request's fault
                breaker.release(permit)
            self._let_go()
            started.release()

    def _settle_start_failure(
        self, breaker: Breaker, permit: Permit, name: str, exc: AgentError, *, primary: bool
    ) -> None:
        kind = failure_kind(exc)
        if kind is None:  # the request's fault
            breaker.release(permit)
            if primary:
                raise exc
            self._fail(name, None, exc.message)  # e.g. too long for a smaller model's context
            return
        if isinstance(exc, Overloaded) or (isinstance(exc, ModelNotReady) and exc.failure is None):
            breaker.release(permit)  # a full queue spills over; a loading model is no failure
        elif isinstance(exc, ModelNotReady):
            self._failed()
            self.mode.note(breaker.trip(kind, exc.message))
        else:
            self._failed()
            self.mode.note(breaker.failure(permit, kind, exc.message))
        self._fail(name, kind, exc.message)

    def _model_tier_follows(self, tier: Tier | None) -> bool:
        tiers = tiers_for(self.chain, self._kind)
        after = tiers if tier is None else tiers[tiers.index(tier) + 1 :] if tier in tiers else []
        return any(isinstance(t, ModelTier) for t in after)

    def _served(self, by: str, tier: str) -> Served:
        degraded = tier != "primary"
        reason = self._reasons[0] if degraded and self._reasons else None
        return Served(by=by, tier=tier, degraded=degraded, reason=reason)

    def _finish(self, result: GenerationResult, text: str) -> None:
        if text != result.text:  # a continuation: the answer is everything sent
            result = GenerationResult(
                text=text,
                finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                cached_tokens=result.cached_tokens,
                ttft_s=result.ttft_s,
                total_s=time.monotonic() - self.started_at,
            )
        self.result = result

    async def _canned(self, tier: CacheTier | RulesTier) -> str | None:
        """A cache or rules answer, or None to go on down the chain."""
        label = tier_label(tier)
        if isinstance(tier, RulesTier):
            text = rule_answer(tier, self.prompt_text)
            if text is None:
                self._fail("rules", None, "no rule matched")
                return None
            self.served = self._served("rules", label)
        else:
            try:
                hit = await asyncio.to_thread(self._lookup, tier)
            except AgentError as exc:
                self._fail("cache", None, exc.message)
                return None
            if hit is None:
                self._fail("cache", None, "no similar past answer")
                return None
            text = hit
            self.served = self._served("cache", label)
        elapsed = time.monotonic() - self.started_at
        self.result = GenerationResult(
            text=text,
            finish_reason="stop",
            prompt_tokens=0,
            completion_tokens=0,
            cached_tokens=0,
            ttft_s=elapsed,
            total_s=elapsed,
        )
        return text

    def _lookup(self, tier: CacheTier) -> str | None:
        with self.registry.lease(tier.embedder, Embedder) as embedder:
            hit = self.mode.cache.lookup(self.model, embedder, self.prompt_text, tier.threshold)
        return hit.answer if hit is not None else None

    def _remember(self, answer: str) -> None:
        """Keep a good primary answer for the cache tier, off the request's path."""
        tiers = [t for t in self.chain.tiers if isinstance(t, CacheTier)]
        if not tiers or not answer.strip():
            return
        embedder_name, model, prompt, cache = (
            tiers[0].embedder,
            self.model,
            self.prompt_text,
            self.mode.cache,
        )

        def remember() -> None:
            try:
                with self.registry.lease(embedder_name, Embedder) as embedder:
                    cache.remember(model, embedder, prompt, answer)
            except AgentError as exc:
                log.debug("answer not cached: %s", exc.message)

        self.mode.in_background(remember)


def _header_safe(text: str) -> str:
    """A reason fit for an HTTP header: printable ASCII, one line, bounded."""
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return clean[:300]
