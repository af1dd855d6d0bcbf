"""What a rollout changes in a device's desired state, how it is judged, and how it is undone.

The engine is generic over the change. A :class:`Change` works on the parts of a
desired state a rollout may touch (:class:`Parts`: the models and the fallback policy;
``config`` is never a rollout's): it captures what it replaces (so an abort can put it
back), applies itself with this device's entry (a model's variant, a policy's
reference), restores what it captured, and reads what the device reported and the
events it sent into an :class:`~fleet.rollout.plan.Observation` that
:func:`~fleet.rollout.plan.judge_device` turns into the device's next state. Everything
here is pure: no database, no clock.

Two changes exist: a model version (:class:`ModelChange`: updated once the device
serves the target and sent ``update_healthy`` for it) and a fallback policy
(:class:`PolicyChange`: updated once the device reports the policy's digest, failed by
a ``policy_rejected`` event).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from pydantic import JsonValue

from fleet.rollout.plan import Observation
from fleet.tables import EventRow, as_utc
from models.policy import PolicyRef
from models.wire import DesiredModel, EventKind, ReportedState, runs_wanted

__all__ = ["Change", "ModelChange", "Parts", "PolicyChange"]

E = TypeVar("E")


@dataclass(frozen=True)
class Parts:
    """The parts of one device's desired state that a rollout may change."""

    models: tuple[DesiredModel, ...] = ()
    fallback: dict[str, JsonValue] = field(default_factory=dict)  # FallbackPolicy JSON; {}: none


class Change(Protocol[E]):
    """One part of the desired state, changed the same way on every device of a rollout.

    ``E`` is what each device gets (its entry, stored as JSON in ``RolloutDevice.target``).
    """

    @property
    def key(self) -> str:
        """One live rollout per key per device: ``model:<name>``, ``policy``."""
        ...

    @property
    def title(self) -> str:
        """The change for people: ``gemma3 2.0``, ``policy edge-default v2``."""
        ...

    @property
    def events(self) -> frozenset[str]:
        """The event kinds :meth:`observe` reads."""
        ...

    def entry_of(self, target: dict[str, Any]) -> E:
        """A device's entry, read back from its JSON."""
        ...

    def capture(self, parts: Parts) -> dict[str, Any] | None:
        """What the change will replace in ``parts`` (None: nothing there yet)."""
        ...

    def apply(self, parts: Parts, entry: E) -> Parts:
        """``parts`` with the change made, ``entry`` being this device's."""
        ...

    def restore(self, parts: Parts, captured: dict[str, Any] | None) -> Parts:
        """``parts`` with what :meth:`capture` saw put back."""
        ...

    def restored(self, captured: dict[str, Any] | None) -> str:
        """What :meth:`restore` puts back, for people."""
        ...

    def satisfied(self, entry: E, reported: ReportedState | None) -> bool:
        """Whether the device's report shows that it runs ``entry`` already."""
        ...

    def observe(
        self,
        entry: E,
        reported: ReportedState | None,
        events: Sequence[EventRow],
        issued_at: datetime | None,
    ) -> Observation:
        """What the device did with ``entry`` since it was issued, from its report and events."""
        ...


def _since(events: Sequence[EventRow], issued_at: datetime | None) -> list[EventRow]:
    """The events stored once the change was issued, oldest first."""
    issued = as_utc(issued_at)
    ordered = sorted(events, key=lambda e: as_utc(e.stored_at) or e.ts)
    return [
        e
        for e in ordered
        if issued is None or (stored := as_utc(e.stored_at)) is None or stored >= issued
    ]


_MODEL_EVENTS = frozenset(
    {
        EventKind.UPDATE_HEALTHY.value,
        EventKind.UPDATE_FAILED.value,
        EventKind.UPDATE_ROLLED_BACK.value,
    }
)


