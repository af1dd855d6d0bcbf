"""The agent's FastAPI app. Everything stateful is built in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from agent.api import faults, kserve, ollama, openai, ops
from agent.api.content_type import OllamaJsonBody
from agent.api.deps import AgentState
from agent.api.errors import install_error_handlers
from agent.api.limits import BodyLimit
from agent.boot_status import BootRecorder, BootStatus, Step, summary
from agent.config import AgentSettings
from agent.errors import AgentError
from agent.interaction_log import InteractionLog
from agent.link.fleet import FleetLink, link_enabled
from agent.link.identity import StateDir
from agent.link.telemetry import TelemetrySource
from agent.metrics import AgentMetrics
from agent.probe import GpuSampler, probe_device
from agent.serving.breaker import Transition
from agent.serving.cache import ResponseCache
from agent.serving.degraded import DegradedMode
from agent.serving.faults import FaultInjector
from agent.serving.loader import load_model
from agent.serving.registry import ModelRegistry
from agent.serving.thermal import thermal_verdict
from agent.state.apply import ExecutorContext, ModelController
from agent.state.policy import PolicyKeeper
from agent.state.saved import SavedDesired
from agent.store import ModelStore
from agent.systemd import Notifier, keep_watchdog
from models.wire import DesiredState, EventKind, Severity

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _on_hangup(
    controller: ModelController,
    reload: Callable[[], AgentSettings],
    tasks: set[asyncio.Task[Any]],
) -> None:
    try:
        configured = list(reload().models)
    except AgentError as exc:
        log.error(
            "SIGHUP: keeping the current models, the new configuration is invalid: %s", exc.message
        )
        return
    log.info("SIGHUP: reconciling %d configured models", len(configured))
    task = asyncio.create_task(controller.reload_config(configured))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _saved_desired(state_dir: StateDir, saved: SavedDesired) -> DesiredState | None:
    """The desired state saved by an earlier run, if it belongs to this device's identity."""
    desired = saved.load()
    if desired is None:
        return None
    try:
        identity = state_dir.load_identity()
    except AgentError:
        identity = None
    if identity is None or identity.device_id != desired.device_id:
        log.warning(
            "ignoring %s: it was sent to device %s, and this agent is %s",
            saved.path,
            desired.device_id,
            identity.device_id if identity else "not enrolled",
        )
        return None
    log.info("serving desired state %d from %s", desired.version, saved.path)
    return desired


THERMAL_INTERVAL_S = 5.0  # how often the GPU temperature and throttling are checked


async def _watch_thermal(
    degraded: DegradedMode, gpus: GpuSampler, interval_s: float = THERMAL_INTERVAL_S
) -> None:
    """Hold GPU models' breakers open while the device is too hot or throttled."""
    while True:
        policy = degraded.policy
        if policy is not None:
            verdict = thermal_verdict(await run_in_threadpool(gpus.sample), policy.breaker)
            degraded.thermal(verdict)
        await asyncio.sleep(interval_s)


def _breaker_event(transition: Transition) -> tuple[EventKind, Severity]:
    kinds = {
        "open": (EventKind.BREAKER_OPENED, Severity.WARNING),
        "half_open": (EventKind.BREAKER_HALF_OPEN, Severity.INFO),
        "closed": (EventKind.BREAKER_CLOSED, Severity.INFO),
    }
    return kinds[transition.new.value]


async def _announce_ready(
    controller: ModelController,
    listening: asyncio.Event | None,
    registry: ModelRegistry,
    boot: BootRecorder,
    notifier: Notifier,
) -> None:
    """Once the models to serve are loaded (or failed) and the API listens: READY=1.

    READY goes out whatever the models did: a model that fails to load is reported by
    /readyz and the models step, and restarting the agent would not fix its file.
    """
    await controller.serving.wait()  # not the whole reconcile: it may download updates
    if listening is not None:
        await listening.wait()
    names = registry.names()
    boot.finish(Step.SERVING, f"the API serves {', '.join(names) if names else 'no models yet'}")
    notifier.ready(summary(boot.status))
    log.info("ready: %s", summary(boot.status))


