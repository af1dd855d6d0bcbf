"""The agent's FastAPI app. Everything stateful is built in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

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
from agent.serving.loader import load_model, resolve
from agent.serving.registry import ModelRegistry
from agent.state.plan import Unload, plan_models
from agent.store import ModelStore
from models.manifest import ModelManifest

__all__ = ["create_app", "reconcile"]

log = logging.getLogger(__name__)


def _on_hangup(
    state: AgentState, reload: Callable[[], AgentSettings], tasks: set[asyncio.Task[None]]
) -> None:
    try:
        desired = list(reload().models)
    except AgentError as exc:
        log.error(
            "SIGHUP: keeping the current models, the new configuration is invalid: %s", exc.message
        )
        return
    log.info("SIGHUP: reconciling %d configured models", len(desired))
    task = asyncio.create_task(reconcile(state, desired))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def reconcile(state: AgentState, desired: list[ModelSpec]) -> None:
    """Serve exactly ``desired``: load new models, hot-swap changed ones, unload the rest.

    A new model that fails to resolve or load is reported by /readyz; a served model
    whose replacement fails keeps serving. Reconciles run one at a time.
    """
    async with state.reconciling:
        await _reconcile(state, desired)


async def _reconcile(state: AgentState, desired: list[ModelSpec]) -> None:
    store = ModelStore(state.settings.store_dir)
    resolved: dict[str, tuple[ModelSpec, ModelManifest, Path | None]] = {}
    for spec in desired:
        try:
            manifest, path = await run_in_threadpool(resolve, spec, store)
        except AgentError as exc:
            log.error("model %s cannot be resolved: %s", spec.name, exc.message)
            current = state.loaded.get(spec.name)
            if current is None:
                state.registry.fail(spec.name, exc.message)
            else:  # keep what is served: the planner sees no change
                resolved[spec.name] = (*current, None)
            continue
        resolved[spec.name] = (spec, manifest, path)
    steps = plan_models(state.loaded, [(spec, manifest) for spec, manifest, _ in resolved.values()])
    for step in steps:
        if isinstance(step, Unload):
            log.info("unloading %s", step.name)
            state.registry.remove(step.name)
            state.loaded.pop(step.name, None)
            continue
        spec, manifest, file = resolved[step.spec.name]
        assert file is not None  # only unchanged models lack a file, and they get no step
        started = time.monotonic()
        try:
            model = await run_in_threadpool(
                load_model, manifest, file, state.settings, state.registry
            )
        except AgentError as exc:
            log.error("model %s failed to load: %s", spec.name, exc.message)
            if not step.replaces:
                state.registry.fail(spec.name, exc.message)
            continue  # a failed swap keeps serving the previous model
        state.metrics.load_seconds.labels(spec.name).set(time.monotonic() - started)
        state.registry.publish(spec.name, model)
        state.loaded[spec.name] = (spec, model.manifest)


def create_app(
    settings: AgentSettings, *, reload: Callable[[], AgentSettings] | None = None
) -> FastAPI:
    """An app serving ``settings.models``; ready (``/readyz``) once they are loaded.

    With ``reload``, SIGHUP re-reads the settings and reconciles the served models
    (hot swap); other settings take effect at the next start.
    """

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
            loaded={},
        )
        app.state.agent = state
        tasks = {asyncio.create_task(reconcile(state, list(settings.models)))}
        loop = asyncio.get_running_loop()
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, _on_hangup, state, reload, tasks)
        try:
            yield
        finally:
            if reload is not None:
                loop.remove_signal_handler(signal.SIGHUP)
            for task in tasks:
                task.cancel()
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
