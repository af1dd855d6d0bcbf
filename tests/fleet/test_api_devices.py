"""Devices: listing and filters, detail with drift, updates, revocation, commands."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from fleet.tables import Device
from models.wire import CommandKind, ModelState, ReportedModel, ReportedState
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import Clock, DeviceKey, create_group, enroll, error


def _set(engine: Engine, device_id: str, **values: Any) -> None:
    """Write what the MQTT ingest would (online flag, last_seen, reported state)."""
    with Session(engine) as session:
        session.exec(update(Device).where(col(Device.id) == device_id).values(**values))
        session.commit()


def _fleet(api: TestClient, clock: Clock) -> dict[str, str]:
    """Four devices: two in lab (one online), one in field, one revoked in field."""
    create_group(api, "lab")
    create_group(api, "field")
    ids = {}
    for name, group in [("alpha", "lab"), ("beta", "lab"), ("gamma", "field"), ("delta", "field")]:
        ids[name] = enroll(api, clock, group=group, key=DeviceKey())["device_id"]
        api.patch(f"/api/v1/devices/{ids[name]}", json={"name": name})
        clock.advance(seconds=1)
    return ids


def _ids(page: dict[str, Any]) -> list[str]:
    return [d["name"] for d in page["items"]]


def test_list_filters_by_group_tag_status_and_name(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    ids = _fleet(api, clock)
    _set(engine, ids["alpha"], online=True, last_seen=clock.now)
    api.patch(f"/api/v1/devices/{ids['beta']}", json={"tags": ["gpu", "rack-2"]})
    api.patch(f"/api/v1/devices/{ids['gamma']}", json={"tags": ["gpu"]})
    api.post(f"/api/v1/devices/{ids['delta']}/revoke")

    def names(**params: Any) -> list[str]:
        response = api.get("/api/v1/devices", params=params)
        assert response.status_code == 200, response.text
        return _ids(response.json())

    assert names() == ["alpha", "beta", "gamma", "delta"]  # by enrollment time
    assert names(group="lab") == ["alpha", "beta"]
    assert names(tag="gpu") == ["beta", "gamma"]
    assert names(tag="gpu", group="field") == ["gamma"]
    assert names(status="online") == ["alpha"]
    assert names(status="offline") == ["beta", "gamma"]
    assert names(status="revoked") == ["delta"]
    assert names(q="ALP") == ["alpha"]
    assert names(q=ids["gamma"][-6:]) == ["gamma"]  # part of the id
    assert names(q="%") == []  # LIKE wildcards are escaped


def test_list_pages_with_total(api: TestClient, clock: Clock) -> None:
    _fleet(api, clock)
    page = api.get("/api/v1/devices", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 4
    assert page["limit"] == 2
    assert page["offset"] == 1
    assert _ids(page) == ["beta", "gamma"]
    filtered = api.get("/api/v1/devices", params={"group": "lab", "limit": 1}).json()
    assert filtered["total"] == 2
    assert len(filtered["items"]) == 1


def test_list_rejects_bad_filters(api: TestClient) -> None:
    assert error(api.get("/api/v1/devices", params={"status": "sleeping"}))[:2] == (
        422,
        "invalid_input",
    )
    assert error(api.get("/api/v1/devices", params={"limit": 0}))[0] == 422


def test_list_item_shape(api: TestClient, clock: Clock, engine: Engine) -> None:
    device_id = enroll(api, clock)["device_id"]
    _set(engine, device_id, online=True, last_seen=clock.now)
    (item,) = api.get("/api/v1/devices").json()["items"]
    assert item["id"] == device_id
    assert item["status"] == "online"
    assert item["online"] is True
    assert item["last_seen"].startswith("2031-05-06T07:08:09")
    assert item["enrolled_at"].endswith(("+00:00", "Z"))
    assert item["desired_version"] == 0
    assert item["applied_version"] is None
    assert item["in_sync"] is True  # nothing desired yet: nothing to drift from


def test_detail_shows_drift_between_desired_and_reported(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    device_id = enroll(api, clock)["device_id"]
    api.put(
        f"/api/v1/devices/{device_id}/desired",
        json={"models": [{"name": "gemma3-270m", "version": "2"}, {"name": "minilm"}]},
    )
    reported = ReportedState(
        device_id=device_id,
        desired_version=1,
        converged=False,
        agent_version="0.2.0",
        models=[
            ReportedModel(name="gemma3-270m", version="1", state=ModelState.READY),
            ReportedModel(name="minilm", version="1", state=ModelState.FAILED, error="oom"),
            ReportedModel(name="old", version="1", state=ModelState.READY),
        ],
    )
    _set(engine, device_id, reported=reported.model_dump(mode="json"), reported_at=clock.now)

    detail = api.get(f"/api/v1/devices/{device_id}").json()

    assert detail["desired"]["version"] == 1
    assert detail["applied_version"] == 1
    drift = detail["drift"]
    assert drift["managed"] is True
    assert drift["in_sync"] is False
    kinds = {(i["kind"], i["model"]) for i in drift["items"]}
    assert kinds == {
        ("version_mismatch", "gemma3-270m"),
        ("failed", "minilm"),
        ("extra", "old"),
    }
    assert detail["in_sync"] is False
    assert detail["public_key"]
    assert detail["device_report"]["arch"] == "aarch64"
    assert detail["reported_at"].startswith("2031-05-06")


def test_detail_of_unknown_device_is_404(api: TestClient) -> None:
    assert error(api.get("/api/v1/devices/dev-0000000000000000"))[:2] == (404, "not_found")


def test_patch_renames_regroups_and_retags(api: TestClient, clock: Clock) -> None:
    create_group(api, "lab")
    device_id = enroll(api, clock, group="lab")["device_id"]
    create_group(api, "field")
    response = api.patch(
        f"/api/v1/devices/{device_id}",
        json={"name": "kiosk 7", "group": "field", "tags": ["b", "a", "b"]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["name"], body["group"], body["tags"]) == ("kiosk 7", "field", ["a", "b"])

    untouched = api.patch(f"/api/v1/devices/{device_id}", json={"tags": ["c"]}).json()
    assert (untouched["name"], untouched["group"], untouched["tags"]) == ("kiosk 7", "field", ["c"])

    ungrouped = api.patch(f"/api/v1/devices/{device_id}", json={"group": None}).json()
    assert ungrouped["group"] is None
    assert ungrouped["tags"] == ["c"]


def test_patch_rejects_unknown_group_bad_tags_and_unknown_fields(
    api: TestClient, clock: Clock
) -> None:
    device_id = enroll(api, clock)["device_id"]
    url = f"/api/v1/devices/{device_id}"
    status, _, message = error(api.patch(url, json={"group": "nope"}))
    assert status == 422
    assert "no group" in message
    assert error(api.patch(url, json={"tags": ["has space"]}))[0] == 422
    assert error(api.patch(url, json={"colour": "red"}))[0] == 422


def test_revoke_cuts_the_device_off(
    api: TestClient, clock: Clock, link: FakeLink, engine: Engine
) -> None:
    device_id = enroll(api, clock)["device_id"]
    _set(engine, device_id, online=True)
    syncs = link.sync_auth_count
    clock.advance(hours=1)

    response = api.post(f"/api/v1/devices/{device_id}/revoke")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "revoked"
    assert body["online"] is False
    assert body["revoked_at"].startswith("2031-05-06T08:08:09")
    assert link.sync_auth_count == syncs + 1
    assert link.cleared == [device_id]
    names = [name for name, _ in link.calls]
    assert names.index("sync_auth", 1) < names.index("clear_desired")
    with Session(engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        assert device.revoked_at is not None
        assert not device.online


def test_revoke_is_idempotent_and_keeps_the_first_time(
    api: TestClient, clock: Clock, link: FakeLink
) -> None:
    device_id = enroll(api, clock)["device_id"]
    first = api.post(f"/api/v1/devices/{device_id}/revoke").json()
    clock.advance(days=1)
    second = api.post(f"/api/v1/devices/{device_id}/revoke").json()
    assert second["revoked_at"] == first["revoked_at"]
    assert link.cleared == [device_id, device_id]


def test_revoke_succeeds_while_the_broker_is_down_for_retained_cleanup(
    api: TestClient, clock: Clock, link: FakeLink
) -> None:
    device_id = enroll(api, clock)["device_id"]
    link.broker_down = True
    response = api.post(f"/api/v1/devices/{device_id}/revoke")
    assert response.status_code == 200
    assert response.json()["status"] == "revoked"


def test_revoke_fails_visibly_when_the_broker_cannot_reload(
    api: TestClient, clock: Clock, link: FakeLink
) -> None:
    device_id = enroll(api, clock)["device_id"]
    link.sync_auth_fails = True
    assert error(api.post(f"/api/v1/devices/{device_id}/revoke"))[:2] == (
        503,
        "broker_unavailable",
    )
    link.sync_auth_fails = False
    assert api.post(f"/api/v1/devices/{device_id}/revoke").status_code == 200


def test_revoke_unknown_device_is_404(api: TestClient, link: FakeLink) -> None:
    assert error(api.post("/api/v1/devices/dev-0000000000000000/revoke"))[0] == 404
    assert link.sync_auth_count == 0


def test_commands_reach_the_link(api: TestClient, clock: Clock, link: FakeLink) -> None:
    device_id = enroll(api, clock)["device_id"]
    response = api.post(f"/api/v1/devices/{device_id}/commands", json={"kind": "reconcile"})
    assert response.status_code == 202, response.text
    (command,) = link.commands
    assert command.device_id == device_id
    assert command.kind is CommandKind.RECONCILE
    assert response.json() == {"id": command.id, "device_id": device_id, "kind": "reconcile"}


def test_commands_are_refused_for_unknown_revoked_or_bad_kinds(
    api: TestClient, clock: Clock, link: FakeLink
) -> None:
    device_id = enroll(api, clock)["device_id"]
    url = f"/api/v1/devices/{device_id}/commands"
    assert error(api.post(url, json={"kind": "reboot"}))[0] == 422
    assert (
        error(api.post("/api/v1/devices/dev-0000000000000000/commands", json={"kind": "report"}))[0]
        == 404
    )
    link.broker_down = True
    assert error(api.post(url, json={"kind": "report"}))[:2] == (503, "broker_unavailable")
    link.broker_down = False
    api.post(f"/api/v1/devices/{device_id}/revoke")
    assert error(api.post(url, json={"kind": "report"}))[:2] == (409, "conflict")
    assert link.commands == []
