"""OpenAI-compatible routes: chat and text completions (with SSE streaming), embeddings, models.

Routes stay thin: validate, lease the model, hand a tokenised request to its
scheduler, and shape the answer the way the official ``openai`` client expects.
A lease is held until the last byte is sent, so a hot swap never pulls a model
out from under a stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from agent.api.deps import AgentState, Authorized, StateDep
from agent.api.errors import error_body
from agent.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationFields,
)
from agent.errors import AgentError, ContextOverflow, InvalidRequest, Overloaded
from agent.interaction_log import Interaction
from agent.runtime.base import Embedder
from agent.serving.cache import cache_key
from agent.serving.fallback import Answer, Served, Start, Started
from agent.serving.scheduler import BatchScheduler, GenerationRequest, GenerationResult

__all__ = ["router"]

router = APIRouter(prefix="/v1", dependencies=[Authorized])

_INLINE_TOKENIZE_CHARS = 4096  # longer prompts are tokenised off the event loop
CLIENT_GONE = 499  # nginx's code for "client closed request", used in metrics and logs


@router.get("/models")
def list_models(state: StateDep) -> dict[str, Any]:
    data = []
    for model in state.registry.models():
        m, info = model.manifest, model.info
        data.append(
            {
                "id": m.name,
                "object": "model",
                "created": state.started_at,
                "owned_by": "edgefleet",
                "edgefleet": {
                    "version": m.version,
                    "sha256": m.sha256,
                    "format": m.format.value,
                    "runtime": info.runtime,
                    "device": info.device,
                    "provider": info.provider,
                },
            }
        )
    return {"object": "list", "data": data}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: StateDep
) -> Response:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]

    def prompt(sched: BatchScheduler) -> list[int]:
        text = sched.decoder.apply_chat_template(messages)
        return sched.decoder.tokenize(text, special=True)

    size = sum(len(m["content"]) for m in messages)
    asked = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return await _generate(state, request, body, prompt, size, asked, chat=True)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Response:
    raw = body.prompt

    def prompt(sched: BatchScheduler) -> list[int]:
        if isinstance(raw, list) and raw and isinstance(raw[0], int):
            tokens = [int(t) for t in raw]
            vocab = sched.decoder.n_vocab
            if any(t < 0 or t >= vocab for t in tokens):
                raise InvalidRequest(f"token ids must be in [0, {vocab})", param="prompt")
            return tokens
        text = raw if isinstance(raw, str) else str(raw[0])
        return sched.decoder.tokenize(text, special=False)

    size = len(raw) if isinstance(raw, str) else sum(len(str(x)) for x in raw)
    asked = raw if isinstance(raw, str) else ""
    return await _generate(state, request, body, prompt, size, asked, chat=False)


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, state: StateDep) -> dict[str, Any]:
    started = time.monotonic()
    texts = body.texts()
    status, n_tokens, error = 500, 0, None
    try:
        with state.registry.lease(body.model, Embedder) as model:
            dim = model.manifest.runtime.embedding_dim
            if body.dimensions is not None and dim is not None and body.dimensions != dim:
                raise InvalidRequest(
                    f"model {body.model!r} produces {dim}-dimensional vectors; "
                    "dimensions cannot be changed",
                    param="dimensions",
                )
            vectors = await run_in_threadpool(model.embed, texts)
            n_tokens = await run_in_threadpool(model.count_tokens, texts)
        status = 200
    except AgentError as exc:
        status, error = exc.status, exc.message
        raise
    finally:
        elapsed = time.monotonic() - started
        state.metrics.requests.labels(body.model, "embeddings", str(status)).inc()
        state.metrics.latency.labels(body.model, "embeddings").observe(elapsed)
        state.metrics.window.observe(status, elapsed)
        bodies = state.settings.log.include_bodies
        state.interactions.record(
            Interaction(
                request_id=f"emb-{uuid.uuid4().hex[:24]}",
                model=body.model,
                endpoint="embeddings",
                status=status,
                prompt_tokens=n_tokens,
                completion_tokens=0,
                latency_ms=elapsed * 1000,
                error=error,
                prompt="\n".join(texts) if bodies else None,
            )
        )
    data = [
        {"object": "embedding", "index": i, "embedding": _encode_vector(row, body.encoding_format)}
        for i, row in enumerate(vectors)
    ]
    state.metrics.tokens.labels(body.model, "prompt").inc(n_tokens)
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }


def _encode_vector(row: np.ndarray[Any, Any], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode()
    return [float(x) for x in row]


# -- generation ------------------------------------------------------------------------


class _Call:
    """Bookkeeping for one generation request: ids, timings, metrics and the log line."""

    def __init__(self, state: AgentState, body: GenerationFields, chat: bool) -> None:
        self.state = state
        self.body = body
        self.chat = chat
        self.endpoint = "chat" if chat else "completions"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.started = time.monotonic()
        self.bodies = state.settings.log.include_bodies
        self.served = Served(by=body.model, tier="primary", degraded=False)

    def chunk(self, content: str | None, finish: str | None, role: bool = False) -> str:
        if self.chat:
            delta: dict[str, str] = {}
            if role:
                delta["role"] = "assistant"
            if content is not None:
                delta["content"] = content
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return _sse(
            {
                "id": self.id,
                "object": obj,
                "created": self.created,
                "model": self.body.model,
                "choices": [choice],
                "edgefleet": self.served.mark(),
            }
        )

    def usage_chunk(self, result: GenerationResult) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return _sse(
            {
                "id": self.id,
                "object": obj,
                "created": self.created,
                "model": self.body.model,
                "choices": [],
                "usage": _usage(result),
                "edgefleet": self.served.mark(),
            }
        )

    def full(self, result: GenerationResult) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": result.text,
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.body.model,
            "choices": [choice],
            "usage": _usage(result),
            "edgefleet": self.served.mark(),
        }

    def record(self, status: int, result: GenerationResult | None, error: str | None) -> None:
        m, model = self.state.metrics, self.body.model
        elapsed = time.monotonic() - self.started
        m.requests.labels(model, self.endpoint, str(status)).inc()
        m.latency.labels(model, self.endpoint).observe(elapsed)
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
        self.state.interactions.record(
            Interaction(
                request_id=self.id,
                model=model,
                endpoint=self.endpoint,
                status=status,
                prompt_tokens=result.prompt_tokens if result else 0,
                completion_tokens=result.completion_tokens if result else 0,
                latency_ms=elapsed * 1000,
                ttft_ms=result.ttft_s * 1000 if result else None,
                error=error,
                prompt=_prompt_text(self.body) if self.bodies else None,
                response=result.text if result and self.bodies else None,
            )
        )


async def _generate(
    state: AgentState,
    request: Request,
    body: GenerationFields,
    make_prompt: Callable[[BatchScheduler], list[int]],
    prompt_chars: int,
    prompt_text: str,
    *,
    chat: bool,
) -> Response:
    call = _Call(state, body, chat)
    start = _starter(state, body, make_prompt, prompt_chars)
    chain = state.degraded.chain(body.model)
    answer = Answer(body.model, chain, prompt_text, state.degraded, state.registry, start)
    return await _answer(call, request, answer)


_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
T = TypeVar("T")


def _starter(
    state: AgentState,
    body: GenerationFields,
    make_prompt: Callable[[BatchScheduler], list[int]],
    prompt_chars: int,
) -> Start:
    """How the fallback walker begins generating on a model: a continuation when ``sent``."""

    async def start(name: str, sent: str) -> Started:
        stack = ExitStack()
        try:
            sched = stack.enter_context(state.registry.lease(name, BatchScheduler))
            if prompt_chars > _INLINE_TOKENIZE_CHARS:
                prompt = await run_in_threadpool(make_prompt, sched)
            else:
                prompt = make_prompt(sched)
            if sent:
                prompt += sched.decoder.tokenize(sent, special=False)
            gen_request = _plan(sched, prompt, body, state.settings.request_timeout_s)
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
            if isinstance(exc, Overloaded):
                state.metrics.rejections.labels(name, "queue_full").inc()
            elif isinstance(exc, ContextOverflow):
                state.metrics.rejections.labels(name, "context_overflow").inc()
            raise
        return Started(gen, cached, stack.close, lambda result: state.cache.put(key, result))

    return start


async def _answer(call: _Call, request: Request, answer: Answer) -> Response:
    """Serve the answer (through the fallback chain, if any): headers name who answers first."""
    try:
        primed = await _unless_gone(answer.prime(), answer, request)
    except AgentError as exc:
        call.record(exc.status, None, exc.message)
        raise
    if not primed:
        await answer.aclose()
        call.record(CLIENT_GONE, None, "client disconnected")
        return Response(status_code=CLIENT_GONE)
    assert answer.served is not None
    call.served = answer.served
    if call.body.stream:
        return StreamingResponse(
            _stream_answer(call, answer),
            media_type="text/event-stream",
            headers={**_STREAM_HEADERS, **answer.served.headers()},
        )
    try:
        result = await _unless_gone(answer.complete(), answer, request)
    except AgentError as exc:
        call.record(exc.status, None, exc.message)
        raise
    finally:
        await answer.aclose()
    if result is None:
        call.record(CLIENT_GONE, None, "client disconnected")
        return Response(status_code=CLIENT_GONE)
    assert answer.served is not None
    call.served = answer.served
    call.record(200, result, None)
    return JSONResponse(call.full(result), headers=answer.served.headers())


async def _stream_answer(call: _Call, answer: Answer) -> AsyncIterator[str]:
    status, result = CLIENT_GONE, None
    error: str | None = "client disconnected"
    try:
        if call.chat:
            yield call.chunk("", None, role=True)
        async for text in answer:
            if answer.served is not None:
                call.served = answer.served  # a model tier may have taken over mid-stream
            yield call.chunk(text, None)
        result = answer.result
        assert result is not None
        yield call.chunk(None, result.finish_reason)
        if call.body.include_usage():
            yield call.usage_chunk(result)
        yield "data: [DONE]\n\n"
        status, error = 200, None
    except AgentError as exc:
        status, error = exc.status, exc.message
        yield _sse(error_body(exc))
        yield "data: [DONE]\n\n"
    finally:
        answer.cancel()
        await answer.aclose()
        call.record(status, result, error)


def _plan(
    sched: BatchScheduler, prompt: list[int], body: GenerationFields, timeout_s: float
) -> GenerationRequest:
    """Fit the request to the context window: too long a prompt or max_tokens is a 400."""
    n_ctx = sched.context_length
    room = n_ctx - len(prompt)
    if room <= 0:
        raise ContextOverflow(
            f"This model's maximum context length is {n_ctx} tokens, but the prompt has "
            f"{len(prompt)} tokens. Shorten the prompt.",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
        )
    if body.max_tokens is None:
        max_tokens = min(sched.manifest.runtime.max_tokens_default, room)
    elif body.max_tokens > room:
        raise ContextOverflow(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{len(prompt) + body.max_tokens} tokens ({len(prompt)} in the prompt, "
            f"{body.max_tokens} for the completion). Reduce the prompt or max_tokens.",
            param="max_tokens",
        )
    else:
        max_tokens = body.max_tokens
    return GenerationRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=body.sampling(),
        stop=body.stops(),
        ignore_eos=body.ignore_eos,
        timeout_s=timeout_s,
    )


async def _unless_gone(work: Awaitable[T], answer: Answer, request: Request) -> T | None:
    """Wait for ``work``, or cancel the answer the moment the client hangs up (None)."""

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
    answer.cancel()
    task.cancel()
    return None


def _usage(result: GenerationResult) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _prompt_text(body: GenerationFields) -> str | None:
    if isinstance(body, ChatCompletionRequest):
        return "\n".join(m.text() for m in body.messages)
    if isinstance(body, CompletionRequest) and isinstance(body.prompt, str):
        return body.prompt
    return None