def create_app(
    settings: AgentSettings,
    *,
    reload: Callable[[], AgentSettings] | None = None,
    boot: BootRecorder | None = None,
    notifier: Notifier | None = None,
    listening: asyncio.Event | None = None,
) -> FastAPI:
    """An app serving ``settings.models``; ready (``/readyz``) once they are loaded.

    With ``reload``, SIGHUP re-reads the settings and reconciles the served models
    (hot swap); other settings take effect at the next start. When the device is in a
    fleet (``settings.fleet``), the link runs in the background and a desired state
    from the controller, once received, decides the models instead of the config.

    The process edge (the CLI) passes ``boot`` (first-boot progress, ``boot.json``),
    ``notifier`` (systemd: READY once the first models are loaded and ``listening`` is
    set by the server, STATUS for each step, watchdog pings while every serving loop
    beats, STOPPING) and ``listening``; without them progress stays in memory and
    nothing is notified.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        recorder = boot or BootRecorder(None)
        systemd = notifier or Notifier()

        def tell_systemd(status: BootStatus) -> None:
            systemd.status(summary(status))

        recorder.listeners.append(tell_systemd)
        budget = settings.memory_budget_mb * 2**20 if settings.memory_budget_mb else None
        registry = ModelRegistry(memory_budget_bytes=budget)
        gpus = GpuSampler()
        degraded = DegradedMode()
        metrics = AgentMetrics(
            registry.models,
            gpus.sample,
            lambda: [(b.model, b.state.value) for b in degraded.breakers()],
        )
        degraded.listeners.append(
            lambda t: metrics.breaker_transitions.labels(t.model, t.new.value).inc()
        )
        state = AgentState(
            settings=settings,
            registry=registry,
            metrics=metrics,
            interactions=InteractionLog(settings.log),
            device=await run_in_threadpool(probe_device),
            cache=ResponseCache(settings.cache_entries),
            started_at=int(time.time()),
            degraded=degraded,
            faults=FaultInjector() if settings.fault_injection else None,
        )
        app.state.agent = state
        # A crash may have left an update half done: settle it before anything is served.
        await run_in_threadpool(ModelStore(settings.store_dir).recover)
        state_dir = StateDir(settings.fleet.state_dir) if link_enabled(settings.fleet) else None
        saved = SavedDesired(state_dir.desired_path) if state_dir is not None else None
        desired = (
            await run_in_threadpool(_saved_desired, state_dir, saved)
            if state_dir is not None and saved is not None
            else None
        )
        if desired is not None:
            recorder.finish(Step.DESIRED_STATE, f"version {desired.version}, saved earlier")
        policies = PolicyKeeper(
            degraded,
            settings.fallback,
            state_dir.desired_path.with_name("policy.json") if state_dir is not None else None,
        )
        policies.start(desired)
        controller = ModelController(
            ExecutorContext(settings, registry, state.metrics, state.device, degraded),
            settings.models,
            saved=saved,
            desired=desired,
            load=partial(load_model, faults=state.faults),
            policies=policies,
            boot=recorder,
        )
        for name in controller.expected():
            registry.expect(name)
        tasks: set[asyncio.Task[Any]] = set()
        loop = asyncio.get_running_loop()
        try:
            async with AsyncExitStack() as stack:
                if state_dir is not None:
                    telemetry = TelemetrySource(state.metrics.window, registry.models, gpus.sample)
                    link = FleetLink(
                        settings.fleet, controller, telemetry, state.device, boot=recorder
                    )
                    controller.on_change = link.report_changed
                    controller.on_outcomes = link.model_outcomes

                    def breaker_moved(t: Transition, link: FleetLink = link) -> None:
                        kind, severity = _breaker_event(t)
                        data = {"model": t.model, "from": t.old.value, "to": t.new.value}
                        if t.kind is not None:
                            data["kind"] = t.kind.value
                        link.emit(kind, t.reason, severity=severity, data=data)
                        link.report_changed()

                    degraded.listeners.append(breaker_moved)
                    policies.emit = lambda kind, message, severity, data: link.emit(
                        kind, message, severity=severity, data=data
                    )
                    state.fleet = await stack.enter_async_context(link)
                tasks.add(asyncio.create_task(controller.reconcile()))
                tasks.add(asyncio.create_task(_watch_thermal(degraded, gpus)))
                tasks.add(
                    asyncio.create_task(
                        _announce_ready(controller, listening, registry, recorder, systemd)
                    )
                )
                tasks.add(asyncio.create_task(keep_watchdog(systemd, registry.heartbeats)))
                if reload is not None:
                    loop.add_signal_handler(signal.SIGHUP, _on_hangup, controller, reload, tasks)
                try:
                    yield
                finally:
                    systemd.stopping()
                    if reload is not None:
                        loop.remove_signal_handler(signal.SIGHUP)
                    for task in tasks:
                        task.cancel()
        finally:
            recorder.listeners.remove(tell_systemd)
            await run_in_threadpool(registry.close)
            state.interactions.close()
            gpus.close()

    app = FastAPI(
        title="edgefleet agent",
        summary=(
            "OpenAI-compatible, Ollama-compatible and Open Inference Protocol API "
            "for the models on this device"
        ),
        lifespan=lifespan,
    )
    app.add_middleware(OllamaJsonBody)
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, read_timeout_s=settings.body_timeout_s
    )
    install_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(ollama.router)
    app.include_router(kserve.router)
    if settings.fault_injection:
        app.include_router(faults.router)
    return app
