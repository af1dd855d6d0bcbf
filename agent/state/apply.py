"""The executor, and the choice of which models to serve: configured or desired.

The agent has two sources for its model list: the config file's ``[[models]]`` and
the fleet's desired state. Once a desired state has been acted on it wins, and it is
saved (:mod:`agent.state.saved`) so a restart without the broker serves the same
models; SIGHUP then re-applies the desired state instead of the file's list.

:func:`specs_for_desired` maps a desired state onto model specs (pure);
:class:`ModelController` makes the served models match them, using the pure planner
(:mod:`agent.state.plan`), loading in worker threads and installing signed targets
through the :class:`~agent.update.updater.Updater`. It works on an
:class:`ExecutorContext` (the registry, settings and metrics the app built), never on
the API's state, so this layer sits below the API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from agent.boot_status import BootRecorder, ModelProgress, Step, model_event, settle_models
from agent.config import AgentSettings, ModelSpec
from agent.errors import AgentError
from agent.metrics import AgentMetrics
from agent.runtime.base import ServedModel
from agent.serving.chain import CPU_SUFFIX, load_failure
from agent.serving.degraded import DegradedMode
from agent.serving.loader import load_model, resolve
from agent.serving.registry import ModelRegistry
from agent.state.plan import Unload, plan_models
from agent.state.policy import PolicyKeeper
from agent.state.report import agent_version, build_report
from agent.state.saved import SavedDesired
from agent.store import ModelStore
from agent.update.preempt import Preemption
from agent.update.updater import Emit, UpdateConfig, Updater, UpdateSource
from models.device import DeviceReport
from models.manifest import ModelManifest, RuntimeParams
from models.policy import ModelTier
from models.wire import DesiredState, EventKind, ReportedState, Severity, utc_now

__all__ = [
    "DesiredSpecs",
    "ExecutorContext",
    "Loader",
    "ModelController",
    "Outcome",
    "specs_for_desired",
]

log = logging.getLogger(__name__)

Loader = Callable[[ModelManifest, Path, AgentSettings, ModelRegistry], ServedModel]


@dataclass(frozen=True)
class ExecutorContext:
    """What the executor works with, built once by the app."""

    settings: AgentSettings
    registry: ModelRegistry  # where loaded models are published and failures recorded
    metrics: AgentMetrics  # load times
    device: DeviceReport | None = None  # reported; its RAM bounds what an update may need
    degraded: DegradedMode | None = None  # reported: the policy enforced, the degraded models


@dataclass(frozen=True)
class DesiredSpecs:
    """What a desired state asks of this device's store."""

    specs: list[ModelSpec]  # serve these
    missing: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be served


def specs_for_desired(
    desired: DesiredState,
    installed: Mapping[str, ModelManifest | str],
    configured: Sequence[ModelSpec] = (),
    why_not: Mapping[str, str] | None = None,
) -> DesiredSpecs:
    """Map desired models onto specs served from the store; pure.

    ``installed`` holds, for each desired name, the store's manifest or why there is
    none. A model absent from the store, or present at another version than the one
    asked for, is *missing* (reported, never fatal; ``why_not`` says why an update did
    not install it). A model with a signed target is served at whatever verified
    version the store holds until the updater has installed the target. A configured
    spec of the same name lends its runtime overrides; desired models always come from
    the store.
    """
    tuned = {spec.name: spec.runtime for spec in configured if spec.runtime is not None}
    specs: list[ModelSpec] = []
    missing: dict[str, str] = {}
    seen: set[str] = set()
    for wanted in desired.models:
        if wanted.name in seen:
            continue
        seen.add(wanted.name)
        found = installed.get(wanted.name)
        target = wanted.target
        if not isinstance(found, ModelManifest):
            why = (why_not or {}).get(wanted.name) or found
            if target is not None:
                why = f"target {target.path} is not installed yet: {why or 'updating'}"
            missing[wanted.name] = why or f"model {wanted.name!r} is not in the model store"
        elif target is not None:
            # The installed version serves until the update is verified and healthy.
            specs.append(ModelSpec(name=wanted.name, runtime=tuned.get(wanted.name)))
        elif target is None and wanted.version is not None and found.version != wanted.version:
            missing[wanted.name] = (
                f"version {wanted.version} of {wanted.name!r} is not in the model store "
                f"(it holds {found.version})"
            )
        else:
            specs.append(ModelSpec(name=wanted.name, runtime=tuned.get(wanted.name)))
    return DesiredSpecs(specs, missing)


