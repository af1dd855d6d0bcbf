"""Degraded devices and group alerts through the real ingest, on SQLite and PostgreSQL.

Reported states go through the link's parsing and batch writer (:mod:`fleet.link.store`)
as they would from MQTT; each alert round is :func:`fleet.degraded.evaluate`, which the
app's lifespan runs every ``degraded_alert_interval_s``; the API and CLI read the result.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from fleet.degraded import Evaluation, Thresholds, evaluate
from fleet.link import store
from fleet.link.ingest import Accepted, parse
from fleet.tables import Alert, AuditEntry, Device
from models.policy import FailureKind, PolicyRef
from models.wire import BreakerState, DegradedModel, ReportedState, encode
from tests.fakes.fleet_link import FakeLink
from tests.fleet.cli_support import enroll as cli_enroll
from tests.fleet.cli_support import ok
from tests.fleet.helpers import Clock, create_group, enroll

RULE = Thresholds(share=0.2, min_devices=2)
POLICY = PolicyRef(name="lab-default", version=3, digest="ab" * 32)


def broken(
    clock: Clock, model: str = "gemma3-270m", kind: FailureKind = FailureKind.ERROR
) -> DegradedModel:
    return DegradedModel(
        name=model,
        breaker=BreakerState.OPEN,
        kind=kind,
        reason="llama.cpp raised: CUDA error 700",
        since=clock.now,
    )


def ingest(engine: sa.Engine, clock: Clock, device_id: str, degraded: list[DegradedModel]) -> None:
    """A live reported state through the link's parser and batch writer."""
    state = ReportedState(
        device_id=device_id,
        converged=True,
        agent_version="0.3.0",
        policy=POLICY,
        degraded=degraded,
        reported_at=clock.now,
    )
    topic = f"edgefleet/v1/devices/{device_id}/reported"
    item = parse(topic, encode(state), received_at=clock.now)
    assert isinstance(item, Accepted), item
    result = store.write_batch(engine, [item], clock.now)
    assert result.failed == []


def fleet(api: TestClient, clock: Clock, count: int, group: str = "lab") -> list[str]:
    create_group(api, group)
    secret = api.post("/api/v1/tokens", json={"group": group, "uses": count}).json()["secret"]
    return [enroll(api, clock, token=secret)["device_id"] for _ in range(count)]


def round_(engine: sa.Engine, clock: Clock, **kw: Any) -> Evaluation:
    result = evaluate(engine, RULE, now=clock.now, seen_within_s=300.0, **kw)
    assert result is not None
    return result


def open_alerts(api: TestClient) -> list[dict[str, Any]]:
    response = api.get("/api/v1/alerts")
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


# --- device views ---------------------------------------------------------------------------


