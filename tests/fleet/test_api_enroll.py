"""POST /api/v1/enroll: every way in, and every way to be turned away, on SQLite and PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet.config import FleetSettings
from fleet.link.passwords import verify_password
from fleet.tables import Device, EnrollmentToken
from models.topics import validate_device_id
from models.wire import EnrollmentResponse
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import Clock, DeviceKey, create_group, create_token, enroll, error


def _device(engine: Engine, device_id: str) -> Device:
    with Session(engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        return device


def _uses_left(engine: Engine, token_id: str) -> int:
    with Session(engine) as session:
        token = session.get(EnrollmentToken, token_id)
        assert token is not None
        return token.uses_left


def test_enrollment_creates_a_device_with_broker_credentials(
    api: TestClient, link: FakeLink, clock: Clock, engine: Engine
) -> None:
    create_group(api, "lab")
    token = create_token(api, group="lab", note="bench")
    key = DeviceKey()

    response = api.post("/api/v1/enroll", json=key.request(token["secret"], clock.now))

    assert response.status_code == 200, response.text
    body = EnrollmentResponse.model_validate(response.json())
    assert body.device_id.startswith("dev-")
    assert len(body.device_id) == 20
    validate_device_id(body.device_id)
    assert body.broker.url == "mqtts://broker.example.com:8883"
    assert body.broker.username == body.device_id == body.broker.client_id
    assert body.broker.ca_pem is None
    assert body.telemetry_interval_s == 5.0
    assert body.heartbeat_interval_s == 20.0
    assert link.sync_auth_count == 1

    device = _device(engine, body.device_id)
    assert device.group == "lab"
    assert device.token_id == token["id"]
    assert device.public_key == key.public
    assert device.name == "edge-1"
    assert device.device_report["jetson_model"].startswith("NVIDIA Jetson")
    assert device.mqtt_password_hash != body.broker.password  # only the hash is stored
    assert verify_password(body.broker.password, device.mqtt_password_hash)
    assert _uses_left(engine, token["id"]) == 0


def test_enrollment_needs_no_admin_token(
    settings: FleetSettings, api: TestClient, clock: Clock
) -> None:
    secret = create_token(api)["secret"]
    response = api.post(
        "/api/v1/enroll",
        json=DeviceKey().request(secret, clock.now),
        headers={"Authorization": ""},
    )
    assert response.status_code == 200, response.text


def test_replay_returns_the_same_device_with_a_new_password_and_spends_no_use(
    api: TestClient, link: FakeLink, clock: Clock, engine: Engine
) -> None:
    token = create_token(api, uses=2)
    key = DeviceKey()
    first = enroll(api, clock, token=token["secret"], key=key)
    clock.advance(seconds=30)
    second = enroll(api, clock, token=token["secret"], key=key)

    assert second["device_id"] == first["device_id"]
    assert second["broker"]["password"] != first["broker"]["password"]
    device = _device(engine, first["device_id"])
    assert verify_password(second["broker"]["password"], device.mqtt_password_hash)
    assert not verify_password(first["broker"]["password"], device.mqtt_password_hash)
    assert _uses_left(engine, token["id"]) == 1
    assert link.sync_auth_count == 2
    assert api.get("/api/v1/devices").json()["total"] == 1


def test_replay_works_after_the_one_time_token_is_used_up(api: TestClient, clock: Clock) -> None:
    token = create_token(api, uses=1)
    key = DeviceKey()
    first = enroll(api, clock, token=token["secret"], key=key)
    again = enroll(api, clock, token=token["secret"], key=key)
    assert again["device_id"] == first["device_id"]


def test_used_up_token_is_rejected(api: TestClient, clock: Clock, link: FakeLink) -> None:
    secret = create_token(api, uses=1)["secret"]
    enroll(api, clock, token=secret)
    response = api.post("/api/v1/enroll", json=DeviceKey().request(secret, clock.now))
    status, code, message = error(response)
    assert (status, code) == (403, "enrollment_rejected")
    assert "used up" in message
    assert link.sync_auth_count == 1  # only the first enrollment synced


def test_multi_use_token_counts_down(api: TestClient, clock: Clock, engine: Engine) -> None:
    token = create_token(api, uses=3)
    ids = {enroll(api, clock, token=token["secret"])["device_id"] for _ in range(3)}
    assert len(ids) == 3
    assert _uses_left(engine, token["id"]) == 0
    response = api.post("/api/v1/enroll", json=DeviceKey().request(token["secret"], clock.now))
    assert error(response)[:2] == (403, "enrollment_rejected")


def test_expired_token_is_rejected(api: TestClient, clock: Clock) -> None:
    secret = create_token(api, expires_in_s=60)["secret"]
    clock.advance(seconds=61)
    status, _, message = error(
        api.post("/api/v1/enroll", json=DeviceKey().request(secret, clock.now))
    )
    assert status == 403
    assert "expired" in message


def test_token_that_never_expires_still_works_much_later(api: TestClient, clock: Clock) -> None:
    secret = create_token(api, expires_in_s=None)["secret"]
    clock.advance(days=400)
    enroll(api, clock, token=secret)


def test_unknown_token_is_rejected(api: TestClient, clock: Clock, link: FakeLink) -> None:
    status, _, message = error(
        api.post("/api/v1/enroll", json=DeviceKey().request("eft_not-a-real-token", clock.now))
    )
    assert status == 403
    assert "unknown enrollment token" in message
    assert link.sync_auth_count == 0


def test_revoked_token_is_rejected(api: TestClient, clock: Clock) -> None:
    token = create_token(api, uses=5)
    assert api.delete(f"/api/v1/tokens/{token['id']}").status_code == 200
    status, _, message = error(
        api.post("/api/v1/enroll", json=DeviceKey().request(token["secret"], clock.now))
    )
    assert status == 403
    assert "revoked" in message


def test_bad_signature_is_rejected(api: TestClient, clock: Clock) -> None:
    secret = create_token(api)["secret"]
    forged = DeviceKey().request(secret, clock.now, sign_token="eft_some-other-token")
    status, _, message = error(api.post("/api/v1/enroll", json=forged))
    assert status == 403
    assert "signature does not match" in message


def test_signature_by_another_key_is_rejected(api: TestClient, clock: Clock) -> None:
    secret = create_token(api)["secret"]
    body = DeviceKey().request(secret, clock.now)
    body["public_key"] = DeviceKey().public  # claim a key we cannot sign for
    status, _, message = error(api.post("/api/v1/enroll", json=body))
    assert status == 403
    assert "signature" in message


@pytest.mark.parametrize("skew", [timedelta(minutes=-6), timedelta(minutes=6)])
def test_stale_or_future_timestamp_is_rejected(
    api: TestClient, clock: Clock, engine: Engine, skew: timedelta
) -> None:
    token = create_token(api)
    body = DeviceKey().request(token["secret"], clock.now + skew)
    status, _, message = error(api.post("/api/v1/enroll", json=body))
    assert status == 403
    assert "timestamp" in message
    assert "clock" in message
    assert _uses_left(engine, token["id"]) == 1


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.pop("signature"),
        lambda b: b.update(timestamp="yesterday"),
        lambda b: b.update(public_key="short"),
        lambda b: b.update(device={"hostname": "x"}),
        lambda b: b.update(timestamp="2031-05-06T07:08:09"),  # naive: no timezone
    ],
    ids=["no-signature", "bad-timestamp", "short-key", "bad-device", "naive-timestamp"],
)
def test_malformed_body_is_422(api: TestClient, clock: Clock, mutate: object) -> None:
    body = DeviceKey().request(create_token(api)["secret"], clock.now)
    mutate(body)  # type: ignore[operator]
    status, code, _ = error(api.post("/api/v1/enroll", json=body))
    assert (status, code) == (422, "invalid_input")


def test_non_json_body_is_422(api: TestClient) -> None:
    response = api.post(
        "/api/v1/enroll", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    status, code, message = error(response)
    assert (status, code) == (422, "invalid_input")
    assert "JSON" in message


def test_revoked_device_cannot_enroll_its_key_again(api: TestClient, clock: Clock) -> None:
    key = DeviceKey()
    device_id = enroll(api, clock, key=key)["device_id"]
    assert api.post(f"/api/v1/devices/{device_id}/revoke").status_code == 200
    fresh = create_token(api)["secret"]
    status, _, message = error(api.post("/api/v1/enroll", json=key.request(fresh, clock.now)))
    assert status == 403
    assert "revoked" in message
    assert device_id in message


def test_replay_with_another_token_needs_that_token_valid(api: TestClient, clock: Clock) -> None:
    key = DeviceKey()
    device_id = enroll(api, clock, key=key)["device_id"]
    other = create_token(api)
    api.delete(f"/api/v1/tokens/{other['id']}")
    status, _, message = error(
        api.post("/api/v1/enroll", json=key.request(other["secret"], clock.now))
    )
    assert status == 403
    assert "revoked" in message
    valid = create_token(api)["secret"]
    assert enroll(api, clock, token=valid, key=key)["device_id"] == device_id


def test_sync_auth_runs_before_the_response(
    api: TestClient, clock: Clock, link: FakeLink, engine: Engine
) -> None:
    link.sync_auth_fails = True
    token = create_token(api)
    key = DeviceKey()
    response = api.post("/api/v1/enroll", json=key.request(token["secret"], clock.now))
    status, code, _ = error(response)
    assert (status, code) == (503, "broker_unavailable")
    # The device exists and the use is spent; the agent's retry is a replay that works.
    link.sync_auth_fails = False
    retry = enroll(api, clock, token=token["secret"], key=key)
    assert _device(engine, retry["device_id"]).public_key == key.public
    assert api.get("/api/v1/devices").json()["total"] == 1


def test_ca_pem_is_handed_to_devices(
    tmp_path: Path, database_url: str, link: FakeLink, clock: Clock
) -> None:
    from pydantic import SecretStr

    from fleet.app import create_app
    from tests.fleet.helpers import ADMIN, ADMIN_TOKEN

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    settings = FleetSettings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        admin_token=SecretStr(ADMIN_TOKEN),
        broker_url="mqtts://broker.test:8883",
        broker_ca_file=ca,
    )
    with TestClient(create_app(settings, link.factory(), clock=clock), headers=ADMIN) as api:
        body = enroll(api, clock)
    assert body["broker"]["ca_pem"] == ca.read_text()
    assert body["broker"]["url"] == "mqtts://broker.test:8883"


def test_concurrent_enrollments_cannot_double_spend_a_one_time_token(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    token = create_token(api, uses=1)
    bodies = [DeviceKey().request(token["secret"], clock.now, name=f"d{i}") for i in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda b: api.post("/api/v1/enroll", json=b), bodies))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [403] * 11, [r.text for r in responses]
    assert all("used up" in r.json()["error"]["message"] for r in responses if r.status_code == 403)
    assert _uses_left(engine, token["id"]) == 0
    with Session(engine) as session:
        assert len(session.exec(select(Device)).all()) == 1


def test_concurrent_replays_of_one_key_make_one_device(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    token = create_token(api, uses=5)
    key = DeviceKey()
    body = key.request(token["secret"], clock.now)
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda _: api.post("/api/v1/enroll", json=body), range(6)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len({r.json()["device_id"] for r in responses}) == 1
    assert _uses_left(engine, token["id"]) == 4
