"""Users, roles and API tokens through the REST API, on SQLite and PostgreSQL.

Every route of the API states the role it needs: the test walks the app's routes, so
a new route without a role check fails here.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models.paths import ARTIFACTS_PATH, ENROLL_PATH, PROVISION_CHECK_PATH, TUF_PATH
from tests.fleet.helpers import Clock

PASSWORD = "correct horse battery staple"
# Device-facing and unauthenticated routes: devices prove themselves otherwise.
OPEN = {"/healthz", "/readyz", ENROLL_PATH, PROVISION_CHECK_PATH, f"{TUF_PATH}/{{filename}}"}
DEVICE_FACING = ARTIFACTS_PATH  # devices (HTTP Basic) or people (Bearer): tested in test_registry


def make_user(api: TestClient, name: str, role: str) -> None:
    answer = api.post("/api/v1/users", json={"name": name, "role": role, "password": PASSWORD})
    assert answer.status_code == 201, answer.text


def token_of(api: TestClient, name: str, **extra: Any) -> str:
    answer = api.post("/api/v1/api-tokens", json={"name": "test", "user": name, **extra})
    assert answer.status_code == 201, answer.text
    secret: str = answer.json()["secret"]
    assert secret.startswith("efu_")
    return secret


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def tokens(api: TestClient) -> dict[str, str]:
    for name, role in (("ada", "admin"), ("oscar", "operator"), ("vera", "viewer")):
        make_user(api, name, role)
    return {name: token_of(api, name) for name in ("ada", "oscar", "vera")}


def test_a_user_is_created_listed_and_never_shows_its_password(api: TestClient) -> None:
    make_user(api, "ada", "admin")
    users = api.get("/api/v1/users").json()
    assert [(u["name"], u["role"], u["disabled"]) for u in users] == [("ada", "admin", False)]
    assert "password_hash" not in str(users)
    assert "argon2" not in str(users)
    assert users[0]["created_by"].startswith("admin")  # the admin token made it


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "bob", "role": "viewer", "password": "short"}, "password"),
        ({"name": "Bob Smith", "role": "viewer", "password": PASSWORD}, "name"),
        ({"name": "bob", "role": "root", "password": PASSWORD}, "role"),
        ({"name": "bob", "role": "viewer", "password": PASSWORD, "admin": True}, "admin"),
    ],
)
def test_bad_users_are_refused_with_the_field(
    api: TestClient, body: dict[str, Any], field: str
) -> None:
    answer = api.post("/api/v1/users", json=body)
    assert answer.status_code == 422, answer.text
    assert field in answer.text
    assert api.get("/api/v1/users").json() == []


def test_a_taken_name_is_a_conflict(api: TestClient) -> None:
    make_user(api, "ada", "admin")
    answer = api.post("/api/v1/users", json={"name": "ada", "role": "viewer", "password": PASSWORD})
    assert answer.status_code == 409


def test_the_last_enabled_admin_cannot_be_demoted_or_disabled(api: TestClient) -> None:
    make_user(api, "ada", "admin")
    for change in ({"role": "viewer"}, {"disabled": True}):
        answer = api.patch("/api/v1/users/ada", json=change)
        assert answer.status_code == 409, answer.text
        assert "last enabled admin" in answer.text
    assert api.get("/api/v1/users/ada").json()["role"] == "admin"
    make_user(api, "bob", "admin")
    assert api.patch("/api/v1/users/ada", json={"role": "viewer"}).status_code == 200


def test_tokens_act_with_their_users_current_role(api: TestClient, tokens: dict[str, str]) -> None:
    me = api.get("/api/v1/me", headers=bearer(tokens["vera"])).json()
    assert (me["name"], me["role"], me["via"]) == ("vera", "viewer", "api-token")
    group = {"name": "lab"}
    assert api.post("/api/v1/groups", json=group, headers=bearer(tokens["vera"])).status_code == 403
    assert api.patch("/api/v1/users/vera", json={"role": "operator"}).status_code == 200
    assert api.post("/api/v1/groups", json=group, headers=bearer(tokens["vera"])).status_code == 201
    assert api.patch("/api/v1/users/vera", json={"disabled": True}).status_code == 200
    assert api.get("/api/v1/me", headers=bearer(tokens["vera"])).status_code == 401


def test_a_revoked_or_expired_token_is_refused(
    api: TestClient, tokens: dict[str, str], clock: Clock
) -> None:
    listed = api.get("/api/v1/api-tokens", headers=bearer(tokens["oscar"])).json()
    assert [t["user"] for t in listed] == ["oscar"]
    answer = api.delete(f"/api/v1/api-tokens/{listed[0]['id']}", headers=bearer(tokens["oscar"]))
    assert answer.status_code == 200
    assert answer.json()["revoked"]
    assert api.get("/api/v1/me", headers=bearer(tokens["oscar"])).status_code == 401
    short = token_of(api, "vera", expires_in_s=60)
    assert api.get("/api/v1/me", headers=bearer(short)).status_code == 200
    clock.advance(seconds=61)
    assert api.get("/api/v1/me", headers=bearer(short)).status_code == 401


def test_people_see_and_revoke_only_their_own_tokens(
    api: TestClient, tokens: dict[str, str]
) -> None:
    adas = api.get("/api/v1/api-tokens", headers=bearer(tokens["ada"])).json()
    vera = bearer(tokens["vera"])
    assert api.get("/api/v1/api-tokens?all=true", headers=vera).status_code == 403
    assert api.delete(f"/api/v1/api-tokens/{adas[0]['id']}", headers=vera).status_code == 404
    made = api.post("/api/v1/api-tokens", json={"name": "x", "user": "ada"}, headers=vera)
    assert made.status_code == 403
    everyone = api.get("/api/v1/api-tokens?all=true", headers=bearer(tokens["ada"])).json()
    assert sorted(t["user"] for t in everyone) == ["ada", "oscar", "vera"]


def test_changing_your_password_needs_the_current_one(
    api: TestClient, tokens: dict[str, str]
) -> None:
    vera = bearer(tokens["vera"])
    wrong = {"current": "not my password!", "new": "a brand new passphrase"}
    assert api.post("/api/v1/me/password", json=wrong, headers=vera).status_code == 403
    right = {"current": PASSWORD, "new": "a brand new passphrase"}
    assert api.post("/api/v1/me/password", json=right, headers=vera).status_code == 204


def test_the_admin_token_still_works_and_is_an_admin(api: TestClient) -> None:
    me = api.get("/api/v1/me").json()
    assert (me["role"], me["via"], me["user"]) == ("admin", "admin-token", None)
    answer = api.get("/api/v1/me", headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert answer.status_code == 401


def test_every_admin_action_is_audited_with_who_and_from_where(
    api: TestClient, tokens: dict[str, str]
) -> None:
    oscar = bearer(tokens["oscar"])
    assert (
        api.post("/api/v1/groups", json={"name": "lab"}, headers=bearer(tokens["ada"])).status_code
        == 201
    )
    token = api.post("/api/v1/tokens", json={"group": "lab"}, headers=bearer(tokens["ada"]))
    assert token.status_code == 201
    assert api.post("/api/v1/tokens", json={}, headers=oscar).status_code == 403
    revoked = api.delete(f"/api/v1/tokens/{token.json()['id']}", headers=bearer(tokens["ada"]))
    assert revoked.status_code == 200
    entries = api.get("/api/v1/audit", params={"limit": 100}).json()
    by_action = {e["action"]: e for e in entries}
    for action in ("user.create", "api_token.create", "enrollment_token.create",
                   "enrollment_token.revoke"):  # fmt: skip
        assert action in by_action, sorted(by_action)
    created = by_action["enrollment_token.create"]
    assert created["actor"] == "ada"
    assert re.fullmatch(r".+ \(api-token\)", created["source"]), created


def _api_routes(api: TestClient) -> list[tuple[str, str]]:
    """Every documented API route, path parameters filled in."""
    routes = []
    for template, operations in api.app.openapi()["paths"].items():  # type: ignore[attr-defined]
        if template in OPEN or template.startswith(DEVICE_FACING):
            continue
        path = re.sub(r"\{[^}]+\}", "1", template)
        routes.extend((method.upper(), path) for method in sorted(operations))
    return routes


def test_every_api_route_needs_someone_signed_in(api: TestClient) -> None:
    anonymous = TestClient(api.app)
    routes = _api_routes(api)
    assert len(routes) > 40
    for method, path in routes:
        answer = anonymous.request(method, path)
        assert answer.status_code == 401, (method, path, answer.status_code)


def test_a_viewer_can_read_but_no_api_route_lets_them_write(
    api: TestClient, tokens: dict[str, str]
) -> None:
    vera = TestClient(api.app, headers=bearer(tokens["vera"]))
    own = {("POST", "/api/v1/api-tokens"), ("DELETE", "/api/v1/api-tokens/1"),
           ("POST", "/api/v1/me/password")}  # fmt: skip
    writes = [(m, p) for m, p in _api_routes(api) if m not in ("GET", "HEAD") and (m, p) not in own]
    assert ("POST", "/api/v1/rollouts") in writes
    for method, path in writes:
        answer = vera.request(method, path, json={})
        assert answer.status_code == 403, (method, path, answer.status_code, answer.text)
    assert vera.get("/api/v1/rollouts").status_code == 200
    assert vera.get("/api/v1/users").status_code == 403  # people's names and roles: admins


def test_operators_run_the_fleet_but_admins_manage_who_enters(
    api: TestClient, tokens: dict[str, str]
) -> None:
    oscar = TestClient(api.app, headers=bearer(tokens["oscar"]))
    assert oscar.post("/api/v1/groups", json={"name": "lab"}).status_code == 201
    assert oscar.post("/api/v1/tokens", json={}).status_code == 403
    assert oscar.post("/api/v1/tokens/batch", json={"count": 2}).status_code == 403
    assert oscar.post("/api/v1/devices/dev-1/revoke").status_code == 403
    assert oscar.post("/api/v1/users", json={}).status_code == 403
    assert oscar.get("/api/v1/tokens").status_code == 200
    assert api.get("/api/v1/tokens", headers=bearer(tokens["vera"])).status_code == 403
    assert api.get("/api/v1/users").status_code == 200
