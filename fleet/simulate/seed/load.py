"""Seed a database: migrate it, plan the fleet, write every table parents first."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import sqlalchemy as sa
from sqlmodel import SQLModel

from fleet.db import migrate
from fleet.errors import Conflict
from fleet.simulate.seed.config import TELEMETRY_COLUMNS, SeedConfig, SeedResult
from fleet.simulate.seed.devices import _device_rows, _group_rows, _token_rows
from fleet.simulate.seed.events import EVENT_COLUMNS, _event_rows
from fleet.simulate.seed.plan import _Fleet
from fleet.simulate.seed.progress import _Progress
from fleet.simulate.seed.registry import _artifact_rows, _user_rows
from fleet.simulate.seed.rollouts import _audit_rows, _member_rows
from fleet.simulate.seed.telemetry import _telemetry
from fleet.simulate.seed.writer import _Writer
from fleet.tables import Device


def _write(writer: _Writer, fleet: _Fleet) -> None:
    """Every table, parents first."""
    if "users" in SQLModel.metadata.tables:  # the dashboard serves no page until an admin exists
        writer.dicts("users", _user_rows(fleet))
    writer.dicts("groups", _group_rows(fleet))
    writer.dicts("enrollment_tokens", _token_rows(fleet))
    writer.dicts("model_artifacts", _artifact_rows(fleet))
    writer.dicts("devices", _device_rows(fleet))
    tags = [(d.id, tag) for d in fleet.devices for tag in d.tags]
    writer.tuples("device_tags", ("device_id", "tag"), tags, len(tags))
    writer.dicts("rollouts", [r.row() for r in fleet.rollouts.values()])
    writer.dicts("rollout_devices", _member_rows(fleet))
    checks = sorted((c for r in fleet.rollouts.values() for c in r.checks), key=lambda c: c["at"])
    writer.dicts("rollout_gate_checks", checks)
    writer.dicts("audit_log", _audit_rows(fleet))
    events = _event_rows(fleet)
    writer.tuples("events", EVENT_COLUMNS, events, len(events))
    total, samples = _telemetry(fleet)
    writer.tuples("telemetry", TELEMETRY_COLUMNS, samples, total)


def seed(engine: sa.Engine, config: SeedConfig, out: TextIO | None = sys.stderr) -> SeedResult:
    """Migrate the (empty) database and fill it; progress goes to ``out``.

    ``Conflict`` when it already holds devices: seeded ids would collide with them.
    """
    started = time.monotonic()
    progress = _Progress(out)
    migrate(engine)
    devices = SQLModel.metadata.tables[str(Device.__tablename__)]
    with engine.connect() as conn:
        existing = conn.execute(sa.select(sa.func.count()).select_from(devices)).scalar_one()
    if existing:
        raise Conflict(f"the database already holds {existing} devices: seed an empty one")
    progress.note(
        f"planning {config.devices:,} devices, {config.days:g} days of telemetry "
        f"every {config.interval_min:g} min (seed {config.seed})"
    )
    fleet = _Fleet(config)
    with engine.connect() as conn:
        writer = _Writer(conn, config.batch_rows, progress)
        _write(writer, fleet)
        if conn.dialect.name == "postgresql":
            analyzed = time.monotonic()
            with conn.begin():
                conn.exec_driver_sql("ANALYZE")
            writer.seconds["analyze"] = time.monotonic() - analyzed
    seconds = {**writer.seconds, "total": time.monotonic() - started}
    progress.note(f"done: {sum(writer.rows.values()):,} rows in {seconds['total']:.1f} s")
    return SeedResult(
        now=fleet.now,
        rows=writer.rows,
        seconds=seconds,
        rollouts={state: r.id for state, r in fleet.rollouts.items()},
        groups=[g[0] for g in fleet.groups],
        tags=sorted({t for d in fleet.devices for t in d.tags}),
        device_ids=[d.id for d in fleet.devices],
    )