def test_a_degraded_report_shows_in_the_device_views(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    sick, well = fleet(api, clock, 2)
    ingest(engine, clock, sick, [broken(clock)])
    ingest(engine, clock, well, [])

    detail = api.get(f"/api/v1/devices/{sick}").json()
    assert detail["degraded"] == [
        {
            "model": "gemma3-270m",
            "breaker": "open",
            "kind": "error",
            "reason": "llama.cpp raised: CUDA error 700",
            "since": detail["degraded"][0]["since"],
        }
    ]
    assert datetime.fromisoformat(detail["degraded"][0]["since"]) == clock.now
    assert detail["policy"] == {"name": "lab-default", "version": 3, "digest": "ab" * 32}
    healthy = api.get(f"/api/v1/devices/{well}").json()
    assert (healthy["degraded"], healthy["policy"]["name"]) == ([], "lab-default")

    listed = api.get("/api/v1/devices", params={"degraded": "true"}).json()
    assert (listed["total"], [d["id"] for d in listed["items"]]) == (1, [sick])
    assert listed["items"][0]["degraded"][0]["model"] == "gemma3-270m"
    others = api.get("/api/v1/devices", params={"degraded": "false"}).json()
    assert [d["id"] for d in others["items"]] == [well]

    api.post(f"/api/v1/devices/{sick}/revoke")  # a revoked device is not degraded: it is gone
    assert api.get("/api/v1/devices", params={"degraded": "true"}).json()["total"] == 0


def test_a_device_that_never_reported_has_no_degraded_models(api: TestClient, clock: Clock) -> None:
    (device,) = fleet(api, clock, 1)
    item = api.get("/api/v1/devices").json()["items"][0]
    assert (item["id"], item["degraded"], item["policy"]) == (device, [], None)
    assert api.get("/api/v1/devices", params={"degraded": "true"}).json()["items"] == []


# --- alerts ---------------------------------------------------------------------------------


def test_a_group_crossing_the_threshold_raises_one_alert_updates_it_and_clears(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    devices = fleet(api, clock, 10)
    for device in devices:
        ingest(engine, clock, device, [])
    ingest(engine, clock, devices[0], [broken(clock)])
    assert round_(engine, clock) == Evaluation()  # 1 of 10: neither the share nor the count
    assert open_alerts(api) == []

    for device in devices[1:3]:
        ingest(engine, clock, device, [broken(clock)])
    assert round_(engine, clock).raised == ["group:lab"]
    (alert,) = open_alerts(api)
    assert alert["kind"] == "group_degraded"
    assert alert["subject"] == "group:lab"
    assert alert["severity"] == "warning"
    assert alert["state"] == "open"
    assert alert["message"] == (
        "3 of 10 devices in lab are degraded (30% >= 20%): gemma3-270m open on 3 (error)"
    )
    assert alert["data"]["device_ids"] == sorted(devices[:3])
    assert alert["cleared_at"] is None

    clock.advance(seconds=30)
    assert round_(engine, clock) == Evaluation()  # nothing changed: nothing written
    assert open_alerts(api)[0]["updated_at"] == alert["updated_at"]

    ingest(engine, clock, devices[3], [broken(clock, "minilm", FailureKind.OUT_OF_MEMORY)])
    assert round_(engine, clock).updated == ["group:lab"]
    (updated,) = open_alerts(api)
    assert updated["id"] == alert["id"]
    assert updated["message"] == (
        "4 of 10 devices in lab are degraded (40% >= 20%): "
        "gemma3-270m open on 3 (error); minilm open on 1 (out_of_memory)"
    )
    assert updated["updated_at"] > alert["updated_at"]

    clock.advance(seconds=30)
    for device in devices[:4]:
        ingest(engine, clock, device, [])
    assert round_(engine, clock).cleared == ["group:lab"]
    assert open_alerts(api) == []
    (cleared,) = api.get("/api/v1/alerts", params={"state": "all"}).json()["items"]
    assert (cleared["id"], cleared["state"]) == (alert["id"], "cleared")
    assert datetime.fromisoformat(cleared["cleared_at"]) == clock.now

    audit = api.get("/api/v1/audit", params={"subject": "group:lab"}).json()
    assert [(e["action"], e["actor"]) for e in audit] == [
        ("alert.cleared", "controller"),
        ("alert.raised", "controller"),
    ]
    assert audit[1]["reason"] == alert["message"]
    assert audit[0]["reason"].startswith("0 of 10 devices in lab are degraded (0% < 20%)")

    for device in devices[:2]:  # degraded again: a new alert, the cleared one stays cleared
        ingest(engine, clock, device, [broken(clock)])
    assert round_(engine, clock).raised == ["group:lab"]
    states = [
        a["state"] for a in api.get("/api/v1/alerts", params={"state": "all"}).json()["items"]
    ]
    assert states == ["open", "cleared"]


def test_revoked_and_long_silent_devices_do_not_count(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    a, b, c = fleet(api, clock, 3)
    for device in (a, b):
        ingest(engine, clock, device, [broken(clock)])
    ingest(engine, clock, c, [])
    assert round_(engine, clock).raised == ["group:lab"]  # 2 of 3

    api.post(f"/api/v1/devices/{b}/revoke")
    assert round_(engine, clock).cleared == ["group:lab"]  # 1 of 2: under min_devices

    ingest(engine, clock, c, [broken(clock)])
    assert round_(engine, clock).raised == ["group:lab"]  # a and c: 2 of 2
    with Session(engine) as session:  # a went offline a moment ago (a restart): it counts
        session.exec(sa.update(Device).where(col(Device.id) == a).values(online=False))
        session.commit()
    clock.advance(seconds=200)
    assert round_(engine, clock) == Evaluation()
    clock.advance(seconds=200)  # a has been silent for 400 s: its report may be stale
    assert round_(engine, clock).cleared == ["group:lab"]


def test_a_round_can_be_limited_to_some_groups(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    lab = fleet(api, clock, 2, "lab")
    edge = fleet(api, clock, 2, "edge")
    for device in [*lab, *edge]:
        ingest(engine, clock, device, [broken(clock)])
    assert round_(engine, clock, groups=["edge"]).raised == ["group:edge"]
    assert round_(engine, clock, groups=["lab"]).raised == ["group:lab"]
    for device in lab:
        ingest(engine, clock, device, [])
    assert round_(engine, clock, groups=["edge"]) == Evaluation()  # lab's alert left alone
    assert round_(engine, clock).cleared == ["group:lab"]


def test_rounds_at_the_same_time_open_one_alert(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    """Replicas evaluating together: each round locks, so one alert per subject."""
    for device in fleet(api, clock, 4):
        ingest(engine, clock, device, [broken(clock)])
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def replica() -> None:
        start.wait()
        for _ in range(3):
            try:
                evaluate(engine, RULE, now=clock.now, seen_within_s=300.0)
            except sa.exc.OperationalError as exc:  # SQLite: a busy database, retried next round
                errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with Session(engine) as session:
        alerts = session.exec(select(Alert)).all()
        raised = session.exec(
            select(AuditEntry).where(col(AuditEntry.action) == "alert.raised")
        ).all()
    assert len(alerts) == 1, alerts
    assert alerts[0].cleared_at is None
    assert len(raised) == 1
    assert len(errors) < 12


def test_the_alerts_route_checks_its_parameters(api: TestClient) -> None:
    assert api.get("/api/v1/alerts", params={"state": "closed"}).status_code == 422
    assert api.get("/api/v1/alerts", params={"limit": 0}).status_code == 422
    assert api.get("/api/v1/alerts", headers={"Authorization": "Bearer nope"}).status_code == 401


# --- CLI ------------------------------------------------------------------------------------


def test_cli_lists_degraded_devices_and_alerts(
    http: TestClient, clock: Clock, link: FakeLink
) -> None:
    assert link.engine is not None
    engine = link.engine
    ok(http, "groups", "create", "lab")
    secret = json.loads(ok(http, "tokens", "create", "--group", "lab", "--uses", "3", "--json"))[
        "secret"
    ]
    devices = [cli_enroll(http, clock, secret) for _ in range(3)]
    for device in devices[:2]:
        ingest(engine, clock, device, [broken(clock)])
    ingest(engine, clock, devices[2], [])

    out = ok(http, "devices", "list", "--degraded")
    for text in ("gemma3-270m", "open", "error", "CUDA error 700", *devices[:2]):
        assert text in out, out
    assert devices[2] not in out
    shown = ok(http, "devices", "show", devices[0])
    assert "fallback policy: lab-default v3" in shown
    assert "gemma3-270m: breaker open" in shown

    assert "no open alerts" in ok(http, "alerts", "list")
    round_(engine, clock)
    out = ok(http, "alerts", "list")
    for text in ("group:lab", "warning", "2 of 3 devices in lab"):
        assert text in out, out
    for device in devices[:2]:
        ingest(engine, clock, device, [])
    round_(engine, clock)
    assert "no open alerts" in ok(http, "alerts", "list")
    everything = ok(http, "alerts", "list", "--all")
    assert "cleared" in everything
    assert "group:lab" in everything
    (alert,) = json.loads(ok(http, "alerts", "list", "--all", "--json"))["items"]
    assert alert["state"] == "cleared"
