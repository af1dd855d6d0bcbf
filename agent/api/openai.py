"""OpenAI-compatible routes: chat and text completions (with SSE streaming), embeddings, models.

Routes stay thin: validate, translate the request into a generation :class:`Job`,
and shape its events the way the official ``openai`` client expects: choices,
tool calls, logprobs and usage. The flow itself (leases, fallback, metrics) is
:mod:`agent.api.generation`, shared with the Ollama API.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from agent.api.deps import AgentState, Authorized, StateDep
from agent.api.embedding import check_dimensions, record_embedding
from agent.api.errors import error_body
from agent.api.generation import CLIENT_GONE, Delta, Job, Run, begin
from agent.api.openai_shapes import (
    chat_logprobs,
    completion_logprobs,
    tool_call_deltas,
    tool_calls,
)
from agent.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationFields,
)
from agent.errors import AgentError, InvalidRequest
from agent.runtime.base import Embedder
from agent.serving.scheduler import BatchScheduler, GenerationResult
from agent.serving.tools import (
    Tool,
    could_be_calls,
    parse_tool_calls,
    tool_prompt,
    with_system,
)

__all__ = ["router"]

router = APIRouter(prefix="/v1", dependencies=[Authorized])


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
    tools, choice = body.tool_set()
    grammar = body.constraint()
    offered = tools if choice.mode != "none" else []
    messages = [m.rendered() for m in body.messages]
    if offered:
        messages = with_system(messages, tool_prompt(tools, choice, parallel=body.parallel))

    def prompt(sched: BatchScheduler) -> list[int]:
        text = sched.decoder.apply_chat_template(messages)
        return sched.decoder.tokenize(text, special=True)

    if body.grammar is not None:
        source = "grammar"
    elif body.response_format is not None and body.response_format.type != "text":
        source = "response_format"
    else:
        source = "tools"
    job = _job(
        body,
        "chat",
        prompt,
        prompt_chars=sum(len(m["content"]) for m in messages),
        asked=next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""),
        grammar=grammar,
        grammar_param=source,
    )
    return await _serve(state, request, body, job, _Shape(chat=True, tools=offered))


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Response:
    raw = body.prompt
    shape = _Shape(chat=False)

    def prompt(sched: BatchScheduler) -> list[int]:
        if isinstance(raw, list) and raw and isinstance(raw[0], int):
            tokens = [int(t) for t in raw]
            vocab = sched.decoder.n_vocab
            if any(t < 0 or t >= vocab for t in tokens):
                raise InvalidRequest(f"token ids must be in [0, {vocab})", param="prompt")
            if body.echo:
                pieces = b"".join(sched.decoder.piece(t) for t in tokens)
                shape.echo = pieces.decode("utf-8", errors="replace")
            return tokens
        text = raw if isinstance(raw, str) else str(raw[0])
        if body.echo:
            shape.echo = text
        return sched.decoder.tokenize(text, special=False)

    job = _job(
        body,
        "completions",
        prompt,
        prompt_chars=len(raw) if isinstance(raw, str) else sum(len(str(x)) for x in raw),
        asked=raw if isinstance(raw, str) else "",
        grammar=body.constraint(),
        grammar_param="grammar",
    )
    return await _serve(state, request, body, job, shape)


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, state: StateDep) -> dict[str, Any]:
    started = time.monotonic()
    texts = body.texts()
    status, n_tokens, error = 500, 0, None
    try:
        with state.registry.lease(body.model, Embedder) as model:
            check_dimensions(body.model, model, body.dimensions)
            vectors = await run_in_threadpool(model.embed, texts)
            n_tokens = await run_in_threadpool(model.count_tokens, texts)
        status = 200
    except AgentError as exc:
        status, error = exc.status, exc.message
        raise
    finally:
        record_embedding(
            state,
            request_id=f"emb-{uuid.uuid4().hex[:24]}",
            model=body.model,
            endpoint="embeddings",
            texts=texts,
            status=status,
            n_tokens=n_tokens,
            error=error,
            elapsed=time.monotonic() - started,
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

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class _Shape:
    """What a choice carries beyond its text: tool calls to read back, an echoed prompt."""

    chat: bool
    tools: Sequence[Tool] = ()  # offered: a reply in the call shape becomes tool_calls
    echo: str = ""  # completions with echo: the prompt text, set once it is tokenised


def _job(
    body: GenerationFields,
    endpoint: str,
    prompt: Callable[[BatchScheduler], list[int]],
    *,
    prompt_chars: int,
    asked: str,
    grammar: str | None,
    grammar_param: str,
) -> Job:
    chat = endpoint == "chat"
    return Job(
        request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        model=body.model,
        endpoint=endpoint,
        make_prompt=prompt,
        prompt_chars=prompt_chars,
        asked=asked,
        sampling=body.sampling(grammar),
        max_tokens=body.max_tokens,
        stop=body.stops(),
        ignore_eos=body.ignore_eos,
        n=body.n,
        logprobs=body.top_logprobs_wanted(),
        prompt_param="messages" if chat else "prompt",
        grammar_param=grammar_param,
        log_prompt=_prompt_text(body),
    )


async def _serve(
    state: AgentState, request: Request, body: GenerationFields, job: Job, shape: _Shape
) -> Response:
    run = await begin(state, request, job)
    if run is None:
        return Response(status_code=CLIENT_GONE)
    if body.stream:
        return StreamingResponse(
            _stream(run, shape, body.include_usage()),
            media_type="text/event-stream",
            headers={**_STREAM_HEADERS, **run.headers()},
        )
    results = await run.complete(request)
    if results is None:
        return Response(status_code=CLIENT_GONE)
    choices = [_choice(shape, i, result) for i, result in enumerate(results)]
    return JSONResponse(
        _envelope(run, shape, choices, stream=False) | {"usage": _usage(results)},
        headers=run.headers(),
    )


def _envelope(
    run: Run, shape: _Shape, choices: list[dict[str, Any]], *, stream: bool
) -> dict[str, Any]:
    if shape.chat:
        obj = "chat.completion.chunk" if stream else "chat.completion"
    else:
        obj = "text_completion"
    return {
        "id": run.job.request_id,
        "object": obj,
        "created": run.created,
        "model": run.job.model,
        "choices": choices,
        "edgefleet": run.served.mark(),
    }


def _choice(shape: _Shape, index: int, result: GenerationResult) -> dict[str, Any]:
    logprobs = _logprobs(shape, result)
    if not shape.chat:
        text = shape.echo + result.text
        return {
            "index": index,
            "text": text,
            "finish_reason": result.finish_reason,
            "logprobs": logprobs,
        }
    calls = parse_tool_calls(result.text, shape.tools) if shape.tools else None
    if calls:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None,
            "tool_calls": tool_calls(calls),
        }
        finish = "tool_calls"
    else:
        message, finish = {"role": "assistant", "content": result.text}, result.finish_reason
    return {"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs}


def _logprobs(shape: _Shape, result: GenerationResult) -> dict[str, Any] | None:
    if result.logprobs is None:
        return None
    if shape.chat:
        return chat_logprobs(result.logprobs)
    return completion_logprobs(result.logprobs, offset=len(shape.echo))


async def _stream(run: Run, shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    """Chunks as the text comes; a reply that may be tool calls is held back until it is not."""

    def chunk(index: int, **delta: Any) -> str:
        finish, logprobs = delta.pop("finish", None), delta.pop("logprobs", None)
        if shape.chat:
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            text = delta.get("content") or ""
            choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        return _sse(_envelope(run, shape, [choice], stream=True))

    n = run.job.n
    held = [""] * n
    holding = [bool(shape.tools)] * n
    results: list[GenerationResult] = []
    try:
        async with aclosing(run.events()) as events:
            for i in range(n):
                if shape.chat:
                    yield chunk(i, role="assistant", content="")
                elif shape.echo:
                    yield chunk(i, content=shape.echo)
            async for event in events:
                i = event.index
                if isinstance(event, Delta):
                    text = event.text
                    if holding[i]:
                        held[i] += text
                        if could_be_calls(held[i]):
                            continue
                        holding[i], text, held[i] = False, held[i], ""
                    yield chunk(i, content=text)
                    continue
                result = event.result
                results.append(result)
                calls = parse_tool_calls(result.text, shape.tools) if shape.tools else None
                finish = result.finish_reason
                if calls:
                    yield chunk(i, tool_calls=tool_call_deltas(calls))
                    finish = "tool_calls"
                elif held[i]:
                    yield chunk(i, content=held[i])
                yield chunk(i, finish=finish, logprobs=_logprobs(shape, result))
        if include_usage:
            yield _sse(_envelope(run, shape, [], stream=True) | {"usage": _usage(results)})
        yield "data: [DONE]\n\n"
    except AgentError as exc:
        yield _sse(error_body(exc))
        yield "data: [DONE]\n\n"


def _usage(results: Sequence[GenerationResult]) -> dict[str, Any]:
    """The prompt counted once however many choices shared it."""
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens if results else 0},
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _prompt_text(body: GenerationFields) -> str | None:
    if isinstance(body, ChatCompletionRequest):
        return "\n".join(m.text() for m in body.messages)
    if isinstance(body, CompletionRequest) and isinstance(body.prompt, str):
        return body.prompt
    return None
