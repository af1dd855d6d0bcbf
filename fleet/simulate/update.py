"""What a simulated device serves and what it reports about it. Pure.

A simulated device keeps a small model store: one :class:`ServedModel` per name (the
version it would load, with the sha256 of its file). Before any desired state it
serves what it was started with (``--model NAME@VERSION``, whose file gets a made-up
but stable sha256, :func:`initial_sha256`). A desired model with a ``target`` whose
sha256 differs from the stored one is an update (:func:`updates_needed`); the device
(:mod:`.device`) runs it on a timer and, when it succeeds, stores
:meth:`ServedModel.from_target`. A desired model without a target keeps what the store
holds; one the store lacks is taken as present at the desired version, as simulated
devices always did (:func:`with_untargeted`).

:func:`reported_models` builds what the device says, the way the agent's
``build_report`` does: one entry per desired model, sorted by name, READY with the
stored version and sha256 (the old version while an update is in flight or after a
rollback), LOADING when nothing is stored yet, FAILED when the update failed and
nothing is stored; ``converged`` only when every desired model is served as desired
(:func:`models.wire.runs_wanted`).

:func:`install` decides how an update ends once its download is done, given the
regression effects of the version it installs, and lists the events the agent's
updater would emit on the way (``update_verified``, then ``update_installed`` and
``update_healthy``, or ``update_failed`` / ``update_rolled_back``); :func:`superseded`
is the one event for a download a newer desired state pre-empted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import JsonValue

from fleet.simulate.regress import Effects, ModelRef, target_parts
from models.wire import (
    DesiredModel,
    DesiredState,
    EventKind,
    ModelState,
    ReportedModel,
    Severity,
    runs_wanted,
)

__all__ = [
    "GOLDEN_EXPECT",
    "GOLDEN_PROMPT",
    "Outcome",
    "ServedModel",
    "UpdateEvent",
    "event_data",
    "initial_sha256",
    "install",
    "reported_models",
    "superseded",
    "updates_needed",
    "with_untargeted",
]

GOLDEN_PROMPT = "What is the capital of France?"  # what a failing health check quotes
GOLDEN_EXPECT = "Paris"


def initial_sha256(ref: ModelRef) -> str:
    """A made-up sha256 for a model a device starts with: stable, and never a real file's."""
    return hashlib.sha256(f"edgefleet-simulated:{ref}".encode()).hexdigest()


@dataclass(frozen=True)
class ServedModel:
    """One model in a simulated device's store: what it serves when that model is desired."""

    name: str
    version: str | None
    variant: str | None = None  # from the target path; None: unknown
    sha256: str | None = None  # of the file; None: unknown (no target ever named it)
    path: str | None = None  # the TUF target path it was installed from

    @classmethod
    def initial(cls, ref: ModelRef) -> ServedModel:
        """What ``--model NAME@VERSION[/VARIANT]`` starts a device with."""
        return cls(ref.name, ref.version, ref.variant, initial_sha256(ref))

    @classmethod
    def from_target(cls, wanted: DesiredModel) -> ServedModel:
        """What installing ``wanted.target`` stores: its version, variant and sha256.

        The version is the desired one, else the one in the target path, else the
        digest's first 12 characters, as the agent names a target without a version.
        """
        target = wanted.target
        if target is None:
            raise ValueError(f"{wanted.name} names no target")
        parts = target_parts(target.path)
        version = wanted.version or (parts[1] if parts else target.sha256[:12])
        variant = parts[2] if parts else None
        return cls(wanted.name, version, variant, target.sha256, target.path)

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        """(name, version, variant): what regression rules match."""
        return self.name, self.version, self.variant


def with_untargeted(
    desired: DesiredState, served: Mapping[str, ServedModel]
) -> dict[str, ServedModel]:
    """``served`` plus every desired model without a target that the store lacks.

    Such a model is taken as already in the store at the desired version (simulated
    devices serve nothing, so there is nothing to be missing); one the store holds is
    served as it is, whatever version it has.
    """
    out = dict(served)
    for wanted in desired.models:
        if wanted.target is None and wanted.name not in out:
            out[wanted.name] = ServedModel(wanted.name, wanted.version)
    return out


def updates_needed(desired: DesiredState, served: Mapping[str, ServedModel]) -> list[DesiredModel]:
    """The desired models whose target is not the file the store holds, in desired order."""
    needed = []
    for wanted in desired.models:
        if wanted.target is None:
            continue
        current = served.get(wanted.name)
        if current is None or current.sha256 != wanted.target.sha256:
            needed.append(wanted)
    return needed


