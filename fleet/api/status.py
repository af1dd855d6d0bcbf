"""Liveness, readiness and the controller's own status.

``/healthz`` says the process answers (restart it if not); ``/readyz`` says it can do
its job, the database answering and the MQTT session up (route no traffic to it
if not). Neither needs the admin token, so load balancers and orchestrators can ask.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from fleet.api.deps import SessionDep, StateDep, authorize
from fleet.api.present import device_counts
from fleet.api.schemas import DeviceCounts
from fleet.db import current_revision, head_revision, ping
from fleet.errors import DatabaseUnavailable
from fleet.leases import Leadership
from models.wire import SCHEMA_VERSION

__all__ = ["router"]

router = APIRouter(tags=["status"])


class LinkPublic(BaseModel):
    connected: bool
    broker_url: str
    embedded_broker: bool
    received: int
    stored: int
    duplicates: int
    rejected: int
    ingest: str  # mqtt, mqtt-shared ($share), jetstream or jetstream-waiting (docs/scale.md)


class DatabasePublic(BaseModel):
    dialect: str
    revision: str | None  # where the database is
    head: str  # the newest revision this controller knows


class LeaderPublic(BaseModel):
    """Which replica runs the fleet-wide jobs (rollouts, renewals, retention)."""

    this_replica: bool  # this controller holds the leader lease now
    replica: str  # this controller's holder id
    holder: str | None  # who held the lease at this controller's last claim
    epoch: int  # takeovers so far


class StatusPublic(BaseModel):
    version: str
    wire_schema_version: int
    public_url: str
    broker_public_url: str
    database: DatabasePublic
    link: LinkPublic
    leader: LeaderPublic
    devices: DeviceCounts


def edgefleet_version() -> str:
    try:
        return dist_version("edgefleet")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Alive: the process answers. Says nothing about the database or the broker."""
    return {"status": "ok"}


def _database_problem(engine: Engine) -> str | None:
    try:
        ping(engine)
    except DatabaseUnavailable as exc:
        return str(exc)
    return None


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    """200 when the database answers and the MQTT session is up; 503 with the reasons."""
    reasons = []
    problem = await run_in_threadpool(_database_problem, state.engine)
    if problem is not None:
        reasons.append(problem)
    link = state.link.status()
    if not link.connected:
        reasons.append(f"not connected to the MQTT broker at {link.broker_url}")
    body: dict[str, Any] = {"status": "ready" if not reasons else "not_ready", "reasons": reasons}
    return JSONResponse(body, status_code=503 if reasons else 200)


@router.get("/api/v1/status", dependencies=[authorize()])
def status(session: SessionDep, state: StateDep) -> StatusPublic:
    """Versions, the database's migration state, the MQTT link's counters, device counts."""
    link = state.link.status()
    return StatusPublic(
        version=edgefleet_version(),
        wire_schema_version=SCHEMA_VERSION,
        public_url=state.settings.resolved_public_url,
        broker_public_url=state.settings.resolved_broker_public_url,
        database=DatabasePublic(
            dialect=state.engine.dialect.name,
            revision=current_revision(state.engine),
            head=head_revision(),
        ),
        link=LinkPublic(
            connected=link.connected,
            broker_url=link.broker_url,
            embedded_broker=link.embedded_broker,
            received=link.received,
            stored=link.stored,
            duplicates=link.duplicates,
            rejected=link.rejected,
            ingest=link.ingest,
        ),
        leader=_leader(state.leadership),
        devices=device_counts(session),
    )


def _leader(leadership: Leadership) -> LeaderPublic:
    last = leadership.last
    return LeaderPublic(
        this_replica=leadership.leads(),
        replica=leadership.holder,
        holder=last.holder if last is not None else None,
        epoch=last.epoch if last is not None else 0,
    )
