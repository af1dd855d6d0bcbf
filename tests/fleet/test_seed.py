"""The seeder's rows are rows the controller reads: through its API, its views, its engine.

``fleet.simulate.seed`` writes in bulk, past every check the API and the ingest make, so
these tests read a small seeded fleet back through the controller's own paths, on SQLite
and PostgreSQL: the device list and its filters, a device's detail, telemetry and
events, the fleet summary, the model registry, each rollout's detail, and one engine
step on the active rollout (which must change nothing). The rules the seeder restates
(it may not import the rollout plan or the registry) are checked against the originals,
and the same seed must write the same rows.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, SQLModel, col, select

from fleet.api.schemas import ModelMetadata
from fleet.app import create_app
from fleet.auth import passwords
from fleet.auth.users import has_admin
from fleet.config import FleetSettings
from fleet.db import make_engine
from fleet.desired import DesiredStates, due_for_renewal
from fleet.errors import Conflict
from fleet.registry.targets import target_path
from fleet.rollout import plan
from fleet.rollout.engine import RolloutEngine
from fleet.rollout.spec import RolloutSpec
from fleet.rollout.views import rollout_detail
from fleet.simulate import seed as seeding
from fleet.simulate.seed import SeedConfig, SeedResult, seed
from fleet.tables import Device, Rollout, RolloutDevice, User
from models.wire import DesiredState, ReportedState
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import ADMIN, Clock

NOW = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
SMALL = SeedConfig(devices=50, days=1, interval_min=60, seed=7, now=NOW)


def seeded_into(url: str, config: SeedConfig = SMALL) -> SeedResult:
    engine = make_engine(url)
    try:
        return seed(engine, config, out=None)
    finally:
        engine.dispose()


@pytest.fixture
def seeded(database_url: str) -> SeedResult:
    return seeded_into(database_url)


@pytest.fixture
def api(settings: FleetSettings, seeded: SeedResult, link: FakeLink) -> Iterator[TestClient]:
    """The controller's app on the seeded database, its clock at the seeded moment."""
    app = create_app(settings, link.factory(), clock=Clock(now=NOW))
    with TestClient(app, headers=ADMIN) as client:
        yield client


def get(api: TestClient, path: str, **params: Any) -> Any:
    response = api.get(path, params=params)
    assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:500]}"
    return response.json()


# -- the API reads it ----------------------------------------------------------------------


def test_devices_list_search_and_detail(api: TestClient, seeded: SeedResult) -> None:
    listed = get(api, "/api/v1/devices", limit=1000)
    assert listed["total"] == SMALL.devices
    assert {d["id"] for d in listed["items"]} == set(seeded.device_ids)
    statuses = {d["status"] for d in listed["items"]}
    assert "online" in statuses
    assert "offline" in statuses
    assert any(not d["in_sync"] for d in listed["items"])  # some drift, as in a real fleet
    counts = get(api, "/api/v1/status")["devices"]
    assert counts["total"] == SMALL.devices
    assert counts["online"] + counts["offline"] + counts["revoked"] == SMALL.devices
    for group in seeded.groups:
        page = get(api, "/api/v1/devices", group=group, limit=1000)
        assert all(d["group"] == group for d in page["items"])
    tag = seeded.tags[0]
    tagged = get(api, "/api/v1/devices", tag=tag, limit=1000)["items"]
    assert tagged
    assert all(tag in d["tags"] for d in tagged)
    found = get(api, "/api/v1/devices", q=listed["items"][3]["name"][:12])
    assert found["total"] >= 1
    get(api, "/api/v1/devices", degraded="true", status="online", limit=10, offset=10)
    for device in listed["items"][:10]:
        detail = get(api, f"/api/v1/devices/{device['id']}")
        assert detail["device_report"]["hostname"] == device["name"]
        assert DesiredState.model_validate(detail["desired"]).device_id == device["id"]
        if detail["reported"] is not None:
            assert ReportedState.model_validate(detail["reported"]).device_id == device["id"]
            assert detail["drift"]["managed"]


