"""The planned fleet's records: issued targets, devices, rollout members and rollouts."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleet.simulate.hardware import Hardware
from fleet.simulate.seed.config import ADMIN_SOURCE, ENGINE, LOW_RAM_BYTES, MINILM
from fleet.simulate.telemetry import DeviceProfile
from models.wire import (
    EventKind,
    Severity,
)


@dataclass
class _Issued:
    """One desired state the controller stored for a device: the versions it names."""

    at: datetime
    gemma: str
    minilm: str


Event = tuple[datetime, EventKind, Severity, str, dict[str, Any]]


@dataclass
class _Device:
    index: int
    id: str
    name: str
    group: str
    zone: str
    utc_offset_h: int
    tags: list[str]
    hardware: Hardware
    profile: DeviceProfile
    agent_version: str
    enrolled_at: datetime
    standing: str  # online, offline, never (enrolled, never connected), revoked
    last_seen: datetime | None
    revoked_at: datetime | None
    gap: tuple[datetime, datetime] | None  # offline for a while during the range
    degraded_since: datetime | None
    base_version: int  # desired versions before the first one kept in ``issued``
    dropped: int  # telemetry samples its spool lost
    issued: list[_Issued] = field(default_factory=list)
    acted_on: int = 0  # index in ``issued`` of the last desired state the agent applied
    served_gemma: str = "1.0"
    served_minilm: str = "1.0"
    changed_at: datetime | None = None  # the last update it finished
    events: list[Event] = field(default_factory=list)

    @property
    def low_ram(self) -> bool:
        return not self.hardware.has_gpu and self.hardware.ram_bytes < LOW_RAM_BYTES

    def variant(self, model: str) -> str:
        if model == MINILM:
            return "int8"
        return "Q8_0" if self.hardware.has_gpu else "Q4_K_M"

    def reachable(self, at: datetime) -> bool:
        """Connected at ``at``, so it acts on a desired state within minutes."""
        if self.last_seen is None or self.last_seen <= at or at < self.enrolled_at:
            return False
        return not (self.gap is not None and self.gap[0] <= at < self.gap[1])

    def event(
        self,
        at: datetime,
        kind: EventKind,
        message: str,
        data: dict[str, Any] | None = None,
        severity: Severity = Severity.INFO,
    ) -> None:
        self.events.append((at, kind, severity, message, data or {}))

    def desired_version(self) -> int:
        return self.base_version + len(self.issued) - 1

    def issue(self, at: datetime, *, gemma: str | None = None, minilm: str | None = None) -> int:
        """Store a new desired state changing one model; the version it got."""
        last = self.issued[-1]
        self.issued.append(_Issued(at, gemma or last.gemma, minilm or last.minilm))
        return self.desired_version()


@dataclass
class _Member:
    device: _Device
    rank: str
    state: str = "pending"
    stage: int | None = None
    variant: str | None = None
    placement: str | None = None
    target: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    failure: str | None = None
    detail: str = ""
    desired_version: int | None = None
    since: datetime | None = None
    issued_at: datetime | None = None


@dataclass
class _Rollout:
    id: str
    spec: dict[str, Any]
    created_at: datetime
    created_by: str
    status: str = "active"
    stage: int = 0
    phase: str = "rolling"
    stage_started_at: datetime | None = None
    soak_started_at: datetime | None = None
    next_check_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    reason: str = ""
    members: list[_Member] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model(self) -> str:
        return str(self.spec["change"]["model"])

    @property
    def version(self) -> str:
        return str(self.spec["change"]["version"])

    def record(
        self, at: datetime, action: str, reason: str, actor: str = ENGINE, **data: Any
    ) -> None:
        self.audit.append(
            {
                "at": at,
                "actor": actor,
                "action": f"rollout.{action}",
                "subject": f"rollout:{self.id}",
                "reason": reason[:2000],
                "data": data,
                "source": ADMIN_SOURCE if actor != ENGINE else "",
            }
        )

    def row(self) -> dict[str, Any]:
        updated = self.updated_at or self.created_at
        return {
            "id": self.id,
            "name": self.spec["name"],
            "change_key": f"model:{self.model}",
            "spec": self.spec,
            "status": self.status,
            "stage": self.stage,
            "phase": self.phase,
            "stage_started_at": self.stage_started_at or self.created_at,
            "soak_started_at": self.soak_started_at,
            "next_check_at": self.next_check_at,
            "gate_failures": [0] * len(self.spec["gates"]),
            # The engine writes the row at every step (every 2 s) while it is live.
            "revision": 1 + int((updated - self.created_at).total_seconds() // 2),
            "reason": self.reason,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "updated_at": updated,
            "finished_at": self.finished_at,
        }