@dataclass(frozen=True)
class ModelChange:
    """Serve a model at a version: its entry in the desired models is replaced."""

    name: str
    version: str

    @property
    def key(self) -> str:
        return f"model:{self.name}"

    @property
    def title(self) -> str:
        return f"{self.name} {self.version}"

    @property
    def events(self) -> frozenset[str]:
        return _MODEL_EVENTS

    def entry_of(self, target: dict[str, Any]) -> DesiredModel:
        return DesiredModel.model_validate(target)

    def capture(self, parts: Parts) -> dict[str, Any] | None:
        for model in parts.models:
            if model.name == self.name:
                return model.model_dump(mode="json")
        return None

    def apply(self, parts: Parts, entry: DesiredModel) -> Parts:
        models = parts.models
        others = [m for m in models if m.name != self.name]
        kept = [i for i, m in enumerate(models) if m.name == self.name]
        if not kept:
            return Parts((*models, entry), parts.fallback)
        others.insert(kept[0], entry)  # keep the model where it was in the list
        return Parts(tuple(others), parts.fallback)

    def restore(self, parts: Parts, captured: dict[str, Any] | None) -> Parts:
        if captured is None:
            return Parts(tuple(m for m in parts.models if m.name != self.name), parts.fallback)
        return self.apply(parts, DesiredModel.model_validate(captured))

    def restored(self, captured: dict[str, Any] | None) -> str:
        return str((captured or {}).get("version") or "nothing (the model removed)")

    def satisfied(self, entry: DesiredModel, reported: ReportedState | None) -> bool:
        if reported is None:
            return False
        return any(
            m.name == entry.name and m.state == "ready" and runs_wanted(entry, m)
            for m in reported.models
        )

    def observe(
        self,
        entry: DesiredModel,
        reported: ReportedState | None,
        events: Sequence[EventRow],
        issued_at: datetime | None,
    ) -> Observation:
        """Serving it is not enough: ``update_healthy`` for the target must follow."""
        healthy = False
        install_failed = health_failed = None
        for event in _since(events, issued_at):
            data = event.data or {}
            if data.get("model") != entry.name or not _about(entry, data):
                continue
            if event.kind == EventKind.UPDATE_HEALTHY:
                healthy = True
            elif event.kind == EventKind.UPDATE_ROLLED_BACK:
                health_failed = str(data.get("reason") or event.message)
            elif event.kind == EventKind.UPDATE_FAILED and not data.get("superseded"):
                install_failed = (
                    f"{data.get('phase', 'install')}: {data.get('reason') or event.message}"
                )
        return Observation(
            serves_target=self.satisfied(entry, reported),
            healthy=healthy,
            install_failed=install_failed,
            health_failed=health_failed,
        )


def _about(entry: DesiredModel, data: dict[str, Any]) -> bool:
    sha = data.get("sha256")
    if sha is not None and entry.target is not None:
        return bool(sha == entry.target.sha256)
    return data.get("version") == entry.version


@dataclass(frozen=True)
class PolicyChange:
    """Enforce a fallback policy: the desired state's ``fallback`` is replaced, models untouched.

    The same policy goes to every device (eligibility is decided before, per device, by
    the models the policy names); a device is updated once it reports the policy's
    digest, and failed by a ``policy_rejected`` event after it was issued.
    """

    name: str
    version: int
    body: dict[str, JsonValue]  # the FallbackPolicy as JSON, sent as it is
    digest: str  # models.policy.policy_digest of the body

    @property
    def key(self) -> str:
        return "policy"  # a device enforces one policy: one live policy rollout per device

    @property
    def title(self) -> str:
        return f"policy {self.name} v{self.version}"

    @property
    def events(self) -> frozenset[str]:
        return frozenset({EventKind.POLICY_REJECTED.value})

    @property
    def ref(self) -> PolicyRef:
        return PolicyRef(name=self.name, version=self.version, digest=self.digest)

    def entry_of(self, target: dict[str, Any]) -> PolicyRef:
        return PolicyRef.model_validate(target)

    def capture(self, parts: Parts) -> dict[str, Any] | None:
        return {"fallback": dict(parts.fallback)} if parts.fallback else None

    def apply(self, parts: Parts, entry: PolicyRef) -> Parts:
        return Parts(parts.models, dict(self.body))

    def restore(self, parts: Parts, captured: dict[str, Any] | None) -> Parts:
        fallback = (captured or {}).get("fallback") or {}
        return Parts(parts.models, dict(fallback))

    def restored(self, captured: dict[str, Any] | None) -> str:
        fallback = (captured or {}).get("fallback") or {}
        if not fallback:
            return "no fallback policy (the agent's local one applies)"
        return f"policy {fallback.get('name', '?')} v{fallback.get('version', '?')}"

    def satisfied(self, entry: PolicyRef, reported: ReportedState | None) -> bool:
        return (
            reported is not None
            and reported.policy is not None
            and (reported.policy.digest == entry.digest)
        )

    def observe(
        self,
        entry: PolicyRef,
        reported: ReportedState | None,
        events: Sequence[EventRow],
        issued_at: datetime | None,
    ) -> Observation:
        """Reporting the digest is success; a rejection since it was issued is a failure."""
        serves = self.satisfied(entry, reported)
        rejected = None
        for event in _since(events, issued_at):
            data = event.data or {}
            digest = data.get("digest")
            if event.kind != EventKind.POLICY_REJECTED or (
                digest is not None and digest != entry.digest
            ):
                continue  # a rejection that names another policy is not about this one
            rejected = str(data.get("reason") or event.message or "rejected by the agent")
        return Observation(
            serves_target=serves,
            healthy=serves,
            rejected=rejected,
            success=f"enforces {self.title}",
        )