@dataclass(frozen=True)
class Outcome:
    """What one step of a reconcile did.

    The action says what a failure means for serving, which the link needs to send one
    truthful event (:mod:`agent.link.outcomes`): a failed ``load`` leaves the model
    unserved; a failed ``swap`` leaves the previous model serving; an ``update`` (a
    signed target) has already been reported by the updater, whatever its result.
    """

    name: str
    action: str  # "load", "swap", "unload", "update"
    error: str | None = None  # None: it worked
    retry: bool = False  # a transient failure (network, disk): reconcile again later
    version: str | None = None  # the version the step served, or tried to
    sha256: str | None = None  # and its sha256, where known


def _read_installed(store: ModelStore, names: Sequence[str]) -> dict[str, ModelManifest | str]:
    found: dict[str, ModelManifest | str] = {}
    for name in names:
        try:
            found[name] = store.manifest(name)
        except AgentError as exc:
            found[name] = exc.message
    return found


class ModelController:
    """Decides which models to serve (configured or desired) and serves them.

    ``on_change`` is called whenever what :meth:`report` would say may have changed
    (a reconcile began or ended); ``on_outcomes`` gets each reconcile's results. The
    link sets both; without a fleet they stay None.

    Reconciles run one at a time, each on the newest desired state when it starts. A
    newer desired state pre-empts the running reconcile's download
    (:mod:`agent.update.preempt`): the download stops within a chunk, keeps its
    ``.part``, the update says ``update_failed`` once (``superseded``), the reconcile
    leaves its remaining updates, and the next one starts. Install, activation and the
    health check are never interrupted; the old model serves throughout.
    """

    def __init__(
        self,
        context: ExecutorContext,
        configured: Sequence[ModelSpec],
        *,
        saved: SavedDesired | None = None,
        desired: DesiredState | None = None,
        load: Loader = load_model,
        policies: PolicyKeeper | None = None,
        boot: BootRecorder | None = None,
    ) -> None:
        self.context = context
        self.boot = boot or BootRecorder(None)  # the models step of first-boot progress
        self.configured = list(configured)
        self.saved = saved
        self.desired = desired
        self.missing: dict[str, str] = {}
        self.loaded: dict[str, tuple[ModelSpec, ModelManifest]] = {}  # what each serves from
        self.on_change: Callable[[], None] | None = None
        self.on_outcomes: Callable[[Sequence[Outcome]], None] | None = None
        self.updater: Updater | None = None  # set by the fleet link once enrolled
        self._load = load
        self.policies = policies
        self.copies: dict[str, str] = {}  # CPU copies served for fallback tiers -> sha256
        self.serving = asyncio.Event()  # set once the first models to serve loaded or failed,
        # before any update is downloaded: the app's READY waits for it
        self._reconciling = asyncio.Lock()
        self._saving = asyncio.Lock()  # saves in order, so the newest state is the one kept
        self._running: tuple[int | None, Preemption] | None = None  # (its desired version, ...)

    @property
    def desired_version(self) -> int | None:
        return self.desired.version if self.desired is not None else None

    def attach_updates(
        self, source: UpdateSource, emit: Emit, config: UpdateConfig | None = None
    ) -> None:
        """From now on, install the signed targets desired states name (the fleet link)."""

        def emit_and_record(
            kind: EventKind,
            message: str = "",
            *,
            severity: Severity = Severity.INFO,
            data: dict[str, Any] | None = None,
        ) -> None:
            self.boot.apply(lambda s, now: model_event(s, kind.value, message, data or {}, now))
            emit(kind, message, severity=severity, data=data)

        self.updater = Updater(
            ModelStore(self.context.settings.store_dir),
            source,
            emit_and_record,
            config,
            ram_total_bytes=self.context.device.ram_total_bytes or None
            if self.context.device is not None
            else None,
        )

    def expected(self) -> list[str]:
        """Names to mark as loading before the first reconcile (requests get 503, not 404)."""
        if self.desired is not None:
            return [model.name for model in self.desired.models]
        return [spec.name for spec in self.configured]

    async def reconcile(self) -> list[Outcome]:
        """Serve what the current source (desired state, else the config) asks for."""
        async with self._reconciling:
            desired, preemption = self.desired, Preemption()
            self._running = (desired.version if desired is not None else None, preemption)
            self._changed()
            self._models_started()
            try:
                outcomes = await self._apply(desired, preemption)
            finally:
                self.serving.set()
                self._running = None
                self._changed()
            await self.serve_cpu_copies()
            self._models_settled(outcomes)
        if self.on_outcomes is not None and outcomes:
            self.on_outcomes(outcomes)
        return outcomes

    async def serve_cpu_copies(self) -> None:
        """Load a CPU copy of each GPU-served model the policy's CPU tiers name; drop the rest.

        A model already on the CPU needs none: its CPU tier is skipped (nothing to gain).
        A copy that does not load is logged; the walker then skips that tier.
        """
        degraded, registry = self.context.degraded, self.context.registry
        policy = degraded.policy if degraded is not None else None
        wanted = {
            tier.model
            for chain in (policy.chains.values() if policy is not None else ())
            for tier in chain.tiers
            if isinstance(tier, ModelTier) and tier.device == "cpu"
        }
        served = {m.manifest.name: m for m in registry.models()}
        for name in sorted(wanted):
            model, current = served.get(name), self.loaded.get(name)
            copy = name + CPU_SUFFIX
            if model is None or current is None or model.info.device == "cpu":
                if self.copies.pop(copy, None) is not None:
                    registry.remove(copy)
                continue
            if copy in self.copies and self.copies[copy] == model.manifest.sha256:
                continue
            spec, manifest = current
            runtime = (spec.runtime or manifest.runtime).model_copy(update={"gpu_layers": 0})
            try:
                _, path = await run_in_threadpool(
                    resolve, spec, ModelStore(self.context.settings.store_dir)
                )
                loaded = await run_in_threadpool(
                    self._load,
                    manifest.model_copy(update={"runtime": runtime}),
                    path,
                    self.context.settings,
                    registry,
                )
            except AgentError as exc:
                log.error("the CPU copy of %s did not load: %s", name, exc.message)
                continue
            registry.publish(copy, loaded)
            self.copies[copy] = model.manifest.sha256
            log.info("CPU copy of %s loaded for its fallback chain", name)
        for copy in [c for c in self.copies if c.removesuffix(CPU_SUFFIX) not in wanted]:
            registry.remove(copy)
            del self.copies[copy]

    async def _apply(self, desired: DesiredState | None, preemption: Preemption) -> list[Outcome]:
        if desired is None:
            self._set_missing({})
            return await self._serve_specs(self.configured, ())
        served = await self._serve(desired, {})  # what is installed serves at once...
        self.serving.set()
        updates = await self._update(desired, preemption)  # ...while targets are installed
        if not updates or preemption.requested is not None:
            return served + updates  # (pre-empted: the newer state's reconcile does the rest)
        why_not = {o.name: o.error for o in updates if o.error is not None}
        return served + updates + await self._serve(desired, why_not)

    async def _serve(self, desired: DesiredState, why_not: Mapping[str, str]) -> list[Outcome]:
        store = ModelStore(self.context.settings.store_dir)
        names = [m.name for m in desired.models]
        installed = await run_in_threadpool(_read_installed, store, names)
        mapped = specs_for_desired(desired, installed, self.configured, why_not)
        for why in mapped.missing.values():
            log.warning("desired state %d: %s", desired.version, why)
        self._set_missing(mapped.missing)
        return await self._serve_specs(mapped.specs, list(mapped.missing))

    async def _serve_specs(
        self, desired: Sequence[ModelSpec], keep: Collection[str]
    ) -> list[Outcome]:
        """Serve exactly ``desired`` (plus ``keep``, as it is now): load, hot-swap, unload.

        A new model that fails to resolve or load is reported by /readyz; a served model
        whose replacement fails keeps serving, and so does a served model named in
        ``keep`` (wanted, but its wanted version is not available). A model that was
        loading or failed and is no longer wanted is forgotten.
        """
        registry, settings = self.context.registry, self.context.settings
        store = ModelStore(settings.store_dir)
        resolved: dict[str, tuple[ModelSpec, ModelManifest, Path | None]] = {}
        outcomes: list[Outcome] = []
        wanted = {spec.name for spec in desired} | set(keep)
        loading, failed = registry.waiting()
        for name in (set(loading) | set(failed)) - wanted - set(self.loaded):
            registry.remove(name)  # no longer wanted: forget that it was loading or failed
        for name in keep:
            current = self.loaded.get(name)
            if current is not None:
                resolved[name] = (*current, None)
        for spec in desired:
            if spec.name in resolved:
                continue
            try:
                manifest, path = await run_in_threadpool(resolve, spec, store)
            except AgentError as exc:
                log.error("model %s cannot be resolved: %s", spec.name, exc.message)
                current = self.loaded.get(spec.name)
                if current is None:
                    registry.fail(spec.name, exc.message)
                    outcomes.append(Outcome(spec.name, "load", exc.message))
                else:  # keep what is served: the planner sees no change
                    resolved[spec.name] = (*current, None)
                continue
            resolved[spec.name] = (spec, manifest, path)
        steps = plan_models(
            self.loaded, [(spec, manifest) for spec, manifest, _ in resolved.values()]
        )
        for step in steps:
            if not isinstance(step, Unload) and step.spec.name not in self.loaded:
                registry.expect(step.spec.name)  # 503 "loading", not 404, until it is up
        for step in steps:
            if isinstance(step, Unload):
                log.info("unloading %s", step.name)
                registry.remove(step.name)
                self.loaded.pop(step.name, None)
                outcomes.append(Outcome(step.name, "unload"))
                continue
            spec, manifest, file = resolved[step.spec.name]
            assert file is not None  # only unchanged models lack a file, and they get no step
            action = "swap" if step.replaces else "load"
            started = time.monotonic()
            try:
                model = await run_in_threadpool(self._load, manifest, file, settings, registry)
            except AgentError as exc:
                log.error("model %s failed to load: %s", spec.name, exc.message)
                if not step.replaces:
                    registry.fail(spec.name, exc.message, load_failure(exc))
                outcomes.append(
                    Outcome(
                        spec.name,
                        action,
                        exc.message,
                        version=manifest.version,
                        sha256=manifest.sha256,
                    )
                )
                continue  # a failed swap keeps serving the previous model
            self.context.metrics.load_seconds.labels(spec.name).set(time.monotonic() - started)
            self._publish(spec, model)
            outcomes.append(
                Outcome(spec.name, action, version=manifest.version, sha256=manifest.sha256)
            )
        return outcomes

    def _publish(self, spec: ModelSpec, model: ServedModel) -> None:
        self.context.registry.publish(spec.name, model)
        self.loaded[spec.name] = (spec, model.manifest)

    async def _update(self, desired: DesiredState, preemption: Preemption) -> list[Outcome]:
        """Install the signed targets the desired state names; publish each healthy one.

        Once pre-empted, no further update begins (nothing to report for those).
        """
        outcomes: list[Outcome] = []
        tuned = {spec.name: spec.runtime for spec in self.configured if spec.runtime is not None}
        for wanted in desired.models:
            if wanted.target is None:
                continue
            if self.updater is None:
                continue  # reported missing until the fleet link attaches the updater
            if preemption.requested is not None:
                break
            runtime = tuned.get(wanted.name)

            def load(
                manifest: ModelManifest, path: Path, runtime: RuntimeParams | None = runtime
            ) -> ServedModel:
                if runtime is not None:
                    manifest = manifest.model_copy(update={"runtime": runtime})
                return self._load(manifest, path, self.context.settings, self.context.registry)

            result = await self.updater.ensure(desired.version, wanted, load, preemption)
            version, sha256 = result.version, wanted.target.sha256
            if result.model is not None:
                self._publish(ModelSpec(name=wanted.name, runtime=runtime), result.model)
                outcomes.append(Outcome(wanted.name, "update", version=version, sha256=sha256))
            elif result.error is not None and result.result != "given_up":  # said once already
                outcomes.append(
                    Outcome(
                        wanted.name,
                        "update",
                        result.error,
                        result.retry,
                        version=version,
                        sha256=sha256,
                    )
                )
        return outcomes

    def _set_missing(self, missing: dict[str, str]) -> None:
        for name, why in missing.items():
            if name not in self.loaded:
                self.context.registry.fail(name, why)  # /readyz and requests say why
        self.missing = missing

    async def apply_desired(self, desired: DesiredState) -> list[Outcome]:
        """Act on a new desired state: it wins from now on; save it, then reconcile.

        May be called while a reconcile runs (the link does not wait): a reconcile for an
        older desired state is pre-empted, and this call's reconcile follows it.
        """
        self.desired = desired
        self._preempt_older(desired)
        if self.policies is not None:
            self.policies.apply(desired)
        log.info("applying desired state %d: %s", desired.version, [m.name for m in desired.models])
        await self._save(desired)
        return await self.reconcile()

    def _preempt_older(self, desired: DesiredState) -> None:
        running = self._running
        if running is None:
            return
        version, preemption = running
        if version is None or version < desired.version:
            log.info(
                "desired state %d pre-empts the reconcile of %s",
                desired.version,
                f"desired state {version}" if version is not None else "the configured models",
            )
            preemption.request(desired.version)

    async def _save(self, desired: DesiredState) -> None:
        if self.saved is None:
            return
        async with self._saving:
            if self.desired is not desired:
                return  # a newer one arrived meanwhile: its own call saves it
            try:
                await asyncio.to_thread(self.saved.save, desired)
            except OSError as exc:
                log.error("cannot save the desired state in %s: %s", self.saved.path, exc)

    async def reload_config(self, configured: Sequence[ModelSpec]) -> list[Outcome]:
        """SIGHUP: take the file's new model list; it is served only without a desired state."""
        self.configured = list(configured)
        if self.desired is not None:
            log.info(
                "SIGHUP: desired state %d from the fleet takes precedence over the "
                "configured models; re-applying it",
                self.desired.version,
            )
        return await self.reconcile()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _models_started(self) -> None:
        names = self.expected()
        to_load = [n for n in names if n not in self.loaded]
        if not to_load:
            return  # nothing new to load: the step stays as it is (done, or waiting)
        progress = ModelProgress(model=to_load[0], phase="loading") if len(to_load) == 1 else None
        self.boot.start(Step.MODELS, f"loading {', '.join(to_load)}", progress)

    def _models_settled(self, outcomes: Sequence[Outcome]) -> None:
        """Record the models step after a reconcile: serving, waiting, retrying or failed."""
        retrying = {o.name: o.error for o in outcomes if o.error is not None and o.retry}
        final = {o.name: o.error for o in outcomes if o.error is not None and not o.retry}
        _, failed = self.context.registry.waiting()
        served = set(self.loaded)
        failed = {n: why for n, why in failed.items() if n not in self.missing and n not in served}
        waiting = {
            n: why for n, why in self.missing.items() if n not in final and n not in retrying
        }
        self.boot.apply(
            lambda s, now: settle_models(
                s,
                now,
                serving=sorted(served),
                failed={**failed, **{n: w for n, w in final.items() if n not in served}},
                retrying=retrying,
                waiting=waiting,
            )
        )

    def report(self, device_id: str) -> ReportedState:
        registry = self.context.registry
        loading, failed = registry.waiting()
        return build_report(
            device_id=device_id,
            desired=self.desired,
            served=registry.models(),
            loading=loading,
            failed=failed,
            missing=self.missing,
            agent_version=agent_version(),
            device=self.context.device,
            now=utc_now(),
            policy=degraded.ref() if (degraded := self.context.degraded) is not None else None,
            degraded=degraded.degraded() if degraded is not None else (),
        )
