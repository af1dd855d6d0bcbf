"""A re-flashed board enrolls as the device it was: POST /api/v1/enroll with a hardware id.

On SQLite and PostgreSQL. The board keeps its id, name, group, tags and history, takes
the new key and a new broker password, and spends a token use; revoked hardware stays
out; racing re-enrollments of one board make one device.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from fleet.link.passwords import verify_password
from fleet.tables import Device, EnrollmentToken, EventRow
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import Clock, DeviceKey, create_group, create_token, error

HW = "4c4c4544-0042-3510-8052-b4c04f4e4d32"  # a DMI product UUID


def post(api: TestClient, clock: Clock, key: DeviceKey, secret: str, **kw: Any) -> Any:
    return api.post("/api/v1/enroll", json=key.request(secret, clock.now, **kw))


def enrolled(api: TestClient, clock: Clock, key: DeviceKey, secret: str, **kw: Any) -> Any:
    response = post(api, clock, key, secret, **kw)
    assert response.status_code == 200, response.text
    return response.json()


def row(engine: Engine, device_id: str) -> Device:
    with Session(engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        return device


def uses_left(engine: Engine, token_id: str) -> int:
    with Session(engine) as session:
        token = session.get(EnrollmentToken, token_id)
        assert token is not None
        return token.uses_left


def device_count(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(Device)).one())


def first_boot(api: TestClient, clock: Clock, engine: Engine) -> tuple[str, dict[str, Any]]:
    """A device in group lab, renamed and tagged by an admin, with an event in its history."""
    create_group(api, "lab")
    first = enrolled(
        api, clock, DeviceKey(), create_token(api, group="lab")["secret"], hardware_id=HW
    )
    device_id = first["device_id"]
    patched = api.patch(f"/api/v1/devices/{device_id}", json={"name": "shelf-3", "tags": ["gpu"]})
    assert patched.status_code == 200, patched.text
    with Session(engine) as session:
        session.add(
            EventRow(
                device_id=device_id,
                event_id="e-1",
                ts=clock.now,
                kind="online",
                severity="info",
                stored_at=clock.now,
            )
        )
        session.commit()
    return device_id, first


def test_a_reflashed_board_stays_the_same_device(
    api: TestClient, clock: Clock, engine: Engine, link: FakeLink
) -> None:
    device_id, first = first_boot(api, clock, engine)
    clock.advance(minutes=10)
    token = create_token(api, group=None, uses=2)  # its group is not the device's: ignored
    new_key = DeviceKey()

    again = enrolled(api, clock, new_key, token["secret"], hardware_id=HW, name="ubuntu")

    assert again["device_id"] == device_id
    detail = api.get(f"/api/v1/devices/{device_id}").json()
    assert (detail["name"], detail["group"], detail["tags"]) == ("shelf-3", "lab", ["gpu"])
    assert (detail["public_key"], detail["hardware_id"]) == (new_key.public, HW)
    assert detail["token_id"] == token["id"]
    assert device_count(engine) == 1
    device = row(engine, device_id)
    assert verify_password(again["broker"]["password"], device.mqtt_password_hash)
    assert not verify_password(first["broker"]["password"], device.mqtt_password_hash)
    assert uses_left(engine, token["id"]) == 1  # the token is the operator's authority
    assert link.sync_auth_count == 2  # the broker forgets the old password before the answer

    until = (clock.now + timedelta(seconds=1)).isoformat()
    events = api.get(f"/api/v1/devices/{device_id}/events", params={"until": until}).json()
    events = events["items"]
    assert [e["kind"] for e in events] == ["reflashed", "online"]  # history kept, newest first
    assert events[0]["message"].startswith("re-enrolled after re-flash")
    assert events[0]["data"]["new_key"] == new_key.public
    (entry,) = api.get("/api/v1/audit", params={"subject": f"device:{device_id}"}).json()[:1]
    assert (entry["action"], entry["reason"]) == ("device.reflash", "re-enrolled after re-flash")
    assert entry["actor"] == f"token:{token['id']}"
    assert entry["data"]["hardware_id"] == HW
    assert entry["source"].endswith("(enrollment)")


def test_the_new_key_replays_and_the_old_one_would_be_another_reflash(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    device_id, _ = first_boot(api, clock, engine)
    token = create_token(api, uses=1)
    new_key = DeviceKey()
    enrolled(api, clock, new_key, token["secret"], hardware_id=HW)
    # the answer was lost: the retry is a replay, though the one-use token is spent now
    retry = enrolled(api, clock, new_key, token["secret"], hardware_id=HW)
    assert retry["device_id"] == device_id
    assert uses_left(engine, token["id"]) == 0
    assert row(engine, device_id).public_key == new_key.public


def test_a_reflash_needs_a_usable_token(api: TestClient, clock: Clock, engine: Engine) -> None:
    device_id, _ = first_boot(api, clock, engine)
    spent = create_token(api)
    enrolled(api, clock, DeviceKey(), spent["secret"])  # another device spends it
    before = row(engine, device_id)

    status, code, message = error(post(api, clock, DeviceKey(), spent["secret"], hardware_id=HW))

    assert (status, code) == (403, "enrollment_rejected")
    assert "used up" in message
    after = row(engine, device_id)
    assert (after.public_key, after.mqtt_password_hash) == (
        before.public_key,
        before.mqtt_password_hash,
    )


def test_revoked_hardware_stays_out(
    api: TestClient, clock: Clock, engine: Engine, link: FakeLink
) -> None:
    device_id, _ = first_boot(api, clock, engine)
    assert api.post(f"/api/v1/devices/{device_id}/revoke").status_code == 200
    token = create_token(api)
    synced = link.sync_auth_count

    status, code, message = error(post(api, clock, DeviceKey(), token["secret"], hardware_id=HW))

    assert (status, code) == (403, "enrollment_rejected")
    assert f"device {device_id} with this hardware was revoked" in message
    assert "revoked devices stay revoked" in message
    assert uses_left(engine, token["id"]) == 1
    assert device_count(engine) == 1
    assert row(engine, device_id).revoked_at is not None
    assert link.sync_auth_count == synced


def test_a_device_enrolled_without_a_hardware_id_adopts_one_on_replay(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    key = DeviceKey()
    token = create_token(api, uses=2)
    device_id = enrolled(api, clock, key, token["secret"])["device_id"]  # an older agent
    assert row(engine, device_id).hardware_id is None
    enrolled(api, clock, key, token["secret"], hardware_id=HW)  # the upgraded agent
    assert row(engine, device_id).hardware_id == HW
    assert uses_left(engine, token["id"]) == 1
    assert enrolled(api, clock, DeviceKey(), token["secret"], hardware_id=HW)["device_id"] == (
        device_id
    )


def test_a_cloned_disk_on_other_hardware_is_refused(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    device_id, _ = first_boot(api, clock, engine)
    key = DeviceKey()
    token = create_token(api, uses=3)
    enrolled(api, clock, key, token["secret"], hardware_id=HW)  # re-flashed with ``key``
    status, _, message = error(
        post(api, clock, key, token["secret"], hardware_id="another-board-0001")
    )
    assert status == 403
    assert f"this key belongs to device {device_id}, which runs on other hardware" in message
    assert device_count(engine) == 1


def test_without_a_hardware_id_a_new_key_is_a_new_device(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    device_id, _ = first_boot(api, clock, engine)
    other = enrolled(api, clock, DeviceKey(), create_token(api)["secret"])
    assert other["device_id"] != device_id
    assert row(engine, other["device_id"]).hardware_id is None
    assert device_count(engine) == 2


def test_two_boards_cannot_claim_one_hardware_id(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    token = create_token(api, uses=5)
    a = enrolled(api, clock, DeviceKey(), token["secret"], hardware_id=HW)
    b_key = DeviceKey()
    b = enrolled(api, clock, b_key, token["secret"])
    status, _, message = error(post(api, clock, b_key, token["secret"], hardware_id=HW))
    assert status == 403
    assert f"this key belongs to device {b['device_id']}" in message
    assert f"this hardware to device {a['device_id']}" in message
    assert row(engine, b["device_id"]).hardware_id is None


def race(api: TestClient, bodies: list[dict[str, Any]]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        responses = list(pool.map(lambda b: api.post("/api/v1/enroll", json=b), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return responses


def test_racing_retries_of_one_reflash_spend_one_use(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    device_id, _ = first_boot(api, clock, engine)
    token = create_token(api, uses=10)
    body = DeviceKey().request(token["secret"], clock.now, hardware_id=HW)
    responses = race(api, [body] * 8)
    assert {r.json()["device_id"] for r in responses} == {device_id}
    assert uses_left(engine, token["id"]) == 9  # one re-flash, the rest replays
    assert device_count(engine) == 1
    stored = row(engine, device_id).mqtt_password_hash
    passwords = [r.json()["broker"]["password"] for r in responses]
    assert sum(verify_password(p, stored) for p in passwords) == 1  # the last one written


def test_two_racing_reflashes_with_different_keys_leave_one_device(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    device_id, _ = first_boot(api, clock, engine)
    token = create_token(api, uses=10)
    keys = [DeviceKey(), DeviceKey()]
    responses = race(api, [k.request(token["secret"], clock.now, hardware_id=HW) for k in keys])
    assert {r.json()["device_id"] for r in responses} == {device_id}
    assert device_count(engine) == 1
    assert row(engine, device_id).public_key in {k.public for k in keys}
    assert uses_left(engine, token["id"]) == 8  # each took the device over once


def test_racing_first_enrollments_of_one_board_make_one_device(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    token = create_token(api, uses=10)
    body = DeviceKey().request(token["secret"], clock.now, hardware_id=HW)
    responses = race(api, [body] * 8)  # one request, retried
    assert len({r.json()["device_id"] for r in responses}) == 1
    assert uses_left(engine, token["id"]) == 9
    two = race(api, [DeviceKey().request(token["secret"], clock.now, hardware_id="board-0002")
                     for _ in range(2)])  # fmt: skip
    assert len({r.json()["device_id"] for r in two}) == 1
    assert device_count(engine) == 2


def test_a_reflash_with_an_expired_token_is_refused(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    device_id, _ = first_boot(api, clock, engine)
    token = create_token(api, expires_in_s=60)
    clock.advance(seconds=61)
    status, _, message = error(post(api, clock, DeviceKey(), token["secret"], hardware_id=HW))
    assert status == 403
    assert "expired" in message
    assert row(engine, device_id).token_id != token["id"]
