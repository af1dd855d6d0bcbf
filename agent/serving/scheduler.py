"""Continuous batching: many requests decode together in one llama.cpp context.

One thread owns the context. Each step it admits waiting requests into free
slots (sequence ids), builds one batch holding the next token of every
generating sequence plus prompt chunks of newly admitted ones (within the step
budget, so a long prompt never stalls running streams), decodes it, samples one
token per sequence and streams the text to each request's asyncio queue.
Requests join and leave between steps; a cancelled or expired request frees its
slot before the next step. Each slot keeps its KV cache after a request ends, so
the next request sharing a prefix (a system prompt, the earlier turns of a chat)
only decodes what is new. The runtime is batch-invariant (see
:mod:`agent.runtime.llama_cpp`), so none of this changes a greedy answer.

    event loop                          scheduler thread
    submit() ─► waiting (bounded) ──► admit ─► plan ─► llama_decode ─► sample
    Generation ◄──── call_soon_threadsafe(text deltas, result) ◄──────┘

The thread beats (:attr:`BatchScheduler.last_beat`) on every iteration, and wakes at
least every second while idle to beat, so a thread stuck in a decode step is told
apart from an idle one: the systemd watchdog (:mod:`agent.systemd`) stops on a stale beat.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from agent.errors import (
    AgentError,
    ContextOverflow,
    InvalidRequest,
    ModelFailed,
    ModelNotReady,
    Overloaded,
    RequestTimeout,
    Transient,
)
from agent.runtime.base import RANDOM_SEED, RuntimeInfo, SamplingParams, TokenLogprob
from agent.runtime.llama_cpp import BatchEntry
from agent.serving.text import StopMatcher, Utf8Stream
from models.manifest import ModelManifest

__all__ = [
    "BatchDecoder",
    "BatchScheduler",
    "Generation",
    "GenerationRequest",
    "GenerationResult",
]

log = logging.getLogger(__name__)

IDLE_WAKE_S = 1.0  # an idle scheduler thread wakes this often (seconds) to beat


class BatchDecoder(Protocol):
    """The seam between scheduling and llama.cpp; :class:`LlamaModel` is the real one."""

    n_slots: int
    n_ctx_slot: int
    n_batch: int  # most tokens one decode call takes
    n_vocab: int

    @property
    def manifest(self) -> ModelManifest: ...

    @property
    def info(self) -> RuntimeInfo: ...

    def tokenize(self, text: str, *, special: bool) -> list[int]: ...

    def piece(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str: ...

    def decode(self, entries: Sequence[BatchEntry]) -> list[int]: ...

    def check_grammar(self, grammar: str, *, param: str) -> None: ...

    def set_sampler(self, seq: int, params: SamplingParams) -> None: ...

    def sample(self, seq: int, index: int) -> int: ...

    def logprobs(self, index: int, token: int, top: int) -> TokenLogprob: ...

    def forget(self, seq: int, keep: int) -> bool: ...

    def share(self, source: int, target: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenised prompt and how to continue it."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    timeout_s: float = 300.0
    logprobs: int | None = None  # None: none; k: each token's logprob and its k likeliest rivals


@dataclass(frozen=True)
class GenerationResult:
    """What a finished generation produced, with the timings /metrics wants."""

    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the slot's KV cache
    ttft_s: float  # submit to first token
    total_s: float  # submit to finish
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per generated token, when asked

    @property
    def decode_tokens_per_s(self) -> float:
        span = self.total_s - self.ttft_s
        return (
            (self.completion_tokens - 1) / span if span > 0 and self.completion_tokens > 1 else 0.0
        )


class _Done:
    __slots__ = ("result",)

    def __init__(self, result: GenerationResult) -> None:
        self.result = result


class Generation:
    """One request in flight: iterate it for text deltas; ``result`` is set when it ends."""

    def __init__(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, wake: threading.Condition
    ) -> None:
        self.request = request
        self.result: GenerationResult | None = None
        self.submitted_at = time.monotonic()
        self.deadline = self.submitted_at + request.timeout_s
        self._loop = loop
        self._wake = wake
        self._queue: asyncio.Queue[str | _Done | AgentError] = asyncio.Queue()
        self._cancelled = False
        self._ended = False
        self.followers: list[Generation] = []  # n > 1: the other choices, sharing this prompt

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stop generating; the slot is freed before the next decode step."""
        if self._ended:
            return
        self._cancelled = True
        with self._wake:
            self._wake.notify()

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            item = await self._queue.get()
            if isinstance(item, _Done):
                self.result = item.result
                return
            if isinstance(item, AgentError):
                raise item
            yield item

    async def complete(self) -> GenerationResult:
        """Wait for the whole text (non-streaming requests)."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    # -- called from the scheduler thread ------------------------------------------------

    def _put(self, item: str | _Done | AgentError) -> None:
        if isinstance(item, _Done | AgentError):
            self._ended = True
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone; nobody is listening
            self._cancelled = True


@dataclass
class _Slot:
    """One sequence id in the context and what currently occupies it."""

    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in the cache
    gen: Generation | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not decoded yet
    next_token: int | None = None
    generated: int = 0
    reused: int = 0
    awaits: Generation | None = None  # a follower waits for this leader's prompt KV
    first_token_at: float | None = None
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    utf8: Utf8Stream = field(default_factory=Utf8Stream)
    stops: StopMatcher = field(default_factory=lambda: StopMatcher(()))


def _choices(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """``n`` requests for one prompt; a fixed seed becomes seed, seed + 1, ..."""
    seed = request.sampling.seed
    if n == 1 or seed == RANDOM_SEED:
        return [request] * n
    return [
        replace(request, sampling=replace(request.sampling, seed=(seed + i) & 0xFFFFFFFF))
        for i in range(n)
    ]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the shared prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable(slot: _Slot, prompt: Sequence[int]) -> int:
    """Prompt tokens ``slot`` already holds, leaving at least one to decode for logits."""
    return min(common_prefix(slot.cached, prompt), len(prompt) - 1)


def choose_slot(free: Sequence[_Slot], prompt: Sequence[int]) -> tuple[_Slot, int]:
    """The free slot that can reuse the most of ``prompt``; ties go to the lowest sequence id.

    Low ids first keeps generating sequences contiguous, which llama.cpp decodes in
    one micro-batch (non-contiguous ids are split into several).
    """
    best = max(free, key=lambda s: (reusable(s, prompt), -s.seq))
    return best, reusable(best, prompt)


class BatchScheduler:
    """Serves one GGUF model to many concurrent requests; a :class:`ServedModel`."""

    def __init__(
        self, decoder: BatchDecoder, *, queue_size: int = 64, idle_wake_s: float = IDLE_WAKE_S
    ) -> None:
        self._decoder = decoder
        self._queue_size = queue_size
        self._idle_wake_s = idle_wake_s
        self._slots = [_Slot(seq=i) for i in range(decoder.n_slots)]
        self._waiting: deque[Generation] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._closed = False
        self._crash: str | None = None  # why the thread died, if an internal error killed it
        self._service_s = 1.0  # moving average of request duration, for Retry-After
        self._last_beat = time.monotonic()  # the thread's last iteration (time.monotonic())
        self.steps = 0
        self._thread = threading.Thread(
            target=self._run, name=f"batch-{decoder.manifest.name}", daemon=True
        )
        self._thread.start()

    # -- ServedModel ---------------------------------------------------------------------

    @property
    def manifest(self) -> ModelManifest:
        return self._decoder.manifest

    @property
    def info(self) -> RuntimeInfo:
        return self._decoder.info

    @property
    def decoder(self) -> BatchDecoder:
        return self._decoder

    @property
    def context_length(self) -> int:
        return self._decoder.n_ctx_slot

    @property
    def last_beat(self) -> float:
        """``time.monotonic()`` of the scheduler thread's last iteration, busy or idle."""
        return self._last_beat

    def close(self) -> None:
        """Stop the thread, fail whatever is still queued or running, free the model."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        self._decoder.close()

    # -- event-loop side -----------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return sum(1 + len(g.followers) for g in self._waiting)

    @property
    def active(self) -> int:
        return sum(1 for s in self._slots if s.gen is not None)

    def submit(self, request: GenerationRequest) -> Generation:
        """Queue a request; raises at once if it can never fit or the queue is full."""
        return self.submit_many(request, 1)[0]

    def submit_many(self, request: GenerationRequest, n: int) -> list[Generation]:
        """Queue ``n`` choices of one prompt, admitted together so they share its KV cache.

        The prompt is decoded once, in the first choice's slot, then copied to the
        others' slots; each choice samples with its own seed (``seed + i`` when the
        request fixed one, so the set is reproducible).
        """
        if n > len(self._slots):
            raise InvalidRequest(
                f"n={n} is more than model {self.manifest.name!r}'s {len(self._slots)} "
                "parallel slots; ask for fewer choices",
                param="n",
            )
        n_prompt = len(request.prompt)
        if n_prompt == 0:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if n_prompt >= self._decoder.n_ctx_slot:
            raise ContextOverflow(
                f"This model's maximum context length is {self._decoder.n_ctx_slot} tokens, "
                f"but the prompt has {n_prompt} tokens. Shorten the prompt.",
                param="messages",
            )
        if request.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        loop = asyncio.get_running_loop()
        gens = [Generation(r, loop, self._cond) for r in _choices(request, n)]
        gen = gens[0]
        gen.followers = gens[1:]
        with self._cond:
            if self._crash is not None:
                raise self._gone()  # no thread would ever take the request
            if self._stopping:
                raise ModelNotReady(f"model {self.manifest.name!r} is shutting down")
            # Free slots count as room: a request the thread has not admitted yet
            # must not take the queue's place while a slot waits for it.
            busy = self.queue_depth + self.active
            if busy + n > len(self._slots) + self._queue_size:
                retry = math.ceil(self._service_s * busy / max(len(self._slots), 1))
                raise Overloaded(
                    f"model {self.manifest.name!r} is at capacity "
                    f"({self.active} generating, {len(self._waiting)} waiting); retry later",
                    retry_after=min(max(retry, 1), 60),
                )
            self._waiting.append(gen)
            self._cond.notify()
        return gens

    # -- scheduler thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._last_beat = time.monotonic()
                    while not self._stopping and not self._waiting and not self._busy():
                        self._cond.wait(self._idle_wake_s)
                        self._last_beat = time.monotonic()
                    if self._stopping:
                        break
                    self._admit()
                self._reap()
                self._step()
        except Exception as exc:
            log.exception("batch scheduler for %s crashed", self.manifest.name)
            with self._cond:
                self._crash = f"{type(exc).__name__}: {exc}"
        finally:
            self._fail_all(self._gone())

    def _gone(self) -> AgentError:
        """Why nothing more will be served: unloaded, or crashed (a model failure)."""
        name = self.manifest.name
        if self._crash is None:
            return ModelNotReady(f"model {name!r} was unloaded")
        return ModelFailed(
            f"model {name!r} stopped after an internal error ({self._crash}); see the "
            "agent's log, then reload the model (SIGHUP) or restart the agent"
        )

    def _busy(self) -> bool:
        return any(s.gen is not None for s in self._slots)

    def _admit(self) -> None:
        now = time.monotonic()
        while self._waiting:
            gen = self._waiting[0]
            if gen.cancelled or now > gen.deadline:
                self._waiting.popleft()
                self._end_early(gen)
                continue
            free = [s for s in self._slots if s.gen is None]
            if len(free) < 1 + len(gen.followers):
                return
            self._waiting.popleft()
            leader = self._start(gen, free)
            others = [s for s in free if s is not leader]
            for follower, slot in zip(gen.followers, others, strict=False):
                self._decoder.forget(slot.seq, 0)
                self._occupy(slot, follower, cached=[], pending=[])
                slot.awaits = gen

    def _start(self, gen: Generation, free: Sequence[_Slot]) -> _Slot:
        prompt = list(gen.request.prompt)
        slot, keep = choose_slot(free, prompt)
        if not self._decoder.forget(slot.seq, keep):
            self._decoder.forget(slot.seq, 0)
            keep = 0
        self._occupy(slot, gen, cached=prompt[:keep], pending=prompt[keep:])
        return slot

    def _occupy(
        self, slot: _Slot, gen: Generation, *, cached: list[int], pending: list[int]
    ) -> None:
        slot.cached = cached
        slot.pending = pending
        slot.gen = gen
        slot.awaits = None
        slot.next_token = None
        slot.generated = 0
        slot.reused = len(cached)
        slot.first_token_at = None
        slot.text = []
        slot.logprobs = []
        slot.utf8 = Utf8Stream()
        slot.stops = StopMatcher(gen.request.stop)
        self._decoder.set_sampler(slot.seq, gen.request.sampling)

    def _reap(self) -> None:
        """Free the slots of requests that were cancelled or ran out of time."""
        now = time.monotonic()
        leaders = {id(s.gen) for s in self._slots if s.gen is not None}
        for slot in self._slots:
            gen = slot.gen
            orphan = slot.awaits is not None and id(slot.awaits) not in leaders
            if orphan and gen is not None and not gen.cancelled:
                gen.cancel()  # the prompt it was to share is gone; so is its request
            if gen is not None and (gen.cancelled or now > gen.deadline):
                slot.gen = None
                slot.pending = []  # a partly decoded prompt: ``cached`` still matches the KV
                self._end_early(gen)

    def _end_early(self, gen: Generation) -> None:
        if not gen.cancelled:
            gen._put(RequestTimeout(f"request ran past its {gen.request.timeout_s:g} s timeout"))
        else:
            gen._put(Transient("request cancelled"))

    def _step(self) -> None:
        """One batch: a token for every generating sequence, then prompt chunks in budget."""
        entries: list[BatchEntry] = []
        owners: list[_Slot] = []
        budget = self._decoder.n_batch
        for slot in self._slots:  # in sequence-id order: llama.cpp groups consecutive ids
            if slot.gen is not None and not slot.pending and slot.next_token is not None:
                entries.append(BatchEntry(slot.seq, [slot.next_token], len(slot.cached), True))
                owners.append(slot)
                budget -= 1
        prefilling = [s for s in self._slots if s.gen is not None and s.pending]
        prefilling.sort(key=lambda s: s.gen.submitted_at if s.gen else 0.0)
        for slot in prefilling:
            chunk = slot.pending[: max(budget, 0)]
            if not chunk:
                break
            entries.append(
                BatchEntry(slot.seq, chunk, len(slot.cached), len(chunk) == len(slot.pending))
            )
            owners.append(slot)
            budget -= len(chunk)
        if entries:
            self._decode(entries, owners)

    def _decode(self, entries: list[BatchEntry], owners: list[_Slot]) -> None:
        """Decode one batch and sample where asked; a failure fails only its requests."""
        try:
            indices = self._decoder.decode(entries)
        except AgentError as exc:
            log.error("decode step failed: %s", exc.message)
            for slot in owners:
                self._decoder.forget(slot.seq, 0)
                slot.cached = []
                self._abort(slot, exc)
            return
        self.steps += 1
        sampled = iter(indices)
        for entry, slot in zip(entries, owners, strict=True):
            slot.cached.extend(entry.tokens)
            if slot.pending:
                del slot.pending[: len(entry.tokens)]
            if entry.want_logits:
                index = next(sampled)
                for follower in self._slots:
                    if follower.gen is not None and follower.awaits is slot.gen:
                        self._share_prompt(slot, follower, index)
                self._sample(slot, index)

    def _share_prompt(self, leader: _Slot, follower: _Slot, index: int) -> None:
        """Give a follower the leader's prompt KV and its own first token from those logits."""
        self._decoder.share(leader.seq, follower.seq)
        follower.cached = list(leader.cached)
        follower.reused = leader.reused
        follower.awaits = None
        self._sample(follower, index)

    def _sample(self, slot: _Slot, index: int) -> None:
        token = self._decoder.sample(slot.seq, index)
        top = slot.gen.request.logprobs if slot.gen is not None else None
        if top is not None and not self._decoder.is_eog(token):
            slot.logprobs.append(self._decoder.logprobs(index, token, top))
        self._on_token(slot, token)

    def _on_token(self, slot: _Slot, token: int) -> None:
        gen = slot.gen
        assert gen is not None
        now = time.monotonic()
        if slot.first_token_at is None:
            slot.first_token_at = now
        request = gen.request
        if self._decoder.is_eog(token) and not request.ignore_eos:
            self._finish(slot, "stop", now)
            return
        slot.generated += 1
        text, stopped = slot.stops.feed(slot.utf8.feed(self._decoder.piece(token)))
        if text:
            slot.text.append(text)
            gen._put(text)
        if stopped:
            self._finish(slot, "stop", now)
        elif (
            slot.generated >= request.max_tokens or len(slot.cached) + 1 >= self._decoder.n_ctx_slot
        ):
            self._finish(slot, "length", now)
        else:
            slot.next_token = token

    def _finish(self, slot: _Slot, reason: str, now: float) -> None:
        gen = slot.gen
        assert gen is not None
        tail = slot.stops.feed(slot.utf8.flush())[0] + slot.stops.flush()
        if tail:
            slot.text.append(tail)
            gen._put(tail)
        first = slot.first_token_at if slot.first_token_at is not None else now
        result = GenerationResult(
            text="".join(slot.text),
            finish_reason=reason,
            prompt_tokens=len(gen.request.prompt),
            completion_tokens=slot.generated,
            cached_tokens=slot.reused,
            ttft_s=first - gen.submitted_at,
            total_s=now - gen.submitted_at,
            logprobs=tuple(slot.logprobs) if gen.request.logprobs is not None else None,
        )
        self._service_s = 0.8 * self._service_s + 0.2 * result.total_s
        slot.gen = None
        slot.next_token = None
        gen._put(_Done(result))

    def _abort(self, slot: _Slot, exc: AgentError) -> None:
        if slot.gen is not None:
            slot.gen._put(exc)
        slot.gen = None
        slot.pending = []
        slot.next_token = None

    def _fail_all(self, exc: AgentError) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for gen in waiting:
            gen._put(exc)
        for slot in self._slots:
            self._abort(slot, exc)