def test_telemetry_events_and_summary(api: TestClient, seeded: SeedResult) -> None:
    online = get(api, "/api/v1/devices", status="online", limit=5)["items"]
    day = {"since": (NOW - timedelta(days=1)).isoformat(), "until": NOW.isoformat()}
    for device in online:
        path = f"/api/v1/devices/{device['id']}"
        series = get(api, f"{path}/telemetry", bucket_s=3600, **day)
        assert series["totals"]["samples"] >= 12  # a sample an hour, minus a gap at most
        assert series["totals"]["latency_p95_ms_avg"] is not None
        raw = get(api, f"{path}/telemetry", raw="true", **day)["samples"]
        assert [s["ts"] for s in raw] == sorted(s["ts"] for s in raw)
        seqs = [s["seq"] for s in raw]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        events = get(api, f"{path}/events", since=(NOW - timedelta(days=30)).isoformat())
        assert events["items"], "every device that ever connected has events"
    summary = get(api, "/api/v1/telemetry/summary", window_s=86_400)
    assert summary["samples"] == seeded.rows["telemetry"]
    assert summary["reporting_devices"] > SMALL.devices // 2
    assert summary["events"] > 0


def test_models_and_rollouts_read_back(api: TestClient, seeded: SeedResult) -> None:
    models = {m["name"]: m for m in get(api, "/api/v1/models")}
    assert models["gemma3-270m"]["latest_version"] == "1.2"
    assert models["minilm-l6"]["latest_version"] == "1.0"  # 2.0 was yanked
    versions = [v for name in models for v in get(api, f"/api/v1/models/{name}")]
    assert sum(len(v["artifacts"]) for v in versions) == seeded.rows["model_artifacts"]
    assert [v["version"] for v in versions if v["yanked"]] == ["2.0"]
    listed = {r["status"]: r for r in get(api, "/api/v1/rollouts")}
    assert set(listed) == {"completed", "aborted", "active"}
    for status, rollout_id in seeded.rollouts.items():
        detail = get(api, f"/api/v1/rollouts/{rollout_id}")
        assert detail["status"] == status
        assert detail["audit"], "every rollout has its audit trail"
        members = get(api, f"/api/v1/rollouts/{rollout_id}/devices")
        assert len(members) == sum(detail["devices"].values())
    assert get(api, f"/api/v1/rollouts/{seeded.rollouts['completed']}")["gate_checks"]


def test_rollout_views_and_specs(database_url: str, seeded: SeedResult) -> None:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            for status, rollout_id in seeded.rollouts.items():
                row = session.get(Rollout, rollout_id)
                assert row is not None
                # Stored as the engine stores it: the spec with every default filled in.
                assert RolloutSpec.model_validate(row.spec).model_dump(mode="json") == row.spec
                detail = rollout_detail(session, row)
                assert detail.status == status
                members = session.exec(
                    select(RolloutDevice).where(col(RolloutDevice.rollout_id) == rollout_id)
                ).all()
                for member in members:
                    assert member.rank == plan.device_rank(rollout_id, member.device_id)
                    assert member.state in set(plan.DeviceState)
                released = sum(1 for m in members if m.stage is not None)
                eligible = sum(1 for m in members if m.state != "ineligible")
                quotas = plan.stage_quotas(RolloutSpec.model_validate(row.spec), eligible)
                assert released <= quotas[row.stage]
    finally:
        engine.dispose()


def test_desired_states_are_live_and_not_due_for_renewal(
    database_url: str, seeded: SeedResult
) -> None:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            for device in session.exec(select(Device)).all():
                state = DesiredState.model_validate(device.desired)
                assert state.version == device.desired_version
                assert not due_for_renewal(state, NOW), device.id
    finally:
        engine.dispose()


# -- the engine leaves the live rollout alone -------------------------------------------------


