"""Alerts through the real ingest and the API, on SQLite and PostgreSQL.

Reported states, events and telemetry go through the link's parsing and batch writer
(:mod:`fleet.link.store`) as they would from MQTT; rollouts and gate checks are written
as the engine writes them; each alert round is :func:`fleet.alerts.evaluate`, which
the app's lifespan runs every ``degraded_alert_interval_s``; the API and CLI read and
change the result. Webhook delivery itself is in test_alert_webhook.py.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from fleet.alerts import Evaluation, RuleKind, defaults_of, evaluate, tuf_expiries
from fleet.alerts.params import GroupDegradedParams
from fleet.config import FleetSettings
from fleet.link import store
from fleet.link.ingest import Accepted, parse
from fleet.tables import (
    Alert,
    AlertDelivery,
    AuditEntry,
    Device,
    GateCheckRow,
    Rollout,
)
from models.policy import FailureKind, PolicyRef
from models.wire import (
    BreakerState,
    DegradedModel,
    Event,
    EventKind,
    ReportedState,
    TelemetryBatch,
    TelemetrySample,
    WireModel,
    encode,
)
from tests.fakes.fleet_link import FakeLink
from tests.fleet.cli_support import enroll as cli_enroll
from tests.fleet.cli_support import ok
from tests.fleet.helpers import Clock, create_group, enroll

DEFAULTS = {
    **defaults_of(FleetSettings()),
    RuleKind.GROUP_DEGRADED: GroupDegradedParams(share=0.2, min_devices=2, seen_within_s=300.0),
}
POLICY = PolicyRef(name="lab-default", version=3, digest="ab" * 32)
ALICE = {"X-Edgefleet-Actor": "alice"}


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


def send(engine: sa.Engine, clock: Clock, device_id: str, channel: str, message: WireModel) -> None:
    """A live message through the link's parser and batch writer, as MQTT delivers it."""
    topic = f"edgefleet/v1/devices/{device_id}/{channel}"
    item = parse(topic, encode(message), received_at=clock.now)
    assert isinstance(item, Accepted), item
    result = store.write_batch(engine, [item], clock.now)
    assert result.failed == []


def ingest(engine: sa.Engine, clock: Clock, device_id: str, degraded: list[DegradedModel]) -> None:
    """A live reported state (the device is online, seen now)."""
    state = ReportedState(
        device_id=device_id,
        converged=True,
        agent_version="0.3.0",
        policy=POLICY,
        degraded=degraded,
        reported_at=clock.now,
    )
    send(engine, clock, device_id, "reported", state)


def event(clock: Clock, device_id: str, kind: EventKind, **data: Any) -> Event:
    return Event(device_id=device_id, id=uuid.uuid4().hex, ts=clock.now, kind=kind, data=data)


def fleet(api: TestClient, clock: Clock, count: int, group: str = "lab") -> list[str]:
    create_group(api, group)
    secret = api.post("/api/v1/tokens", json={"group": group, "uses": count}).json()["secret"]
    return [enroll(api, clock, token=secret)["device_id"] for _ in range(count)]


def round_(
    engine: sa.Engine,
    clock: Clock,
    kinds: Collection[RuleKind] | None = (RuleKind.GROUP_DEGRADED,),
    **kw: Any,
) -> Evaluation:
    result = evaluate(engine, DEFAULTS, now=clock.now, kinds=kinds, **kw)
    assert result is not None
    return result