def event_data(model: ServedModel) -> dict[str, JsonValue]:
    """The ``data`` of an update event, as the agent's updater fills it."""
    data: dict[str, JsonValue] = {"model": model.name, "version": model.version}
    data.update(target=model.path, sha256=model.sha256)
    return data


@dataclass(frozen=True)
class UpdateEvent:
    """An event a device emits about an update (the device adds its id, an id and a time)."""

    kind: EventKind
    message: str
    data: dict[str, JsonValue]
    severity: Severity = Severity.INFO


@dataclass(frozen=True)
class Outcome:
    """How an update ended, why not well (``reason``), and the events on the way."""

    result: Literal["healthy", "rolled_back", "install_failed"]
    events: tuple[UpdateEvent, ...]
    reason: str | None = None


def install(model: ServedModel, effects: Effects) -> Outcome:
    """Install ``model`` (downloaded and verified) on a device where it has ``effects``."""
    label = f"{model.name} {model.version}"
    data = event_data(model)
    events = [UpdateEvent(EventKind.UPDATE_VERIFIED, f"{label}: downloaded and verified", data)]
    if effects.install_fail:
        reason = "the slot refused the file (simulated install failure)"
        failed = {**data, "phase": "install", "reason": reason, "rejected": True, "retry": False}
        message = f"{model.name}: update failed (install): {reason}"
        events.append(UpdateEvent(EventKind.UPDATE_FAILED, message, failed, Severity.ERROR))
        return Outcome("install_failed", tuple(events), reason)
    events.append(UpdateEvent(EventKind.UPDATE_INSTALLED, f"{label}: installed, activated", data))
    if effects.restart:
        message = f"simulated agent restarted while loading {label}"
        restarted = {**data, "restarted": True}
        events.append(UpdateEvent(EventKind.ONLINE, message, restarted, Severity.WARNING))
    if effects.golden_fail:
        reason = (
            f"health check failed: golden prompt 1 ({GOLDEN_PROMPT[:40]!r}) answered "
            f"'Lyon, probably.', which lacks {GOLDEN_EXPECT!r} (simulated regression)"
        )
        message = f"{label}: {reason}; the previous version serves"
        rolled_back = {**data, "reason": reason}
        events.append(
            UpdateEvent(EventKind.UPDATE_ROLLED_BACK, message, rolled_back, Severity.ERROR)
        )
        return Outcome("rolled_back", tuple(events), reason)
    events.append(UpdateEvent(EventKind.UPDATE_HEALTHY, f"{label}: healthy, serving", data))
    return Outcome("healthy", tuple(events))


def superseded(model: ServedModel, desired_version: int) -> UpdateEvent:
    """The one event for a download of ``model`` that desired state ``desired_version`` ended."""
    reason = f"superseded by desired state {desired_version}"
    data = {**event_data(model), "phase": "download", "reason": reason, "superseded": True}
    data.update(rejected=False, retry=False)
    return UpdateEvent(
        EventKind.UPDATE_FAILED, f"{model.name} {model.version}: download {reason}", data
    )


def _runtime(model: ServedModel) -> str:
    onnx = model.path is not None and model.path.endswith(".onnx")
    return "onnxruntime" if onnx or "minilm" in model.name else "llama.cpp"


def reported_models(
    desired: DesiredState | None,
    served: Mapping[str, ServedModel],
    failed: Mapping[str, str],
    *,
    device: str,
    memory_bytes: int,
) -> tuple[list[ReportedModel], bool]:
    """The models a device reports and whether it has converged.

    Without a desired state every stored model is served; with one, each desired model
    is reported (READY from the store, else FAILED with ``failed``'s reason, else
    LOADING) and nothing else. ``memory_bytes`` is shared out between the models served.
    """
    if desired is None:
        names: Iterable[str] = sorted(served)
        wanted: dict[str, DesiredModel] = {}
    else:
        wanted = {model.name: model for model in desired.models}
        names = sorted(wanted)
    names = list(names)
    share = memory_bytes // max(1, sum(1 for name in names if name in served))
    models: list[ReportedModel] = []
    for name in names:
        model = served.get(name)
        if model is not None:
            models.append(
                ReportedModel(
                    name=name,
                    version=model.version,
                    sha256=model.sha256,
                    state=ModelState.READY,
                    runtime=_runtime(model),
                    device=device,
                    memory_bytes=share,
                )
            )
        elif name in failed:
            models.append(ReportedModel(name=name, state=ModelState.FAILED, error=failed[name]))
        else:
            models.append(ReportedModel(name=name, state=ModelState.LOADING))
    ready = {m.name: m for m in models if m.state is ModelState.READY}
    converged = all(
        name in ready and runs_wanted(model, ready[name]) for name, model in wanted.items()
    ) and len(ready) == len(models)
    return models, converged
