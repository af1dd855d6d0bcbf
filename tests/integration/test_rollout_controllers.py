"""Rollouts survive their controllers: a SIGKILL mid-rollout, and two replicas on one database.

The engine (``fleet/rollout/engine.py``) keeps every state of a rollout in the database
and writes the rollout's row only at the revision it read, after taking it with
``SELECT ... FOR UPDATE SKIP LOCKED``. So a controller killed mid-rollout and started
again resumes with no stage skipped or repeated, and two controllers stepping the same
rollout never advance a stage twice. These tests run the real thing: ``edgefleet serve``
processes, a real Mosquitto and simulated devices that update like agents; the last one
drives two engines from two threads at one PostgreSQL database, without devices. A
device event held by a controller that is then killed still counts (the controller
acknowledges a message only once it is stored); and replicas sharing ingest through a
shared subscription group keep each device's newest report, whichever commits last.

What is checked is read from the database: the audit log (``rollout.stage_started``,
``rollout.stage_installed``, ``rollout.completed``), ``rollout_devices``, the devices'
desired versions before and after, what they report. Each rollout write is logged by a
trigger the test adds to ``rollouts`` (old revision, new revision, and on PostgreSQL the
``application_name`` of the controller that wrote it), so a lost or doubled write shows
as a gap or a repeat in the revision sequence.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import Session

from fleet.db import make_engine
from fleet.desired import DesiredStates
from fleet.rollout.engine import RolloutEngine
from fleet.simulate import ModelRef, ServedModel, Simulation, SimulationConfig
from fleet.tables import Group
from scripts import servers
from scripts.servers import MosquittoBroker, running_controller
from tests.fakes.fleet_link import FakeLink
from tests.fleet.rollout_world import World, sha
from tests.polling import eventually, wait_until

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "rollout-controllers-admin-0123456789"
LLM = "gemma3-270m"
DEADLINE_S = 45.0
V1 = b"GGUF" + bytes(range(256)) * 40  # starts like a GGUF file; the registry checks that
V2 = b"GGUF" + bytes(range(255, -1, -1)) * 40
SHA1, SHA2 = hashlib.sha256(V1).hexdigest(), hashlib.sha256(V2).hexdigest()
STARTS_ON = ServedModel.initial(ModelRef.parse(f"{LLM}@0.9"))  # not in the registry
# 2.0 to group "lab" in four stages: a canary of 2, then 25%, 50% and 100%.
STAGED = {
    "change": {"model": LLM, "version": "2.0"},
    "target": {"groups": ["lab"]},
    "canary": {"count": 2},
    "stages": {"percents": [25, 50, 100]},
    "soak_s": 1,
    "check_interval_s": 0.5,
    "device_timeout_s": 30,
}

# -- the database, as the test reads it ------------------------------------------------------


def _json(value: Any) -> Any:
    """A JSON column read with plain SQL: a dict on PostgreSQL, text on SQLite."""
    return json.loads(value) if isinstance(value, str) else value


class Database:
    """Plain SQL on the controllers' database, and a log of every write to ``rollouts``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.postgres = self.engine.dialect.name == "postgresql"

    def dispose(self) -> None:
        self.engine.dispose()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params).all())

    def log_rollout_writes(self) -> None:
        """A trigger records each UPDATE of ``rollouts``: its revision before and after."""
        if self.postgres:
            statements = [
                "CREATE TABLE test_rollout_writes (id bigserial PRIMARY KEY, rollout_id text, "
                "old_revision int, new_revision int, writer text, stage int, status text)",
                "CREATE FUNCTION test_log_rollout_write() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN INSERT INTO test_rollout_writes "
                "(rollout_id, old_revision, new_revision, writer, stage, status) VALUES "
                "(NEW.id, OLD.revision, NEW.revision, current_setting('application_name'), "
                "NEW.stage, NEW.status); RETURN NEW; END $$",
                "CREATE TRIGGER test_rollout_writes AFTER UPDATE ON rollouts "
                "FOR EACH ROW EXECUTE FUNCTION test_log_rollout_write()",
            ]
        else:
            statements = [
                "CREATE TABLE test_rollout_writes (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "rollout_id TEXT, old_revision INTEGER, new_revision INTEGER, writer TEXT, "
                "stage INTEGER, status TEXT)",
                "CREATE TRIGGER test_rollout_writes AFTER UPDATE ON rollouts BEGIN "
                "INSERT INTO test_rollout_writes "
                "(rollout_id, old_revision, new_revision, writer, stage, status) VALUES "
                "(NEW.id, OLD.revision, NEW.revision, NULL, NEW.stage, NEW.status); END",
            ]
        with self.engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))

    def writes(self, rollout_id: str) -> list[tuple[int, int, str | None]]:
        """(old revision, new revision, writer) of each write of the rollout, in order."""
        return [
            (old, new, writer)
            for old, new, writer in self.rows(
                "SELECT old_revision, new_revision, writer FROM test_rollout_writes "
                "WHERE rollout_id = :id ORDER BY id",
                id=rollout_id,
            )
        ]

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        [row] = self.rows(
            "SELECT status, stage, phase, revision, reason FROM rollouts WHERE id = :id",
            id=rollout_id,
        )
        return dict(row._mapping)

    def audit(self, rollout_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(action, data) of the rollout's audit entries, oldest first."""
        return [
            (action, _json(data) or {})
            for action, data in self.rows(
                "SELECT action, data FROM audit_log WHERE subject = :subject ORDER BY id",
                subject=f"rollout:{rollout_id}",
            )
        ]

    def stages(self, rollout_id: str, action: str) -> list[int]:
        return [data["stage"] for name, data in self.audit(rollout_id) if name == action]

    def members(self, rollout_id: str) -> dict[str, dict[str, Any]]:
        rows = self.rows(
            "SELECT device_id, stage, state, desired_version, issued_at, detail "
            "FROM rollout_devices WHERE rollout_id = :id",
            id=rollout_id,
        )
        return {row.device_id: dict(row._mapping) for row in rows}

    def devices(self) -> dict[str, dict[str, Any]]:
        """Each device's desired version, desired state and reported state."""
        rows = self.rows("SELECT id, desired_version, desired, reported FROM devices")
        return {
            row.id: {
                "desired_version": row.desired_version,
                "desired": _json(row.desired),
                "reported": _json(row.reported),
            }
            for row in rows
        }

    def update_events(self, device_id: str, sha256: str) -> list[str]:
        """In the device's order (its clock): replicas sharing ingest may store them in another."""
        return [
            kind
            for kind, data in self.rows(
                "SELECT kind, data FROM events WHERE device_id = :device "
                "AND kind LIKE 'update%' ORDER BY ts, id",
                device=device_id,
            )
            if (_json(data) or {}).get("sha256") == sha256
        ]


def assert_revisions_unbroken(db: Database, rollout_id: str) -> list[tuple[int, int, str | None]]:
    """Every write moved the revision on by one from the last: none lost, none doubled."""
    writes = db.writes(rollout_id)
    revisions = [(old, new) for old, new, _ in writes]
    final = db.rollout(rollout_id)["revision"]
    assert revisions == [(r, r + 1) for r in range(1, final)], revisions
    return writes


def assert_stages_once_in_order(db: Database, rollout_id: str, stages: int) -> None:
    """Each stage installed, then the next started, once each; then completed, once."""
    milestones = [
        (action.removeprefix("rollout."), data.get("stage"))
        for action, data in db.audit(rollout_id)
        if action in {"rollout.stage_started", "rollout.stage_installed", "rollout.completed"}
    ]
    expected: list[tuple[str, int | None]] = [("stage_installed", 0)]
    for stage in range(1, stages):
        expected += [("stage_started", stage), ("stage_installed", stage)]
    expected.append(("completed", None))
    assert milestones == expected
    assert db.stages(rollout_id, "rollout.stage_started") == list(range(1, stages))
    actions = Counter(action for action, _ in db.audit(rollout_id))
    assert actions["rollout.device_failed"] == 0, db.audit(rollout_id)
    assert actions["rollout.aborted"] == 0


def assert_each_device_got_the_change_once(
    db: Database, rollout_id: str, before: dict[str, int], quotas: list[int]
) -> None:
    """One new desired state per device, carrying 2.0, which it now serves and reports."""
    members = db.members(rollout_id)
    devices = db.devices()
    assert set(members) == set(before)
    assert {m["state"] for m in members.values()} == {"updated"}, members
    released = Counter(m["stage"] for m in members.values())
    assert [released[stage] for stage in range(len(quotas))] == [
        b - a for a, b in zip([0, *quotas], quotas, strict=False)
    ]
    for device_id, member in members.items():
        device = devices[device_id]
        # The rollout issued exactly one desired state: the version grew by one, to it.
        assert device["desired_version"] == before[device_id] + 1, (device_id, device, before)
        assert member["desired_version"] == device["desired_version"], (device_id, member)
        assert member["issued_at"] is not None
        [model] = device["desired"]["models"]
        assert (model["name"], model["version"], model["target"]["sha256"]) == (LLM, "2.0", SHA2)
        reported = device["reported"]
        assert reported["desired_version"] == device["desired_version"], reported
        assert [(m["name"], m["version"], m["sha256"], m["state"]) for m in reported["models"]] == [
            (LLM, "2.0", SHA2, "ready")
        ]
        # It updated once: one download, one install, one health check of 2.0.
        assert db.update_events(device_id, SHA2) == [
            "update_verified",
            "update_installed",
            "update_healthy",
        ], device_id


# -- the controllers and the devices ----------------------------------------------------------


def with_application_name(url: str, name: str) -> str:
    """PostgreSQL tags the controller's sessions, so the write log says which one wrote."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return url
    return parsed.update_query_dict({"application_name": name}).render_as_string(
        hide_password=False
    )


def controller(
    tmp_path: Path,
    broker: MosquittoBroker,
    database_url: str,
    name: str,
    **env: str,
) -> AbstractContextManager[servers.Controller]:
    """``edgefleet serve`` named ``name`` on the test's Mosquitto, with the shared data folder.

    ``env`` adds settings: ``client_id="x"`` is ``EDGEFLEET_FLEET_CLIENT_ID=x``.
    """
    return running_controller(
        tmp_path,
        with_application_name(database_url, name),
        "--broker", broker.url,
        "--broker-auth-dir", str(broker.auth_dir),
        "--broker-pid-file", str(broker.pid_file),
        env={
            "EDGEFLEET_FLEET_ADMIN_TOKEN": ADMIN_TOKEN,
            "EDGEFLEET_FLEET_ROLLOUT_INTERVAL_S": "0.2",
            # A killed controller's replacement (a new lease holder) waits for the
            # dead one's lease to run out before it steps rollouts: 2 s, not 10.
            "EDGEFLEET_FLEET_LEADER_LEASE_S": "2",
            **{f"EDGEFLEET_FLEET_{key.upper()}": value for key, value in env.items()},
        },
        ready_s=60,
        name=name,
        data_dir=tmp_path / "data",
    )  # fmt: skip


def api(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Edgefleet-Actor": "tester"},
        timeout=15,
    )


async def ok(response: httpx.Response) -> Any:
    assert response.is_success, response.text
    return response.json()


async def until(
    check: Callable[[], Any],
    what: str,
    detail: Callable[[], object] | None = None,
    *,
    within_s: float = DEADLINE_S,
) -> Any:
    return await eventually(check, what, within_s=within_s, every_s=0.05, detail=detail)


async def fleet_on_v1(client: httpx.AsyncClient, devices: int) -> str:
    """Group "lab", 1.0 and 2.0 registered; a token enrolling ``devices`` into the group."""
    await ok(await client.post("/api/v1/groups", json={"name": "lab"}))
    for version, data in (("1.0", V1), ("2.0", V2)):
        await ok(
            await client.post(
                f"/api/v1/models/{LLM}/versions/{version}",
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
        )
    created = await ok(await client.post("/api/v1/tokens", json={"uses": devices, "group": "lab"}))
    return str(created["secret"])


def simulation(url: str, secret: str, devices: int, update_s: float) -> Simulation:
    return Simulation(
        SimulationConfig(
            devices=devices,
            fleet_url=url,
            token=secret,
            interval_s=0.5,
            models=(STARTS_ON,),
            update_s=update_s,
            update_jitter=0,
        )
    )


async def all_on_v1(
    client: httpx.AsyncClient, db: Database, ids: list[str], *, within_s: float = DEADLINE_S
) -> dict[str, int]:
    """Put the group on 1.0, wait until every device serves it; their desired versions."""
    await ok(
        await client.put(
            "/api/v1/groups/lab/desired", json={"models": [{"name": LLM, "version": "1.0"}]}
        )
    )

    def serving_v1() -> dict[str, int] | None:
        devices = db.devices()
        for device_id in ids:
            reported = devices[device_id]["reported"] or {}
            models = [(m["version"], m["sha256"], m["state"]) for m in reported.get("models", [])]
            if models != [("1.0", SHA1, "ready")] or not reported.get("converged"):
                return None
        return {device_id: devices[device_id]["desired_version"] for device_id in ids}

    def reports() -> object:
        return {d: (v["desired_version"], v["reported"]) for d, v in db.devices().items()}

    before: dict[str, int] = await until(
        serving_v1, "every device serving 1.0", reports, within_s=within_s
    )
    assert set(before.values()) == {1}
    return before


def status_of(db: Database, rollout_id: str) -> Callable[[], object]:
    """What a timeout message shows: the rollout and its devices."""

    def detail() -> object:
        return {"rollout": db.rollout(rollout_id), "devices": db.members(rollout_id)}

    return detail


# -- a controller killed mid-rollout ------------------------------------------------------------


def test_a_controller_killed_mid_rollout_resumes_with_no_stage_skipped_or_repeated(
    tmp_path: Path, broker: MosquittoBroker, database_url: str
) -> None:
    """SIGKILL the controller as stage 1 starts, and again as stage 2 starts; it finishes.

    Each replacement starts on the same database and data folder. The devices update in
    1 s (no jitter): the kill lands right after the audit shows the stage started, before
    any device of that stage can have reported on it, so no acknowledged device event is
    lost with the killed process.
    """
    devices, stages = 20, 4  # canary 2, then 25%, 50%, 100%: 2, 5, 10, 20 released
    quotas = [2, 5, 10, 20]
    db = Database(database_url)

    async def scenario(stack: ExitStack) -> None:
        first = await asyncio.to_thread(
            stack.enter_context, controller(tmp_path, broker, database_url, "first")
        )
        db.log_rollout_writes()
        async with api(first.url) as client:
            secret = await fleet_on_v1(client, devices)
        async with simulation(first.url, secret, devices, update_s=1.0) as sim:
            ids = [d.identity.device_id for d in sim.devices]
            async with api(first.url) as client:
                before = await all_on_v1(client, db, ids)
                rollout_id = (await ok(await client.post("/api/v1/rollouts", json=STAGED)))["id"]
            running = first
            killed_at = []
            for stage, name in ((1, "second"), (2, "third")):

                def started(stage: int = stage) -> bool:
                    return stage in db.stages(rollout_id, "rollout.stage_started")

                await until(started, f"stage {stage} started", detail=status_of(db, rollout_id))
                assert await asyncio.to_thread(running.kill) == -9
                at_kill = db.rollout(rollout_id)
                assert at_kill["status"] == "active", at_kill
                killed_at.append(at_kill)
                running = await asyncio.to_thread(
                    stack.enter_context, controller(tmp_path, broker, database_url, name)
                )

            def completed() -> bool:
                return bool(db.rollout(rollout_id)["status"] == "completed")

            await until(completed, "the rollout completed", detail=status_of(db, rollout_id))
            counters = sim.stats.counters
            # Two new desired states reached each device (1.0, then 2.0), two updates each.
            assert (counters.desired, counters.updated) == (2 * devices, 2 * devices)
            assert (counters.rolled_back, counters.update_failed, counters.superseded) == (0, 0, 0)
        final = db.rollout(rollout_id)
        assert final["stage"] == stages - 1
        assert all(final["revision"] > at_kill["revision"] for at_kill in killed_at)
        assert_stages_once_in_order(db, rollout_id, stages)
        assert_each_device_got_the_change_once(db, rollout_id, before, quotas)
        writes = assert_revisions_unbroken(db, rollout_id)
        if db.postgres:  # the write log names who wrote: every controller had a share
            assert {writer for _, _, writer in writes} == {"first", "second", "third"}

    try:
        with ExitStack() as stack:
            asyncio.run(scenario(stack))
    finally:
        db.dispose()


def test_an_update_event_a_killed_controller_had_acknowledged_still_counts(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """A device's ``update_healthy``, buffered by a controller that is then SIGKILLed.

    The controller acknowledges a device's message only once it is stored
    (``fleet/link/session.py``, docs/broker.md), so the broker sends the unacknowledged
    event again to the next controller, and the rollout engine, which needs it to count
    the device updated, sees it. The buffer is held for 60 s (``ingest_flush_ms``) so the
    kill lands inside it every time; by default the window is 200 ms plus a write.
    """
    database_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    db = Database(database_url)

    async def scenario(stack: ExitStack) -> None:
        first = await asyncio.to_thread(
            stack.enter_context,
            controller(tmp_path, broker, database_url, "first", ingest_flush_ms="60000"),
        )
        async with api(first.url) as client:
            secret = await fleet_on_v1(client, 1)
        config = SimulationConfig(
            devices=1,
            fleet_url=first.url,
            token=secret,
            interval_s=3600,  # no telemetry: only the update's events and reports flow
            models=(ServedModel.initial(ModelRef.parse(f"{LLM}@1.0")),),
            update_s=0.2,
            update_jitter=0,
        )
        async with Simulation(config) as sim, api(first.url) as client:
            [device_id] = [d.identity.device_id for d in sim.devices]
            spec = {
                "change": {"model": LLM, "version": "2.0"},
                "target": {"groups": ["lab"]},
                "soak_s": 0,
                "device_timeout_s": 5,
            }
            rollout_id = (await ok(await client.post("/api/v1/rollouts", json=spec)))["id"]
            counters = sim.stats.counters

            async def handed_every_message_in() -> bool:
                """The controller took (and acknowledged) all the device said, update included."""
                received = (await ok(await client.get("/api/v1/status")))["link"]["received"]
                sent = counters.events + counters.reports + counters.published
                # online, then update_verified, update_installed, update_healthy
                return counters.events >= 4 and received >= sent

            await until(handed_every_message_in, "the controller received the update's events")
            assert db.update_events(device_id, SHA2) == []  # buffered, not yet written
            assert await asyncio.to_thread(first.kill) == -9
            await asyncio.to_thread(
                stack.enter_context, controller(tmp_path, broker, database_url, "second")
            )

            def finished() -> bool:
                return bool(db.rollout(rollout_id)["status"] != "active")

            await until(finished, "the rollout finished", detail=status_of(db, rollout_id))
        # It did update: its retained report, read again by the new controller, says so.
        reported = db.devices()[device_id]["reported"]
        assert [(m["version"], m["sha256"]) for m in reported["models"]] == [("2.0", SHA2)]
        assert reported["converged"] is True
        # What the broker had not delivered yet would come again; what was acknowledged
        # and buffered died with the process.
        assert db.update_events(device_id, SHA2) == [
            "update_verified",
            "update_installed",
            "update_healthy",
        ]
        members = db.members(rollout_id)
        assert members[device_id]["state"] == "updated", members

    try:
        with ExitStack() as stack:
            asyncio.run(scenario(stack))
    finally:
        db.dispose()


# -- two controllers on one PostgreSQL database ---------------------------------------------------


def test_two_controllers_on_one_postgres_database_never_advance_a_stage_twice(
    tmp_path: Path, broker: MosquittoBroker, postgres_url: str
) -> None:
    """Two replicas, one rollout of eleven stages stepped every 0.05 s; each stage starts once.

    They share the database, the data folder (admin token, TUF metadata and keys, the
    broker password) and the broker, each with its own MQTT client id. Each takes every
    device message (plain subscriptions; ingest stores each event once by its id): with
    a shared subscription group a device's reports are split between the replicas (the
    test after this one checks the newest one is kept). Soak 0 and no gates. Only the
    replica holding the leader lease steps rollouts (fleet/leases.py), so one replica
    writes every step, whichever received the device reports; the engine's own guard
    against two replicas stepping at once is raced in
    ``test_two_engines_stepping_together_advance_each_stage_once``.
    """
    devices, stages = 20, 11  # canary 2, then 10%, 20%, ... 100%
    quotas = [2, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    db = Database(postgres_url)

    def replica(name: str) -> AbstractContextManager[servers.Controller]:
        return controller(
            tmp_path,
            broker,
            postgres_url,
            name,
            rollout_interval_s="0.05",
            client_id=f"edgefleet-controller-{name}",
        )

    async def scenario(stack: ExitStack) -> None:
        a = await asyncio.to_thread(stack.enter_context, replica("a"))
        b = await asyncio.to_thread(stack.enter_context, replica("b"))
        db.log_rollout_writes()
        async with api(a.url) as client:
            secret = await fleet_on_v1(client, devices)
        async with simulation(a.url, secret, devices, update_s=0.1) as sim:
            ids = [d.identity.device_id for d in sim.devices]
            async with api(a.url) as client:
                before = await all_on_v1(client, db, ids)
            spec = {
                "change": {"model": LLM, "version": "2.0"},
                "target": {"groups": ["lab"]},
                "canary": {"count": 2},
                "stages": {"percents": [10 * n for n in range(1, 11)]},
                "soak_s": 0,
                "device_timeout_s": 30,
            }
            async with api(b.url) as client:  # created on one replica, run by both
                rollout_id = (await ok(await client.post("/api/v1/rollouts", json=spec)))["id"]

            def completed() -> bool:
                return bool(db.rollout(rollout_id)["status"] == "completed")

            await until(completed, "the rollout completed", detail=status_of(db, rollout_id))
            counters = sim.stats.counters
            assert (counters.desired, counters.updated) == (2 * devices, 2 * devices)
            assert (counters.rolled_back, counters.update_failed, counters.superseded) == (0, 0, 0)
        assert db.rollout(rollout_id)["stage"] == stages - 1
        assert_stages_once_in_order(db, rollout_id, stages)
        assert_each_device_got_the_change_once(db, rollout_id, before, quotas)
        writes = assert_revisions_unbroken(db, rollout_id)
        shares = Counter(writer for _, _, writer in writes)
        assert len(shares) == 1, shares  # the leader stepped it, alone
        for replica_log in (a, b):
            assert "Traceback" not in replica_log.output(), replica_log.output()[-4000:]

    try:
        with ExitStack() as stack:
            asyncio.run(scenario(stack))
    finally:
        db.dispose()


def test_replicas_in_a_shared_subscription_group_keep_a_devices_newest_report(
    tmp_path: Path, broker: MosquittoBroker, postgres_url: str
) -> None:
    """Two replicas split ingest (docs/broker.md); the device's stored report must not go back.

    One replica writes what it received after 60 s (``ingest_flush_ms``), the other after
    20 ms, so which report is written last is certain: the device is asked to report
    until the slow replica holds one and the fast one then stored a newer one; the slow
    one is stopped cleanly, which writes what it holds. In production the same happens
    whenever one replica's batch is a little later than the other's.
    """
    db = Database(postgres_url)

    def replica(name: str, flush_ms: str) -> AbstractContextManager[servers.Controller]:
        return controller(
            tmp_path,
            broker,
            postgres_url,
            name,
            ingest_flush_ms=flush_ms,
            client_id=f"edgefleet-controller-{name}",
            shared_subscription_group="controllers",
        )

    async def scenario(stack: ExitStack, slow_stack: ExitStack) -> None:
        slow = await asyncio.to_thread(slow_stack.enter_context, replica("slow", "60000"))
        fast = await asyncio.to_thread(stack.enter_context, replica("fast", "20"))
        async with api(fast.url) as client:
            secret = await fleet_on_v1(client, 1)
        config = SimulationConfig(
            devices=1,
            fleet_url=fast.url,
            token=secret,
            interval_s=3600,  # no telemetry: only the reports asked for flow
            models=(STARTS_ON,),
        )
        async with Simulation(config) as sim, api(fast.url) as client, api(slow.url) as other:
            [device_id] = [d.identity.device_id for d in sim.devices]

            async def taken_by_slow() -> int:
                return int((await ok(await other.get("/api/v1/status")))["link"]["received"])

            def stored_at() -> Any:
                return (db.devices()[device_id]["reported"] or {}).get("reported_at")

            held = False  # the slow replica holds an older report, not yet written
            for _ in range(30):
                slow_before, stored_before = await taken_by_slow(), stored_at()
                sent = await client.post(
                    f"/api/v1/devices/{device_id}/commands", json={"kind": "report"}
                )
                assert sent.status_code == 202, sent.text

                async def taken_by(
                    slow_before: int = slow_before, stored: Any = stored_before
                ) -> str:
                    if await taken_by_slow() > slow_before:
                        return "slow"
                    return "fast" if stored_at() != stored else ""

                if await until(taken_by, "a replica to take the report") == "slow":
                    held = True
                elif held:
                    break
            else:
                pytest.fail("the reports never went to one replica, then the other")
            newest = stored_at()
            counters = sim.stats.counters
            await asyncio.to_thread(slow_stack.close)  # a clean stop writes what it holds
            assert counters.reports >= 3
            assert stored_at() == newest

    try:
        with ExitStack() as stack, ExitStack() as slow_stack:
            asyncio.run(scenario(stack, slow_stack))
    finally:
        db.dispose()


def test_two_engines_stepping_together_advance_each_stage_once(postgres_url: str) -> None:
    """Without devices: two engines (two connection pools) step eight rollouts in lockstep.

    Every device already serves 2.0, so a step that holds a rollout finishes its stage
    and starts the next: each round, both engines step every live rollout at once (a
    barrier lines them up), until all of them complete. Each stage must start exactly
    once, each write follow the last, and each device get one desired state.
    """
    world = World.on(with_application_name(postgres_url, "a"))
    db = Database(postgres_url)
    other = make_engine(with_application_name(postgres_url, "b"))
    try:
        world.artifact("1.0")
        world.artifact("2.0")
        groups = [f"g{n}" for n in range(8)]
        with Session(world.db) as session:
            session.add_all(Group(name=name) for name in groups)
            session.commit()
        for group in groups:
            for n in range(6):
                world.device(f"{group}-dev-{n}", group=group, serves="2.0")
        db.log_rollout_writes()
        spec: dict[str, Any] = {
            "canary": {"count": 1},
            "stages": {"percents": [10 * n for n in range(1, 11)]},
            "soak_s": 0,
        }
        rollouts = [world.create(target={"groups": [group]}, **spec) for group in groups]
        link_b = FakeLink()
        engine_b = RolloutEngine(other, DesiredStates(other, link_b, world.clock), world.clock)

        rounds = 0
        done = threading.Event()

        def next_round() -> None:  # run by one thread while both wait at the barrier
            nonlocal rounds
            rounds += 1
            statuses = {db.rollout(r)["status"] for r in rollouts}
            if statuses == {"completed"} or rounds > 40:
                done.set()

        barrier = threading.Barrier(2, action=next_round, timeout=60)
        failures: list[BaseException] = []

        def controller_loop(engine: RolloutEngine) -> None:
            try:
                while True:
                    barrier.wait()
                    if done.is_set():
                        return
                    asyncio.run(engine.step_all())
            except BaseException as exc:
                failures.append(exc)
                barrier.abort()

        threads = [
            threading.Thread(target=controller_loop, args=(engine,), name=name)
            for name, engine in (("a", world.engine), ("b", engine_b))
        ]
        for thread in threads:
            thread.start()
        wait_until(
            lambda: not any(t.is_alive() for t in threads),
            "both engines to stop stepping",
            every_s=0.05,
        )
        assert not failures, failures
        assert rounds <= 40, {r: db.rollout(r) for r in rollouts}

        writers: Counter[str | None] = Counter()
        for rollout_id in rollouts:
            assert db.rollout(rollout_id)["status"] == "completed"
            assert_stages_once_in_order(db, rollout_id, 11)
            writers.update(writer for _, _, writer in assert_revisions_unbroken(db, rollout_id))
        assert set(writers) == {"a", "b"}, writers  # the premise: both engines won rounds
        published = [*world.link.published, *link_b.published]
        per_device = Counter(state.device_id for state in published)
        assert len(per_device) == 8 * 6
        assert set(per_device.values()) == {1}, per_device
        assert {s.models[0].target.sha256 for s in published if s.models[0].target} == {
            sha("2.0/Q4_K_M")
        }
        assert all(s.version == 1 for s in published)
        for rollout_id in rollouts:
            for member in world.members(rollout_id).values():
                assert (member.state, member.desired_version) == ("updated", 1)
        assert world.link.published  # both engines issued some
        assert link_b.published
    finally:
        other.dispose()
        db.dispose()
        world.db.dispose()