def open_alerts(api: TestClient, **params: str) -> list[dict[str, Any]]:
    response = api.get("/api/v1/alerts", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def alert_entries(api: TestClient, subject: str) -> list[dict[str, Any]]:
    """The subject's audit entries about alerts (``alert.*``), newest first."""
    entries = api.get("/api/v1/audit", params={"subject": subject}).json()
    return [e for e in entries if e["action"].startswith("alert.")]


def audit(api: TestClient, subject: str) -> list[tuple[str, str]]:
    """(action, actor) of the subject's audit entries about alerts, newest first."""
    return [(e["action"], e["actor"]) for e in alert_entries(api, subject)]


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


# --- group_degraded -------------------------------------------------------------------------

GROUP = "group_degraded"


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
    assert round_(engine, clock).raised == [(GROUP, "group:lab")]
    (alert,) = open_alerts(api)
    assert alert["kind"] == "group_degraded"
    assert alert["subject"] == "group:lab"
    assert alert["severity"] == "warning"
    assert (alert["state"], alert["event"]) == ("open", False)
    assert alert["message"] == (
        "3 of 10 devices in lab are degraded (30% >= 20%): gemma3-270m open on 3 (error)"
    )
    assert alert["data"]["device_ids"] == sorted(devices[:3])
    assert (alert["cleared_at"], alert["acknowledged_at"]) == (None, None)

    clock.advance(seconds=30)
    assert round_(engine, clock) == Evaluation()  # nothing changed: nothing written
    assert open_alerts(api)[0]["updated_at"] == alert["updated_at"]

    ingest(engine, clock, devices[3], [broken(clock, "minilm", FailureKind.OUT_OF_MEMORY)])
    assert round_(engine, clock).updated == [(GROUP, "group:lab")]
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
    assert round_(engine, clock).cleared == [(GROUP, "group:lab")]
    assert open_alerts(api) == []
    (cleared,) = open_alerts(api, state="all")
    assert (cleared["id"], cleared["state"]) == (alert["id"], "cleared")
    assert datetime.fromisoformat(cleared["cleared_at"]) == clock.now

    entries = alert_entries(api, "group:lab")
    assert audit(api, "group:lab") == [
        ("alert.cleared", "controller"),
        ("alert.raised", "controller"),
    ]
    assert entries[1]["reason"] == alert["message"]
    assert entries[0]["reason"].startswith("0 of 10 devices in lab are degraded (0% < 20%)")

    for device in devices[:2]:  # degraded again: a new alert, the cleared one stays cleared
        ingest(engine, clock, device, [broken(clock)])
    assert round_(engine, clock).raised == [(GROUP, "group:lab")]
    assert [a["state"] for a in open_alerts(api, state="all")] == ["open", "cleared"]


def test_revoked_and_long_silent_devices_do_not_count(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    a, b, c = fleet(api, clock, 3)
    for device in (a, b):
        ingest(engine, clock, device, [broken(clock)])
    ingest(engine, clock, c, [])
    assert round_(engine, clock).raised == [(GROUP, "group:lab")]  # 2 of 3

    api.post(f"/api/v1/devices/{b}/revoke")
    assert round_(engine, clock).cleared == [(GROUP, "group:lab")]  # 1 of 2: under min_devices

    ingest(engine, clock, c, [broken(clock)])
    assert round_(engine, clock).raised == [(GROUP, "group:lab")]  # a and c: 2 of 2
    with Session(engine) as session:  # a went offline a moment ago (a restart): it counts
        session.exec(sa.update(Device).where(col(Device.id) == a).values(online=False))
        session.commit()
    clock.advance(seconds=200)
    assert round_(engine, clock) == Evaluation()
    clock.advance(seconds=200)  # a has been silent for 400 s: its report may be stale
    assert round_(engine, clock).cleared == [(GROUP, "group:lab")]


def test_an_admins_thresholds_win_over_the_settings(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    devices = fleet(api, clock, 4)
    for device in devices:
        ingest(engine, clock, device, [])
    ingest(engine, clock, devices[0], [broken(clock)])
    assert round_(engine, clock) == Evaluation()  # 1 of 4: under min_devices (2)
    response = api.put(
        "/api/v1/alerts/rules/group_degraded", json={"params": {"min_devices": 1}}, headers=ALICE
    )
    assert response.status_code == 200, response.text
    assert response.json()["params"] == {"share": 0.2, "min_devices": 1, "seen_within_s": 300.0}
    assert round_(engine, clock).raised == [(GROUP, "group:lab")]
    (alert,) = open_alerts(api)
    assert alert["data"]["min_devices"] == 1


# --- device_offline -------------------------------------------------------------------------


def test_a_device_offline_too_long_raises_and_clears_when_it_is_back(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    gone, here = fleet(api, clock, 2)
    for device in (gone, here):
        ingest(engine, clock, device, [])
    send(engine, clock, gone, "events", event(clock, gone, EventKind.OFFLINE))  # its last will
    kinds = [RuleKind.DEVICE_OFFLINE]
    clock.advance(minutes=15)
    assert round_(engine, clock, kinds) == Evaluation()  # not *more* than 15 min yet
    clock.advance(seconds=1)
    assert round_(engine, clock, kinds).raised == [("device_offline", f"device:{gone}")]
    (alert,) = open_alerts(api)
    assert (alert["kind"], alert["severity"], alert["event"]) == (
        "device_offline",
        "warning",
        False,
    )
    assert alert["message"] == (
        f"edge-1 ({gone}) in group lab has been offline since 2031-05-06 07:08 UTC "
        "(more than 15 min)"
    )
    clock.advance(minutes=30)
    assert round_(engine, clock, kinds) == Evaluation()  # the message does not tick

    ingest(engine, clock, gone, [])  # back
    assert round_(engine, clock, kinds).cleared == [("device_offline", f"device:{gone}")]
    entries = alert_entries(api, f"device:{gone}")
    assert (entries[0]["action"], entries[0]["reason"]) == (
        "alert.cleared",
        f"edge-1 ({gone}) is online again",
    )

    send(engine, clock, gone, "events", event(clock, gone, EventKind.OFFLINE))
    clock.advance(minutes=20)
    assert round_(engine, clock, kinds).raised == [("device_offline", f"device:{gone}")]
    api.post(f"/api/v1/devices/{gone}/revoke")  # a revoked device is gone on purpose
    assert round_(engine, clock, kinds).cleared == [("device_offline", f"device:{gone}")]


# --- spool_dropped --------------------------------------------------------------------------


def test_a_spool_dropping_samples_raises_until_the_drops_stop(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    (device,) = fleet(api, clock, 1)
    kinds = [RuleKind.SPOOL_DROPPED]
    sample = TelemetrySample(
        id=uuid.uuid4().hex, seq=7, ts=clock.now, window_s=5, requests=1, errors=0, rejections=0
    )
    batch = TelemetryBatch(device_id=device, id=uuid.uuid4().hex, samples=[sample], dropped=120)
    send(engine, clock, device, "telemetry", batch)  # the agent's counts, as it sends them
    drops = event(clock, device, EventKind.SPOOL_DROPPED, samples=120, events=3)
    assert round_(engine, clock, kinds) == Evaluation()  # the event comes once acknowledged
    send(engine, clock, device, "events", drops)
    assert round_(engine, clock, kinds).raised == [("spool_dropped", f"device:{device}")]
    (alert,) = open_alerts(api)
    assert alert["message"] == (
        f"edge-1 ({device})'s telemetry spool dropped 120 samples and 3 events in the last 1 h "
        "(the latest reported at 2031-05-06 07:08 UTC); 120 samples since it enrolled"
    )
    send(engine, clock, device, "events", drops)  # a duplicate is stored once: no change
    assert round_(engine, clock, kinds) == Evaluation()

    response = api.post(f"/api/v1/alerts/{alert['id']}/acknowledge", headers=ALICE)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "open"  # a condition: open while the drops go on

    clock.advance(minutes=59)
    assert round_(engine, clock, kinds) == Evaluation()
    clock.advance(minutes=2)  # no drop reported for an hour
    assert round_(engine, clock, kinds).cleared == [("spool_dropped", f"device:{device}")]
    (cleared,) = open_alerts(api, state="all")
    assert (cleared["acknowledged_by"], cleared["state"]) == ("admin:alice", "cleared")


# --- rollout_failed -------------------------------------------------------------------------


def rollout(engine: sa.Engine, clock: Clock, *, status: str = "active") -> str:
    """A rollout row as the engine writes one (the engine itself is tested elsewhere)."""
    rollout_id = uuid.uuid4().hex[:12]
    with Session(engine) as session:
        session.add(
            Rollout(
                id=rollout_id,
                name="gemma 2.0",
                change_key="model:gemma3",
                spec={},
                status=status,
                phase="soaking",
                stage_started_at=clock.now,
                created_by="admin:bob",
                created_at=clock.now,
                updated_at=clock.now,
            )
        )
        session.commit()
    return rollout_id


def fail_gate(engine: sa.Engine, clock: Clock, rollout_id: str, decision: str = "fail") -> None:
    with Session(engine) as session:
        session.add(
            GateCheckRow(
                rollout_id=rollout_id,
                stage=1,
                gate=0,
                at=clock.now,
                verdict="fail",
                decision=decision,
                reasons=["error rate 0.2 > 0.05"],
            )
        )
        session.commit()


def abort(engine: sa.Engine, clock: Clock, rollout_id: str, actor: str, reason: str) -> None:
    with Session(engine) as session:
        session.exec(
            sa.update(Rollout)
            .where(col(Rollout.id) == rollout_id)
            .values(status="aborted", reason=reason, finished_at=clock.now)
        )
        session.add(
            AuditEntry(
                at=clock.now,
                actor=actor,
                action="rollout.aborted",
                subject=f"rollout:{rollout_id}",
                reason=reason,
            )
        )
        session.commit()


def test_a_failing_rollout_raises_an_event_that_only_an_acknowledgement_clears(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    kinds = [RuleKind.ROLLOUT_FAILED]
    rid = rollout(engine, clock)
    quiet = rollout(engine, clock)
    fail_gate(engine, clock, rid)
    assert round_(engine, clock, kinds).raised == [("rollout_failed", f"rollout:{rid}")]
    (alert,) = open_alerts(api)
    assert (alert["severity"], alert["event"]) == ("error", True)
    assert alert["message"] == (
        f"rollout 'gemma 2.0' ({rid}, model:gemma3): 1 failed gate check(s) in the last 24 h; "
        "the latest, stage 1, gate 0: error rate 0.2 > 0.05"
    )
    clock.advance(minutes=1)
    abort(engine, clock, rid, "admin:carol", "the canary misbehaves")
    assert round_(engine, clock, kinds).updated == [("rollout_failed", f"rollout:{rid}")]
    (alert,) = open_alerts(api)
    assert alert["message"] == (
        f"rollout 'gemma 2.0' ({rid}, model:gemma3) aborted by admin:carol: the canary misbehaves"
    )
    clock.advance(days=3)
    assert round_(engine, clock, kinds) == Evaluation()  # events stay open, however old

    acked = api.post(f"/api/v1/alerts/{alert['id']}/acknowledge", headers=ALICE)
    assert acked.status_code == 200, acked.text
    body = acked.json()
    assert (body["state"], body["acknowledged_by"]) == ("cleared", "admin:alice")
    assert datetime.fromisoformat(body["acknowledged_at"]) == clock.now
    assert audit(api, f"rollout:{rid}")[0] == ("alert.acknowledged", "admin:alice")

    assert round_(engine, clock, kinds) == Evaluation()
    fail_gate(engine, clock, quiet, decision="wait")  # waiting for data is no failure
    assert round_(engine, clock, kinds) == Evaluation()
    fail_gate(engine, clock, quiet, decision="abort")
    assert round_(engine, clock, kinds).raised == [("rollout_failed", f"rollout:{quiet}")]


def test_an_acknowledged_rollout_raises_again_only_for_newer_failures(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    kinds = [RuleKind.ROLLOUT_FAILED]
    rid = rollout(engine, clock)
    fail_gate(engine, clock, rid)
    round_(engine, clock, kinds)
    (alert,) = open_alerts(api)
    clock.advance(seconds=30)
    assert api.post(f"/api/v1/alerts/{alert['id']}/acknowledge").status_code == 200
    assert round_(engine, clock, kinds) == Evaluation()
    clock.advance(seconds=30)
    fail_gate(engine, clock, rid)
    assert round_(engine, clock, kinds).raised == [("rollout_failed", f"rollout:{rid}")]
    (again,) = open_alerts(api)
    assert again["id"] != alert["id"]
    assert again["data"]["gate_failures"] == 2


# --- tuf_expiry -----------------------------------------------------------------------------


def test_tuf_metadata_near_expiry_raises_from_the_repositorys_own_expiries(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    kinds = [RuleKind.TUF_EXPIRY]
    expiries = tuf_expiries(api.app.state.fleet.tuf)  # type: ignore[attr-defined]
    assert expiries is not None
    assert set(expiries) == {"root", "targets", "snapshot", "timestamp"}
    assert round_(engine, clock, kinds, expiries=expiries) == Evaluation()  # freshly signed
    assert round_(engine, clock, kinds) == Evaluation()  # no expiries at hand: skipped

    clock.now = expiries["timestamp"] - timedelta(hours=5)
    assert round_(engine, clock, kinds, expiries=expiries).raised == [
        ("tuf_expiry", "tuf:timestamp")
    ]
    (alert,) = open_alerts(api)
    assert (alert["severity"], alert["data"]["expired"]) == ("error", False)
    assert round_(engine, clock, kinds) == Evaluation()  # unknown now: left open
    renewed = {**expiries, "timestamp": clock.now + timedelta(days=1)}
    assert round_(engine, clock, kinds, expiries=renewed).cleared == [
        ("tuf_expiry", "tuf:timestamp")
    ]


# --- rules ----------------------------------------------------------------------------------


def test_the_rules_list_every_kind_with_defaults_and_an_admins_changes(api: TestClient) -> None:
    response = api.get("/api/v1/alerts/rules")
    assert response.status_code == 200, response.text
    rules = {r["kind"]: r for r in response.json()["items"]}
    assert list(rules) == [
        "device_offline",
        "group_degraded",
        "rollout_failed",
        "tuf_expiry",
        "spool_dropped",
    ]
    assert rules["device_offline"] == {
        "kind": "device_offline",
        "enabled": True,
        "event": False,
        "params": {"minutes": 15.0},
        "overrides": {},
        "defaults": {"minutes": 15.0},
        "updated_by": None,
        "updated_at": None,
    }
    assert rules["rollout_failed"]["event"] is True
    assert rules["group_degraded"]["defaults"]["share"] == 0.2  # the settings' value

    changed = api.put(
        "/api/v1/alerts/rules/tuf_expiry",
        json={"enabled": True, "params": {"timestamp_days": 0.5}},
        headers=ALICE,
    ).json()
    assert changed["params"]["timestamp_days"] == 0.5
    assert changed["overrides"] == {"timestamp_days": 0.5}
    assert changed["updated_by"] == "admin:alice"
    again = api.get("/api/v1/alerts/rules").json()["items"][3]
    assert again == changed
    reset = api.put("/api/v1/alerts/rules/tuf_expiry", json={}).json()
    assert (reset["overrides"], reset["params"]["timestamp_days"]) == ({}, 0.25)
    entries = api.get("/api/v1/audit", params={"subject": "alert_rule:tuf_expiry"}).json()
    assert [(e["actor"], e["data"]["params"]) for e in entries] == [
        ("admin", {}),
        ("admin:alice", {"timestamp_days": 0.5}),
    ]


def test_a_disabled_rule_raises_nothing_and_clears_its_alerts(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    (device,) = fleet(api, clock, 1)
    kinds = [RuleKind.DEVICE_OFFLINE]
    clock.advance(minutes=16)  # enrolled, never seen since
    assert round_(engine, clock, kinds).raised == [("device_offline", f"device:{device}")]
    off = api.put("/api/v1/alerts/rules/device_offline", json={"enabled": False})
    assert off.status_code == 200, off.text
    assert round_(engine, clock, kinds).cleared == [("device_offline", f"device:{device}")]
    entries = alert_entries(api, f"device:{device}")
    assert entries[0]["reason"] == "the device_offline rule was disabled"
    assert round_(engine, clock, kinds) == Evaluation()
    api.put("/api/v1/alerts/rules/device_offline", json={"params": {"minutes": 60}})
    assert round_(engine, clock, kinds) == Evaluation()  # enabled again, but 16 < 60 min


def test_bad_rule_changes_are_refused_naming_what_is_wrong(api: TestClient) -> None:
    unknown = api.put("/api/v1/alerts/rules/disk_full", json={"enabled": True})
    assert unknown.status_code == 404, unknown.text
    assert "no alert rule 'disk_full'" in unknown.json()["error"]["message"]

    cases = [
        ({"params": {"minutes": -1}}, "params.minutes"),
        ({"params": {"minutes": "soon"}}, "params.minutes"),
        ({"params": {"share": 0.5}}, "params.share"),  # another rule's parameter
        ({"enabled": "sometimes"}, "enabled"),
        ({"enabled": True, "colour": "red"}, "colour"),
    ]
    for body, field in cases:
        response = api.put("/api/v1/alerts/rules/device_offline", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]["field"] == field, (body, response.json())
    bad_share = api.put("/api/v1/alerts/rules/group_degraded", json={"params": {"share": 2}})
    assert bad_share.json()["error"]["message"].startswith("invalid params.share: ")
    assert api.get("/api/v1/alerts/rules").json()["items"][0]["overrides"] == {}  # none stored


# --- acknowledgements -----------------------------------------------------------------------


def test_acknowledging_a_condition_keeps_it_open_and_is_idempotent(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    for device in fleet(api, clock, 2):
        ingest(engine, clock, device, [broken(clock)])
    round_(engine, clock)
    (alert,) = open_alerts(api)
    path = f"/api/v1/alerts/{alert['id']}/acknowledge"
    first = api.post(path, headers=ALICE).json()
    assert (first["state"], first["acknowledged_by"]) == ("open", "admin:alice")
    clock.advance(seconds=5)
    second = api.post(path, headers={"X-Edgefleet-Actor": "bob"}).json()
    assert second == first  # acknowledged already: nothing changes
    assert audit(api, "group:lab") == [
        ("alert.acknowledged", "admin:alice"),
        ("alert.raised", "controller"),
    ]
    assert open_alerts(api)[0]["acknowledged_by"] == "admin:alice"

    missing = api.post("/api/v1/alerts/999999/acknowledge")
    assert missing.status_code == 404, missing.text
    assert api.post("/api/v1/alerts/nope/acknowledge").status_code == 422
    with Session(engine) as session:
        session.exec(sa.update(Alert).values(cleared_at=clock.now))
        session.commit()
    cleared = api.post(path)
    assert cleared.status_code == 409, cleared.text
    assert "cleared already" in cleared.json()["error"]["message"]


def test_the_alerts_route_checks_its_parameters(api: TestClient) -> None:
    assert api.get("/api/v1/alerts", params={"state": "closed"}).status_code == 422
    assert api.get("/api/v1/alerts", params={"limit": 0}).status_code == 422
    assert api.get("/api/v1/alerts", params={"kind": "disk_full"}).status_code == 422
    assert api.get("/api/v1/alerts", headers={"Authorization": "Bearer nope"}).status_code == 401
    headers = {"Authorization": "Bearer nope"}
    assert api.put("/api/v1/alerts/webhook", json={}, headers=headers).status_code == 401


def test_alerts_filter_by_kind(api: TestClient, clock: Clock, engine: sa.Engine) -> None:
    devices = fleet(api, clock, 3)
    for device in devices:
        ingest(engine, clock, device, [broken(clock)])
    send(engine, clock, devices[0], "events", event(clock, devices[0], EventKind.OFFLINE))
    clock.advance(minutes=20)
    round_(engine, clock, kinds=None)
    kinds = {a["kind"] for a in open_alerts(api)}
    assert kinds == {"device_offline", "group_degraded"}
    only = open_alerts(api, kind="device_offline")
    assert [a["subject"] for a in only] == [f"device:{devices[0]}"]


# --- the webhook's configuration and outbox -------------------------------------------------


def outbox(engine: sa.Engine) -> list[AlertDelivery]:
    with Session(engine) as session:
        return list(session.exec(select(AlertDelivery).order_by(col(AlertDelivery.id))).all())


def test_the_webhook_is_set_shown_without_its_secret_and_removed(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    assert api.get("/api/v1/alerts/webhook").status_code == 404
    assert api.delete("/api/v1/alerts/webhook").status_code == 404
    assert api.post("/api/v1/alerts/webhook/test").status_code == 404
    for body, field in [
        ({"url": "ftp://hooks.example.com/x"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "https://hooks.example.com/x", "secret": "short"}, "secret"),
        ({"url": "https://hooks.example.com/x", "token": "x" * 20}, "token"),
    ]:
        response = api.put("/api/v1/alerts/webhook", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]["field"] == field

    secret = "s3cret-s3cret-s3cret"
    body = {"url": "https://hooks.example.com/T0KEN/abc", "secret": secret}
    response = api.put("/api/v1/alerts/webhook", json=body, headers=ALICE)
    assert response.status_code == 200, response.text
    shown = api.get("/api/v1/alerts/webhook").json()
    assert shown == {
        "url": "https://hooks.example.com/T0KEN/abc",
        "secret_set": True,
        "updated_by": "admin:alice",
        "updated_at": shown["updated_at"],
        "pending": 0,
        "oldest_pending_at": None,
        "attempts": 0,
        "last_error": "",
    }
    assert secret not in response.text
    (entry,) = api.get("/api/v1/audit", params={"subject": "alert_webhook"}).json()
    assert entry["data"] == {"origin": "https://hooks.example.com", "signed": True}
    assert "T0KEN" not in json.dumps(entry)  # a URL's path may hold a token

    for device in fleet(api, clock, 2):
        ingest(engine, clock, device, [broken(clock)])
    round_(engine, clock)
    assert api.get("/api/v1/alerts/webhook").json()["pending"] == 1
    removed = api.delete("/api/v1/alerts/webhook")
    assert removed.json() == {"dropped": 1}
    assert outbox(engine) == []
    assert api.get("/api/v1/alerts/webhook").status_code == 404


def test_every_raise_clear_and_acknowledgement_is_owed_to_the_webhook(
    api: TestClient, clock: Clock, engine: sa.Engine
) -> None:
    devices = fleet(api, clock, 2)
    for device in devices:
        ingest(engine, clock, device, [broken(clock)])
    round_(engine, clock)  # no webhook yet: nothing is owed
    assert outbox(engine) == []
    (first,) = open_alerts(api)
    for device in devices:
        ingest(engine, clock, device, [])
    round_(engine, clock)

    api.put("/api/v1/alerts/webhook", json={"url": "http://127.0.0.1:9/hook"})
    for device in devices:
        ingest(engine, clock, device, [broken(clock)])
    round_(engine, clock)
    (alert,) = open_alerts(api)
    ingest(engine, clock, devices[0], [broken(clock, "minilm")])
    round_(engine, clock)  # an update: shown on the alert, not posted
    api.post(f"/api/v1/alerts/{alert['id']}/acknowledge", headers=ALICE)
    for device in devices:
        ingest(engine, clock, device, [])
    round_(engine, clock)

    owed = outbox(engine)
    assert [(d.alert_id, d.event) for d in owed] == [
        (alert["id"], "raised"),
        (alert["id"], "acknowledged"),
        (alert["id"], "cleared"),
    ]
    assert first["id"] != alert["id"]
    raised, acked, cleared = (d.payload for d in owed)
    assert raised == {
        "event": "raised",
        "id": alert["id"],
        "kind": "group_degraded",
        "subject": "group:lab",
        "severity": "warning",
        "state": "open",
        "message": alert["message"],
        "data": alert["data"],
        "raised_at": raised["raised_at"],
        "cleared_at": None,
        "acknowledged_at": None,
        "acknowledged_by": None,
    }
    assert datetime.fromisoformat(raised["raised_at"]) == datetime.fromisoformat(alert["raised_at"])
    assert (acked["state"], acked["acknowledged_by"]) == ("open", "admin:alice")
    assert "minilm" in acked["message"]
    assert (cleared["state"], cleared["acknowledged_by"]) == ("cleared", "admin:alice")
    assert cleared["cleared_at"] is not None


# --- replicas -------------------------------------------------------------------------------


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
                evaluate(engine, DEFAULTS, now=clock.now)
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
