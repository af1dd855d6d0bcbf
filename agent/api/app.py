"""The agent's FastAPI app. Everything stateful is built in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from agent.api import kserve, openai, ops
from agent.api.deps import AgentState
from agent.api.errors import install_error_handlers
from agent.api.limits import BodyLimit
from agent.config import AgentSettings, ModelSpec
from agent.errors import AgentError
from agent.interaction_log import InteractionLog
from agent.metrics import AgentMetrics
from agent.probe import GpuSampler, probe_device
from agent.serving.cache import ResponseCache
from agent.serving.loader import load_model
from agent.serving.registry import ModelRegistry

__all__ = ["create_app", "swap_model"]

log = logging.getLogger(__name__)


async def _load_configured(state: AgentState) -> None:
    """Load every configured model in turn; a failure is reported by /readyz, not fatal."""
    for spec in state.settings.models:
        await swap_model(state, spec)


async def swap_model(state: AgentState, spec: ModelSpec) -> None:
    """Load ``spec`` and serve it under its name; in-flight requests finish on the old model."""
    started = time.monotonic()
    try:
        model = await run_in_threadpool(load_model, spec, state.settings, state.registry)
    except AgentError as exc:
        log.error("model %s failed to load: %s", spec.name, exc.message)
        state.registry.fail(spec.name, exc.message)
        return
    state.metrics.load_seconds.labels(spec.name).set(time.monotonic() - started)
    state.registry.publish(spec.name, model)


def create_app(settings: AgentSettings) -> FastAPI:
    """An app serving ``settings.models``; ready (``/readyz``) once they are loaded."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        budget = settings.memory_budget_mb * 2**20 if settings.memory_budget_mb else None
        registry = ModelRegistry(memory_budget_bytes=budget)
        for spec in settings.models:
            registry.expect(spec.name)
        gpus = GpuSampler()
        state = AgentState(
            settings=settings,
            registry=registry,
            metrics=AgentMetrics(registry.models, gpus.sample),
            interactions=InteractionLog(settings.log),
            device=await run_in_threadpool(probe_device),
            cache=ResponseCache(settings.cache_entries),
            started_at=int(time.time()),
        )
        app.state.agent = state
        loading = asyncio.create_task(_load_configured(state))
        try:
            yield
        finally:
            loading.cancel()
            await run_in_threadpool(registry.close)
            state.interactions.close()
            gpus.close()

    app = FastAPI(
        title="edgefleet agent",
        summary="OpenAI-compatible and Open Inference Protocol API for the models on this device",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(kserve.router)
    return app
