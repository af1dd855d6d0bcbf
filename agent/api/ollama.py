"""Ollama-compatible routes: chat and generate (NDJSON streams), embed, and the model listings.

Many local apps speak only Ollama's API (Home Assistant, Open WebUI, n8n, editor
plug-ins), so the agent answers it beside the OpenAI one, on the same models.
Routes stay thin: validate (:mod:`agent.api.ollama_schemas`), translate the request
into a generation :class:`Job`, and shape its events the way Ollama's clients expect
(:mod:`agent.api.ollama_shapes`). The flow itself (leases, fallback, metrics, the
interaction log) is :mod:`agent.api.generation`, shared with the OpenAI routes.

Errors are Ollama's ``{"error": "..."}`` (:mod:`agent.api.errors`); one that happens
after a stream has begun is its last line, which Ollama's clients raise.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from agent.api.deps import AgentState, Authorized, StateDep
from agent.api.embedding import check_dimensions, record_embedding
from agent.api.generation import CLIENT_GONE, Delta, Job, Run, begin
from agent.api.ollama_schemas import (
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    GenerationFields,
    ShowRequest,
    served_name,
)
from agent.api.ollama_shapes import (
    listed_name,
    logprobs,
    model_info,
    parameters,
    running,
    stats,
    tag,
    timestamp,
    tool_calls,
)
from agent.errors import AgentError, InvalidRequest
from agent.runtime.base import Embedder, ServedModel
from agent.serving.scheduler import BatchScheduler, GenerationResult
from agent.serving.tools import (
    Tool,
    ToolChoice,
    could_be_calls,
    parse_tool_calls,
    tool_prompt,
    with_system,
)
from agent.state.report import agent_version

__all__ = ["router"]

router = APIRouter(prefix="/api", dependencies=[Authorized])

_NDJSON = "application/x-ndjson"
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- models ------------------------------------------------------------------------------


@router.get("/version")
def version() -> dict[str, str]:
    return {"version": agent_version()}


@router.get("/tags")
def tags(state: StateDep) -> dict[str, Any]:
    """Every model apps can ask for; the agent's start stands in for a model's file time."""
    return {"models": [tag(m.manifest, m.info, state.started_at) for m in state.registry.models()]}


@router.get("/ps")
def ps(state: StateDep) -> dict[str, Any]:
    """Every served model is loaded and stays loaded: the agent serves a fixed set."""
    return {"models": [running(m.manifest, m.info, _context(m)) for m in state.registry.models()]}


@router.post("/show")
def show(body: ShowRequest, state: StateDep) -> dict[str, Any]:
    name = _served(state, body.model)
    with state.registry.lease(name, ServedModel) as model:
        m, info, context = model.manifest, model.info, _context(model)
        template, params = "", ""
        if isinstance(model, BatchScheduler):
            capabilities = ["completion", "tools"]
            template = _template(model)
            params = parameters(model.context_length, m.runtime.max_tokens_default)
        else:
            capabilities = ["embedding"] if isinstance(model, Embedder) else []
    entry = tag(m, info, state.started_at)
    return {
        "modelfile": (
            f"# edgefleet {agent_version()} serves {m.name} {m.version}; "
            f"it reads no Modelfile\nFROM {listed_name(m)}\n"
        ),
        "parameters": params,
        "template": template,
        "details": entry["details"],
        "model_info": model_info(m, info, context),
        "capabilities": capabilities,
        "modified_at": entry["modified_at"],
    }


def _context(model: ServedModel) -> int | None:
    if isinstance(model, BatchScheduler):
        return model.context_length
    if isinstance(model, Embedder):
        return model.manifest.runtime.max_input_tokens
    return None


def _template(sched: BatchScheduler) -> str:
    """How one user prompt is wrapped, written with Ollama's ``{{ .Prompt }}`` placeholder."""
    try:
        return sched.decoder.apply_chat_template([{"role": "user", "content": "{{ .Prompt }}"}])
    except InvalidRequest:
        return ""