def test_an_engine_step_changes_no_device(tmp_path: Path) -> None:
    """Mid-stage with a full concurrency cap: the next step issues nothing, moves nobody."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    result = seeded_into(url, SeedConfig(devices=1500, days=0.05, interval_min=60, now=NOW))
    engine = make_engine(url)
    try:
        rollout_id = result.rollouts["active"]

        def states() -> dict[str, tuple[str, int | None]]:
            with Session(engine) as session:
                rows = session.exec(
                    select(RolloutDevice).where(col(RolloutDevice.rollout_id) == rollout_id)
                ).all()
                return {m.device_id: (m.state, m.stage) for m in rows}

        before = states()
        counted = {s: sum(1 for v in before.values() if v[0] == s) for s in ("queued", "updating")}
        assert min(counted.values()) > 0, counted
        link = FakeLink()
        clock = Clock(now=NOW + timedelta(minutes=1))
        rollouts = RolloutEngine(engine, DesiredStates(engine, link, clock), clock)
        asyncio.run(rollouts.step(rollout_id))
        assert link.published == []
        assert states() == before
        with Session(engine) as session:
            row = session.get(Rollout, rollout_id)
            assert row is not None
            assert (row.status, row.stage) == ("active", 1)
    finally:
        engine.dispose()


# -- restated rules, determinism, refusal, the command line ---------------------------------


def test_restated_rules_match_the_originals() -> None:
    assert seeding.device_rank("ro-1", "dev-2") == plan.device_rank("ro-1", "dev-2")
    assert seeding.target_path("m", "1.0", "Q4_K_M", "gguf") == target_path(
        "m", "1.0", "Q4_K_M", "gguf"
    )
    for canary, percents in ((20, [10, 50, 100]), (None, [10, 100]), (10, [25, 100])):
        spec = seeding.rollout_spec(
            "x", "m", "1.0", target={"groups": ["g"]},
            canary={"count": canary} if canary else {"percent": percents[0]},
            percents=percents[1:] if canary is None else percents, gates=[], abort_rules=[],
        )  # fmt: skip
        parsed = RolloutSpec.model_validate(spec)
        assert parsed.model_dump(mode="json") == spec
        for eligible in (0, 1, 7, 19, 20, 333, 5000):
            assert seeding.stage_quotas(canary, percents, eligible) == plan.stage_quotas(
                parsed, eligible
            )


def test_users_sign_in_with_the_seeded_password(database_url: str, seeded: SeedResult) -> None:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            users = {u.name: u for u in session.exec(select(User)).all()}
            assert has_admin(session)
    finally:
        engine.dispose()
    assert {name: u.role for name, u in users.items()} == seeding.USERS
    assert all(passwords.verify(u.password_hash, seeding.SEED_PASSWORD) for u in users.values())


def test_artifact_metadata_is_what_the_registry_stores() -> None:
    for artifact in seeding._artifacts(0, NOW):
        assert ModelMetadata.model_validate(artifact.meta).model_dump(mode="json") == artifact.meta


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {
                name: [
                    tuple(r) for r in conn.execute(sa.select(table).order_by(*table.primary_key))
                ]
                for name, table in SQLModel.metadata.tables.items()
                if name not in ("alembic_version",)
            }
    finally:
        engine.dispose()


def test_same_seed_same_rows(tmp_path: Path) -> None:
    urls = [f"sqlite:///{tmp_path / f'{n}.db'}" for n in ("a", "b", "c")]
    first = seeded_into(urls[0])
    assert seeded_into(urls[1]).device_ids == first.device_ids
    assert dump(urls[0]) == dump(urls[1])
    other = seeded_into(urls[2], SeedConfig(devices=50, days=1, interval_min=60, seed=8, now=NOW))
    assert set(other.device_ids).isdisjoint(first.device_ids)


def test_indexes_dropped_for_a_bulk_load_are_built_again(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seeding._Writer, "REBUILD_FROM_ROWS", 0)  # every table, however small
    seeded_into(database_url, SeedConfig(devices=10, days=0.2, now=NOW))
    engine = make_engine(database_url)
    try:
        found = sa.inspect(engine)
        for name, table in SQLModel.metadata.tables.items():
            wanted = {i.name for i in table.indexes if not i.unique}
            assert wanted <= {i["name"] for i in found.get_indexes(name)}, name
    finally:
        engine.dispose()


def test_refuses_a_database_that_holds_devices(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    seeded_into(url, SeedConfig(devices=5, days=0.1, now=NOW))
    with pytest.raises(Conflict, match="already holds 5 devices"):
        seeded_into(url, SeedConfig(devices=5, days=0.1, now=NOW))


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    args = ["--database-url", url, "--devices", "20", "--days", "0.5", "--interval-min", "30"]
    assert seeding.main([*args, "--now", NOW.isoformat(), "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["rows"]["devices"] == 20
    assert summary["now"] == NOW.isoformat()
    assert "telemetry:" in err
    assert "rows/s" in err
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            assert len(session.exec(select(Device)).all()) == 20
    finally:
        engine.dispose()
