"""Groups, tags and enrollment tokens through the REST API."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.tables import EnrollmentToken
from fleet.tokens import hash_secret
from tests.fleet.helpers import Clock, create_group, create_token, enroll, error


def test_groups_crud_with_device_counts(api: TestClient, clock: Clock) -> None:
    created = api.post("/api/v1/groups", json={"name": "lab", "description": "bench boards"})
    assert created.status_code == 201
    assert created.json()["devices"] == 0
    assert created.json()["description"] == "bench boards"
    create_group(api, "field")
    for _ in range(2):
        enroll(api, clock, group="lab")
    revoked = enroll(api, clock, group="lab")["device_id"]
    api.post(f"/api/v1/devices/{revoked}/revoke")

    listed = api.get("/api/v1/groups").json()
    assert [(g["name"], g["devices"]) for g in listed] == [("field", 0), ("lab", 2)]
    assert api.get("/api/v1/groups/lab").json()["devices"] == 2
    assert error(api.get("/api/v1/groups/nope"))[0] == 404


def test_group_names_are_validated_and_unique(api: TestClient) -> None:
    create_group(api, "lab")
    assert error(api.post("/api/v1/groups", json={"name": "lab"}))[:2] == (409, "conflict")
    for bad in ["", "has space", "a/b", "-lead", "x" * 65]:
        assert error(api.post("/api/v1/groups", json={"name": bad}))[0] == 422, bad


def test_delete_group(api: TestClient, clock: Clock) -> None:
    create_group(api, "empty")
    assert api.delete("/api/v1/groups/empty").status_code == 204
    assert error(api.get("/api/v1/groups/empty"))[0] == 404
    assert error(api.delete("/api/v1/groups/empty"))[0] == 404


def test_delete_group_with_devices_is_409(api: TestClient, clock: Clock) -> None:
    create_group(api, "lab")
    device_id = enroll(api, clock, group="lab")["device_id"]
    status, code, message = error(api.delete("/api/v1/groups/lab"))
    assert (status, code) == (409, "conflict")
    assert "1 device" in message
    api.patch(f"/api/v1/devices/{device_id}", json={"group": None})
    assert api.delete("/api/v1/groups/lab").status_code == 204


def test_delete_group_with_a_usable_token_is_409_spent_tokens_forget_it(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    create_group(api, "lab")
    expired = create_token(api, group="lab", expires_in_s=60)
    used = create_token(api, group="lab")
    device_id = enroll(api, clock, token=used["secret"])["device_id"]
    api.patch(f"/api/v1/devices/{device_id}", json={"group": None})
    clock.advance(seconds=120)
    usable = create_token(api, group="lab")

    status, _, message = error(api.delete("/api/v1/groups/lab"))
    assert status == 409
    assert usable["id"] in message
    assert expired["id"] not in message
    assert used["id"] not in message

    api.delete(f"/api/v1/tokens/{usable['id']}")
    assert api.delete("/api/v1/groups/lab").status_code == 204
    with Session(engine) as session:
        for token_id in (expired["id"], used["id"], usable["id"]):
            token = session.get(EnrollmentToken, token_id)
            assert token is not None
            assert token.group is None


def test_tags_with_counts(api: TestClient, clock: Clock) -> None:
    a = enroll(api, clock)["device_id"]
    b = enroll(api, clock)["device_id"]
    c = enroll(api, clock)["device_id"]
    api.patch(f"/api/v1/devices/{a}", json={"tags": ["gpu", "rack-1"]})
    api.patch(f"/api/v1/devices/{b}", json={"tags": ["gpu"]})
    api.patch(f"/api/v1/devices/{c}", json={"tags": ["gpu"]})
    api.post(f"/api/v1/devices/{c}/revoke")
    assert api.get("/api/v1/tags").json() == [
        {"tag": "gpu", "devices": 2},
        {"tag": "rack-1", "devices": 1},
    ]


def test_token_create_returns_the_secret_once(
    api: TestClient, clock: Clock, engine: Engine
) -> None:
    create_group(api, "lab")
    token = create_token(api, group="lab", uses=3, expires_in_s=3600, note="pilot")
    assert token["secret"].startswith("eft_")
    assert len(token["secret"]) >= 36
    assert token["id"].startswith("tok-")
    assert token["fleet_url"] == "https://fleet.example.com"
    assert (token["group"], token["uses_total"], token["uses_left"]) == ("lab", 3, 3)
    assert token["state"] == "active"
    assert token["note"] == "pilot"
    assert token["expires_at"].startswith((clock.now + timedelta(hours=1)).isoformat()[:19])

    listed = api.get("/api/v1/tokens").json()
    assert [t["id"] for t in listed] == [token["id"]]
    assert "secret" not in listed[0]
    assert token["secret"] not in api.get("/api/v1/tokens").text
    assert "secret" not in api.get(f"/api/v1/tokens/{token['id']}").json()
    with Session(engine) as session:
        row = session.get(EnrollmentToken, token["id"])
        assert row is not None
        assert row.secret_sha256 == hash_secret(token["secret"])


def test_token_defaults_one_use_one_day(api: TestClient, clock: Clock) -> None:
    token = create_token(api)
    assert token["uses_total"] == 1
    assert token["group"] is None
    assert token["expires_at"].startswith((clock.now + timedelta(days=1)).isoformat()[:19])
    assert create_token(api, expires_in_s=None)["expires_at"] is None


def test_token_for_a_missing_group_is_refused(api: TestClient) -> None:
    status, code, message = error(api.post("/api/v1/tokens", json={"group": "nope"}))
    assert (status, code) == (422, "invalid_input")
    assert "groups create nope" in message


def test_token_validation(api: TestClient) -> None:
    for body in [{"uses": 0}, {"expires_in_s": -1}, {"note": "x" * 201}, {"colour": 1}]:
        assert error(api.post("/api/v1/tokens", json=body))[0] == 422, body


def test_token_states_in_listing(api: TestClient, clock: Clock) -> None:
    used = create_token(api)
    enroll(api, clock, token=used["secret"])
    revoked = create_token(api)
    api.delete(f"/api/v1/tokens/{revoked['id']}")
    expiring = create_token(api, expires_in_s=10)
    active = create_token(api, expires_in_s=None)
    clock.advance(seconds=11)
    states = {t["id"]: t["state"] for t in api.get("/api/v1/tokens").json()}
    assert states == {
        used["id"]: "used",
        revoked["id"]: "revoked",
        expiring["id"]: "expired",
        active["id"]: "active",
    }


def test_revoke_token_is_idempotent_and_404_for_unknown(api: TestClient, clock: Clock) -> None:
    token = create_token(api)
    first = api.delete(f"/api/v1/tokens/{token['id']}").json()
    clock.advance(minutes=5)
    second = api.delete(f"/api/v1/tokens/{token['id']}").json()
    assert first["revoked_at"] == second["revoked_at"]
    assert second["state"] == "revoked"
    assert error(api.delete("/api/v1/tokens/tok-nope"))[0] == 404


def test_a_batch_of_tokens_in_one_call(api: TestClient, clock: Clock, engine: Engine) -> None:
    create_group(api, "lab")
    response = api.post(
        "/api/v1/tokens/batch",
        json={"count": 25, "group": "lab", "uses": 2, "expires_in_s": 3600, "note": "line 4"},
    )
    assert response.status_code == 201, response.text
    batch = response.json()
    assert batch["fleet_url"] == "https://fleet.example.com"
    tokens = batch["tokens"]
    assert len(tokens) == 25
    assert len({t["id"] for t in tokens}) == len({t["secret"] for t in tokens}) == 25
    expires = (clock.now + timedelta(hours=1)).isoformat()[:19]
    for t in tokens:
        assert (t["group"], t["uses_total"], t["uses_left"], t["state"]) == ("lab", 2, 2, "active")
        assert (t["note"], t["expires_at"][:19]) == ("line 4", expires)
        assert t["secret"].startswith("eft_")
    listed = api.get("/api/v1/tokens").json()
    assert {t["id"] for t in listed} == {t["id"] for t in tokens}
    assert all("secret" not in t for t in listed)
    with Session(engine) as session:
        row = session.get(EnrollmentToken, tokens[7]["id"])
        assert row is not None
        assert row.secret_sha256 == hash_secret(tokens[7]["secret"])
    assert enroll(api, clock, token=tokens[24]["secret"])["device_id"].startswith("dev-")


def test_a_batch_is_audited_once(api: TestClient) -> None:
    tokens = api.post("/api/v1/tokens/batch", json={"count": 3}).json()["tokens"]
    entries = [e for e in api.get("/api/v1/audit").json() if e["action"].startswith("enrollment")]
    assert len(entries) == 1
    (entry,) = entries
    assert entry["action"] == "enrollment_token.create_batch"
    assert entry["subject"] == f"token-batch:{tokens[0]['id']}"
    assert entry["data"]["count"] == 3
    assert entry["data"]["ids"] == [t["id"] for t in tokens]
    assert entry["actor"] == "admin"


def test_a_batch_is_all_or_nothing(api: TestClient) -> None:
    status, _, message = error(api.post("/api/v1/tokens/batch", json={"count": 5, "group": "x"}))
    assert status == 422
    assert "groups create x" in message
    assert api.get("/api/v1/tokens").json() == []


def test_batch_validation(api: TestClient) -> None:
    for body in [
        {},
        {"count": 0},
        {"count": 10_001},
        {"count": 2, "uses": 0},
        {"count": 2, "x": 1},
    ]:
        assert error(api.post("/api/v1/tokens/batch", json=body))[0] == 422, body
    assert api.post("/api/v1/tokens/batch", json={"count": 1}).status_code == 201


def test_the_largest_batch(api: TestClient) -> None:
    response = api.post("/api/v1/tokens/batch", json={"count": 10_000, "expires_in_s": None})
    assert response.status_code == 201, response.text
    assert len({t["secret"] for t in response.json()["tokens"]}) == 10_000
    assert len(api.get("/api/v1/tokens").json()) == 10_000
