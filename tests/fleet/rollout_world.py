"""A fleet at the database level for rollout engine tests: devices, the registry, a clock.

Devices here do what the ingest would record of real ones: a reported state, update
events, telemetry samples, written straight into the tables; the engine under test is
the real one, with the fake link (``tests/fakes/fleet_link.py``) standing in for MQTT.
The real broker, simulator and agent run in the integration tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet.db import make_engine, migrate
from fleet.desired import DesiredStates
from fleet.rollout.engine import RolloutEngine
from fleet.rollout.spec import RolloutSpec
from fleet.tables import (
    AuditEntry,
    Device,
    EventRow,
    GateCheckRow,
    Group,
    ModelArtifact,
    PolicyRow,
    Rollout,
    RolloutDevice,
    TelemetryRow,
)
from models.device import DeviceReport, GpuInfo
from models.policy import FallbackPolicy, PolicyRef, policy_digest
from models.wire import DesiredState, EventKind, ModelState, ReportedModel, ReportedState
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import START, Clock

__all__ = ["GB", "MODEL", "World", "report", "sha"]

GB = 2**30
MODEL = "gemma3"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def report(
    ram_gb: float = 8, arch: str = "x86_64", gpu_gb: float | None = None, zone: str | None = None
) -> DeviceReport:
    gpus = (
        [
            GpuInfo(
                index=0,
                name="RTX",
                memory_total_bytes=int(gpu_gb * GB),
                compute_capability="8.6",
                source="nvml",
            )
        ]
        if gpu_gb
        else []
    )
    return DeviceReport(
        hostname="h",
        os="Linux",
        kernel="6.8",
        arch=arch,
        cpu_physical_cores=4,
        cpu_logical_cores=4,
        ram_total_bytes=int(ram_gb * GB),
        ram_available_bytes=int(ram_gb * GB),
        gpus=gpus,
        llama_gpu_offload=bool(gpu_gb),
        timezone=zone,
        probed_at=START,
    )


@dataclass
class World:
    """The engine, its database and a clock; helpers act as the devices would."""

    db: Engine
    clock: Clock = field(default_factory=Clock)
    link: FakeLink = field(default_factory=FakeLink)

    def __post_init__(self) -> None:
        self.desired = DesiredStates(self.db, self.link, self.clock)
        self.engine = RolloutEngine(self.db, self.desired, self.clock)
        with Session(self.db) as session:
            session.add(Group(name="lab"))
            session.commit()

    @classmethod
    def on(cls, url: str) -> World:
        db = make_engine(url)
        migrate(db)
        return cls(db)

    # -- the registry and the devices ------------------------------------------------

    def artifact(
        self, version: str, variant: str = "Q4_K_M", *, yanked: bool = False, **meta: Any
    ) -> str:
        digest = sha(f"{version}/{variant}")
        with Session(self.db) as session:
            session.add(
                ModelArtifact(
                    name=MODEL,
                    version=version,
                    variant=variant,
                    format="gguf",
                    sha256=digest,
                    size_bytes=1000,
                    meta={"quantization": variant, **meta},
                    created_at=self.clock(),
                    yanked_at=self.clock() if yanked else None,
                    yank_reason="broken" if yanked else "",
                )
            )
            session.commit()
        return digest

    def device(
        self,
        device_id: str,
        *,
        group: str | None = "lab",
        hardware: DeviceReport | None = None,
        serves: str | None = "1.0",
        online: bool = True,
    ) -> None:
        """A device serving ``serves`` (the Q4_K_M artifact of that version) or nothing."""
        with Session(self.db) as session:
            session.add(
                Device(
                    id=device_id,
                    name=device_id,
                    group=group,
                    public_key=sha(device_id)[:44],
                    mqtt_password_hash="x",
                    device_report=(hardware or report()).model_dump(mode="json"),
                    online=online,
                )
            )
            session.commit()
        if serves is not None:
            self.report(device_id, serves, sha(f"{serves}/Q4_K_M"))

    def report(self, device_id: str, version: str, digest: str) -> None:
        """It serves ``version`` of the model (and the other models and policy it reported)."""
        with Session(self.db) as session:
            device = session.get(Device, device_id)
            assert device is not None
            before = ReportedState.model_validate(device.reported) if device.reported else None
            served = ReportedModel(
                name=MODEL, version=version, sha256=digest, state=ModelState.READY
            )
            others = [m for m in before.models if m.name != MODEL] if before else []
            state = ReportedState(
                device_id=device_id,
                converged=True,
                agent_version="0.9",
                models=[served, *others],
                policy=before.policy if before else None,
            )
            device.reported = state.model_dump(mode="json")
            session.add(device)
            session.commit()

    def _edit_report(self, device_id: str, **changes: Any) -> None:
        with Session(self.db) as session:
            device = session.get(Device, device_id)
            assert device is not None
            state = ReportedState.model_validate(device.reported)
            device.reported = state.model_copy(update=changes).model_dump(mode="json")
            session.add(device)
            session.commit()

    def serve_also(self, device_id: str, name: str) -> None:
        """It serves another model besides the rolled-out one (a fallback, an embedder)."""
        with Session(self.db) as session:
            device = session.get(Device, device_id)
            assert device is not None
            models = ReportedState.model_validate(device.reported).models
        extra = ReportedModel(name=name, state=ModelState.READY)
        self._edit_report(device_id, models=[*models, extra])

    def report_policy(self, device_id: str, ref: PolicyRef | None) -> None:
        """It enforces this fallback policy (the agent reports its name, version and digest)."""
        self._edit_report(device_id, policy=ref)

    # -- fallback policies ------------------------------------------------------------

    def policy(self, name: str, version: int, chains: dict[str, Any] | None = None) -> PolicyRef:
        """Store a version of a policy as the policy store would; its reference."""
        policy = FallbackPolicy.model_validate(
            {"name": name, "version": version, "chains": chains or {}}
        )
        body = policy.model_dump(mode="json")
        with Session(self.db) as session:
            session.add(
                PolicyRow(
                    name=name,
                    version=version,
                    body=body,
                    digest=policy_digest(body),
                    created_by="admin:test",
                    created_at=self.clock(),
                )
            )
            session.commit()
        return policy.ref()

    def enforce(self, device_id: str) -> None:
        """Act as an agent would on its desired state's policy: enforce it and report it."""
        state = self.desired_of(device_id)
        assert state is not None, f"{device_id} has no desired state"
        ref = FallbackPolicy.model_validate(state.fallback).ref()
        self.report_policy(device_id, ref)
        self.event(device_id, EventKind.POLICY_APPLIED, **ref.model_dump(mode="json"))

    def set_online(self, device_id: str, online: bool) -> None:
        with Session(self.db) as session:
            device = session.get(Device, device_id)
            assert device is not None
            device.online = online
            session.add(device)
            session.commit()

    def desired_of(self, device_id: str) -> DesiredState | None:
        with Session(self.db) as session:
            device = session.get(Device, device_id)
            assert device is not None
            return DesiredState.model_validate(device.desired) if device.desired else None

    def event(self, device_id: str, kind: EventKind, **data: Any) -> None:
        now = self.clock()
        with Session(self.db) as session:
            session.add(
                EventRow(
                    device_id=device_id,
                    event_id=uuid.uuid4().hex,
                    ts=now,
                    kind=kind.value,
                    severity="info",
                    message=str(data.get("reason", "")),
                    data=data,
                    stored_at=now,
                )
            )
            session.commit()

    def install(self, device_id: str, *, healthy: bool = True) -> None:
        """Act as an agent would on its desired state: update and pass (or fail) the check."""
        state = self.desired_of(device_id)
        assert state is not None, f"{device_id} has no desired state"
        wanted = next(m for m in state.models if m.name == MODEL)
        assert wanted.target is not None
        data = {"model": MODEL, "version": wanted.version, "sha256": wanted.target.sha256}
        if healthy:
            self.report(device_id, wanted.version or "?", wanted.target.sha256)
            self.event(device_id, EventKind.UPDATE_HEALTHY, **data)
        else:
            self.event(
                device_id, EventKind.UPDATE_ROLLED_BACK, **data, reason="golden prompt failed"
            )

    def telemetry(
        self,
        device_id: str,
        *,
        p95_ms: float,
        samples: int = 5,
        every_s: float = 10,
        requests: int = 100,
        errors: int = 0,
        fallbacks: int | None = None,
        end: datetime | None = None,
    ) -> None:
        """``samples`` samples ending at ``end`` (now), ``every_s`` apart."""
        end = end or self.clock()
        with Session(self.db) as session:
            for i in range(samples):
                ts = end - timedelta(seconds=every_s * i)
                session.add(
                    TelemetryRow(
                        device_id=device_id,
                        sample_id=uuid.uuid4().hex,
                        seq=i,
                        ts=ts,
                        window_s=every_s,
                        requests=requests,
                        errors=errors,
                        rejections=0,
                        latency_p95_ms=p95_ms,
                        fallbacks=fallbacks,
                        sent_at=ts,
                        stored_at=ts,
                    )
                )
            session.commit()

    # -- the rollout ------------------------------------------------------------------

    def create(self, *, actor: str = "admin:test", **spec: Any) -> str:
        body = {"change": {"model": MODEL, "version": "2.0"}, "target": {"groups": ["lab"]}}
        return asyncio.run(self.engine.create(RolloutSpec.model_validate(body | spec), actor))

    def step(self, rollout_id: str) -> None:
        asyncio.run(self.engine.step(rollout_id))

    def act(self, rollout_id: str, action: str, reason: str = "") -> None:
        asyncio.run(self.engine.act(rollout_id, action, "admin:test", reason))

    def rollout(self, rollout_id: str) -> Rollout:
        with Session(self.db) as session:
            row = session.get(Rollout, rollout_id)
            assert row is not None
            return row

    def members(self, rollout_id: str) -> dict[str, RolloutDevice]:
        with Session(self.db) as session:
            rows = session.exec(
                select(RolloutDevice).where(col(RolloutDevice.rollout_id) == rollout_id)
            ).all()
            return {m.device_id: m for m in rows}

    def states(self, rollout_id: str) -> dict[str, str]:
        return {d: m.state for d, m in self.members(rollout_id).items()}

    def audit(self, rollout_id: str) -> list[AuditEntry]:
        with Session(self.db) as session:
            return list(
                session.exec(
                    select(AuditEntry)
                    .where(col(AuditEntry.subject) == f"rollout:{rollout_id}")
                    .order_by(col(AuditEntry.id))
                ).all()
            )

    def actions(self, rollout_id: str) -> list[str]:
        return [e.action for e in self.audit(rollout_id)]

    def gate_checks(self, rollout_id: str) -> list[GateCheckRow]:
        with Session(self.db) as session:
            return list(
                session.exec(
                    select(GateCheckRow)
                    .where(col(GateCheckRow.rollout_id) == rollout_id)
                    .order_by(col(GateCheckRow.id))
                ).all()
            )