def _served(state: AgentState, name: str) -> str:
    loading, failed = state.registry.waiting()
    versions = dict.fromkeys(state.registry.names(), "")
    for m in state.registry.models():
        if m.manifest.name in versions:
            versions[m.manifest.name] = m.manifest.version
    return served_name(name, versions, [*loading, *failed])


# -- embeddings --------------------------------------------------------------------------


@router.post("/embed")
async def embed(body: EmbedRequest, state: StateDep) -> dict[str, Any]:
    name = _served(state, body.model)
    started = time.monotonic()
    texts = body.texts()
    status, n_tokens, error = 500, 0, None
    try:
        with state.registry.lease(name, Embedder) as model:
            check_dimensions(name, model, body.dimensions)
            body.options.check_context(name, model.manifest.runtime.max_input_tokens)
            if not body.truncate:
                await _refuse_long(model, texts, name)
            vectors = await run_in_threadpool(model.embed, texts)
            n_tokens = await run_in_threadpool(model.count_tokens, texts)
        status = 200
    except AgentError as exc:
        status, error = exc.status, exc.message
        raise
    finally:
        record_embedding(
            state,
            request_id=f"ollama-{uuid.uuid4().hex[:24]}",
            model=name,
            endpoint="ollama_embed",
            texts=texts,
            status=status,
            n_tokens=n_tokens,
            error=error,
            elapsed=time.monotonic() - started,
        )
    state.metrics.tokens.labels(name, "prompt").inc(n_tokens)
    return {
        "model": body.model,
        "embeddings": [[float(x) for x in row] for row in vectors],
        "total_duration": round((time.monotonic() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": n_tokens,
    }


async def _refuse_long(model: Embedder, texts: Sequence[str], name: str) -> None:
    """``truncate: false``: an input the model would cut is a 400, as Ollama answers."""
    limit = model.manifest.runtime.max_input_tokens
    counts = await run_in_threadpool(lambda: [model.count_tokens([t]) for t in texts])
    for i, count in enumerate(counts):
        if count >= limit:
            raise InvalidRequest(
                f"input[{i}] reaches model {name!r}'s limit of {limit} tokens and would be "
                "cut; shorten it or send truncate=true",
                param="input",
            )


# -- generation --------------------------------------------------------------------------


@router.post("/chat", response_model=None)
async def chat(body: ChatRequest, request: Request, state: StateDep) -> Response:
    name = _served(state, body.model)
    shape = _Shape(model=body.model, chat=True, tools=body.tool_set())
    if not body.messages:
        return _loaded(state, name, shape)
    grammar = body.grammar()
    messages = [m.rendered() for m in body.messages]
    if shape.tools:
        prompt_text = tool_prompt(shape.tools, ToolChoice("auto"), parallel=True)
        messages = with_system(messages, prompt_text)

    def prompt(sched: BatchScheduler) -> list[int]:
        body.options.check_context(name, sched.context_length)
        text = sched.decoder.apply_chat_template(messages)
        return sched.decoder.tokenize(text, special=True)

    asked = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    job = _job(
        body,
        name,
        "ollama_chat",
        prompt,
        grammar,
        asked=asked,
        texts=[m["content"] for m in messages],
    )
    return await _serve(state, request, body, job, shape)


@router.post("/generate", response_model=None)
async def generate(body: GenerateRequest, request: Request, state: StateDep) -> Response:
    name = _served(state, body.model)
    shape = _Shape(model=body.model, chat=False)
    text = body.prompt or ""
    if not text and not body.system:
        return _loaded(state, name, shape)
    grammar = body.grammar()
    messages = [{"role": "system", "content": body.system}] if body.system else []
    messages.append({"role": "user", "content": text})

    def prompt(sched: BatchScheduler) -> list[int]:
        body.options.check_context(name, sched.context_length)
        if body.raw:  # the caller formatted it, control tokens and all
            return sched.decoder.tokenize(text, special=True)
        return sched.decoder.tokenize(sched.decoder.apply_chat_template(messages), special=True)

    job = _job(
        body,
        name,
        "ollama_generate",
        prompt,
        grammar,
        asked=text,
        texts=[m["content"] for m in messages],
    )
    return await _serve(state, request, body, job, shape)


@dataclass(frozen=True)
class _Shape:
    """How an answer goes back: a chat message or a generated response, and its tools."""

    model: str  # the name as the client sent it: Ollama echoes it
    chat: bool
    tools: Sequence[Tool] = ()


def _job(
    body: GenerationFields,
    name: str,
    endpoint: str,
    prompt: Callable[[BatchScheduler], list[int]],
    grammar: str | None,
    *,
    asked: str,
    texts: Sequence[str],
) -> Job:
    return Job(
        request_id=f"ollama-{uuid.uuid4().hex[:24]}",
        model=name,
        endpoint=endpoint,
        make_prompt=prompt,
        prompt_chars=sum(len(t) for t in texts),
        asked=asked,
        sampling=body.options.sampling(grammar),
        max_tokens=body.options.max_tokens(),
        stop=body.options.stops(),
        logprobs=body.top_logprobs_wanted(),
        prompt_param="messages" if endpoint == "ollama_chat" else "prompt",
        grammar_param="format",
        max_tokens_param="options.num_predict",
        log_prompt="\n".join(texts),
    )


def _loaded(state: AgentState, name: str, shape: _Shape) -> Response:
    """Ollama's "load the model" request (no prompt): the model is loaded already, if served."""
    with state.registry.lease(name, BatchScheduler):
        pass
    return JSONResponse(_part(shape, "") | {"done": True, "done_reason": "load"})


async def _serve(
    state: AgentState, request: Request, body: GenerationFields, job: Job, shape: _Shape
) -> Response:
    run = await begin(state, request, job)
    if run is None:
        return Response(status_code=CLIENT_GONE)
    if body.stream:
        return StreamingResponse(
            _stream(run, shape),
            media_type=_NDJSON,
            headers={**_STREAM_HEADERS, **run.headers()},
        )
    results = await run.complete(request)
    if results is None:
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(_whole(run, shape, results[0]), headers=run.headers())


def _whole(run: Run, shape: _Shape, result: GenerationResult) -> dict[str, Any]:
    """A whole answer: its text, or the tool calls it turned out to be, and how it ended."""
    calls = parse_tool_calls(result.text, shape.tools) if shape.tools else None
    out = _part(shape, "" if calls else result.text)
    if calls:
        out["message"]["tool_calls"] = tool_calls(calls)
    return out | _done(run, result)


def _part(shape: _Shape, text: str) -> dict[str, Any]:
    """One object of the answer: a message (chat) or a response (generate), not done yet."""
    out: dict[str, Any] = {"model": shape.model, "created_at": timestamp(time.time())}
    if shape.chat:
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["response"] = text
    out["done"] = False
    return out


def _done(run: Run, result: GenerationResult) -> dict[str, Any]:
    """What ends an answer: why it stopped, the counters, and which tier served it."""
    out: dict[str, Any] = {
        "done": True,
        "done_reason": result.finish_reason,
        **stats(result, time.monotonic() - run.started),
    }
    if result.logprobs is not None:
        out["logprobs"] = logprobs(result.logprobs)
    out["edgefleet"] = run.served.mark()
    return out


async def _stream(run: Run, shape: _Shape) -> AsyncIterator[str]:
    """One JSON object per line as the text comes; a reply that may be tool calls waits."""
    held, holding = "", bool(shape.tools)
    try:
        async with aclosing(run.events()) as events:
            async for event in events:
                if isinstance(event, Delta):
                    text = event.text
                    if holding:
                        held += text
                        if could_be_calls(held):
                            continue
                        holding, text, held = False, held, ""
                    if text:
                        yield _line(_part(shape, text))
                    continue
                result = event.result
                calls = parse_tool_calls(result.text, shape.tools) if shape.tools else None
                if calls:
                    part = _part(shape, "")
                    part["message"]["tool_calls"] = tool_calls(calls)
                    yield _line(part)
                elif held:
                    yield _line(_part(shape, held))
                yield _line(_part(shape, "") | _done(run, result))
    except AgentError as exc:
        yield _line({"error": exc.message})


def _line(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n"
