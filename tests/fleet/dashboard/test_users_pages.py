"""Users (admins only) and everyone's own account: password and API tokens."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet.tables import ApiToken, AuditEntry, User
from tests.fleet.dashboard.conftest import PASSWORD, Browser, sign_in

NEW_PASSWORD = "a brand new passphrase"


def user(engine: Engine, name: str) -> User:
    with Session(engine) as session:
        return session.exec(select(User).where(User.name == name)).one()


def audited(engine: Engine, action: str, subject: str) -> list[AuditEntry]:
    with Session(engine) as session:
        query = select(AuditEntry).where(AuditEntry.action == action, AuditEntry.subject == subject)
        return list(session.exec(query).all())


def test_an_admin_lists_and_creates_users(engine: Engine, browser: Browser) -> None:
    page = browser.client.get("/ui/users")
    assert page.status_code == 200
    names = re.findall(r'<tr data-user="([^"]+)"', page.text)
    assert names == ["ada", "oscar", "vera"]
    made = browser.post_form(
        "/ui/users", {"name": "nina", "role": "operator", "password": PASSWORD}
    )
    assert made.status_code == 303, made.text
    assert user(engine, "nina").role == "operator"
    (entry,) = audited(engine, "user.create", "user:nina")
    assert (entry.actor, entry.source.endswith("(session)")) == ("ada", True)
    sign_in(TestClient(browser.client.app), "nina")  # the password works


def test_bad_new_users_give_the_form_back(engine: Engine, browser: Browser) -> None:
    for fields, field, status, words in [
        ({"name": "Bad Name", "password": PASSWORD}, "name", 422, "lower-case"),
        ({"name": "nina", "password": "short"}, "password", 422, "at least 12"),
        ({"name": "vera", "password": PASSWORD}, "name", 409, "exists"),
    ]:
        answer = browser.post_form("/ui/users", {"role": "viewer"} | fields)
        assert answer.status_code == status, (fields, answer.text)
        message = re.search(rf'id="err-{field}">([^<]+)<', answer.text)
        assert message is not None, fields
        assert words in message.group(1), message.group(1)
    with Session(engine) as session:
        assert session.exec(select(User).where(User.name == "nina")).first() is None


def test_an_admin_changes_a_role_disables_and_resets_a_password(
    api: TestClient, engine: Engine, browser: Browser, browser_as: Any
) -> None:
    oscar: Browser = browser_as("oscar")
    assert oscar.client.get("/ui/account").status_code == 200
    assert browser.post_form("/ui/users/oscar/role", {"role": "viewer"}).status_code == 303
    assert user(engine, "oscar").role == "viewer"
    # His open session ended with the change.
    assert oscar.client.get("/ui/account", follow_redirects=False).status_code == 303
    assert browser.post_form("/ui/users/oscar/state", {"disabled": "true"}).status_code == 303
    assert user(engine, "oscar").disabled
    assert 'data-action="enable"' in browser.client.get("/ui/users").text
    assert browser.post_form("/ui/users/oscar/state", {"disabled": "false"}).status_code == 303
    assert not user(engine, "oscar").disabled
    reset = browser.post_form("/ui/users/oscar/password", {"password": NEW_PASSWORD})
    assert reset.status_code == 303
    sign_in(TestClient(api.app), "oscar", NEW_PASSWORD)
    short = browser.post_form("/ui/users/oscar/password", {"password": "short"})
    assert short.status_code == 422
    assert 'id="err-user-oscar"' in short.text
    changes = audited(engine, "user.update", "user:oscar")
    assert [sorted(set(e.data) - {"sessions_ended"}) for e in changes] == [
        ["role"],
        ["disabled"],
        ["disabled"],
        ["password"],
    ]
    assert all(e.actor == "ada" for e in changes)


def test_the_last_admin_cannot_be_demoted_and_nothing_changes(
    engine: Engine, browser: Browser
) -> None:
    answer = browser.post_form("/ui/users/ada/role", {"role": "viewer"})
    assert answer.status_code == 409
    assert "last enabled admin" in answer.text
    assert browser.post_form("/ui/users/ada/state", {"disabled": "true"}).status_code == 409
    ada = user(engine, "ada")
    assert (ada.role, ada.disabled) == ("admin", False)
    assert browser.client.get("/ui/users").status_code == 200  # still signed in


def test_only_admins_see_or_change_users(engine: Engine, browser_as: Any) -> None:
    for name in ("oscar", "vera"):
        other: Browser = browser_as(name)
        assert other.client.get("/ui/users").status_code == 403
        assert "/ui/users" not in other.client.get("/ui/").text  # not in the navigation
        refused = [
            other.post_form("/ui/users", {"name": "eve", "role": "admin", "password": PASSWORD}),
            other.post_form(f"/ui/users/{name}/role", {"role": "admin"}),
            other.post_form("/ui/users/ada/state", {"disabled": "true"}),
            other.post_form("/ui/users/ada/password", {"password": NEW_PASSWORD}),
        ]
        assert [r.status_code for r in refused] == [403] * 4
    assert user(engine, "oscar").role == "operator"
    assert user(engine, "vera").role == "viewer"
    assert not user(engine, "ada").disabled
    with Session(engine) as session:
        assert session.exec(select(User).where(User.name == "eve")).first() is None


def test_a_user_changes_their_own_password_and_signs_in_again(
    api: TestClient, engine: Engine, browser_as: Any
) -> None:
    vera: Browser = browser_as("vera")
    before = user(engine, "vera").password_hash
    wrong = vera.post_form(
        "/ui/account/password",
        {"current": "not it at all", "new": NEW_PASSWORD, "confirm": NEW_PASSWORD},
    )
    assert wrong.status_code == 403
    assert 'id="err-current"' in wrong.text
    differ = vera.post_form(
        "/ui/account/password", {"current": PASSWORD, "new": NEW_PASSWORD, "confirm": "other"}
    )
    assert differ.status_code == 422
    assert 'id="err-confirm"' in differ.text
    short = vera.post_form(
        "/ui/account/password", {"current": PASSWORD, "new": "short", "confirm": "short"}
    )
    assert short.status_code == 422
    assert 'id="err-new"' in short.text
    assert user(engine, "vera").password_hash == before  # the refused changes left it
    done = vera.post_form(
        "/ui/account/password",
        {"current": PASSWORD, "new": NEW_PASSWORD, "confirm": NEW_PASSWORD},
    )
    assert done.status_code == 303
    assert done.headers["location"].startswith("/ui/login")
    assert user(engine, "vera").password_hash != before
    assert vera.client.get("/ui/account", follow_redirects=False).status_code == 303
    sign_in(TestClient(api.app), "vera", NEW_PASSWORD)
    (entry,) = audited(engine, "user.update", "user:vera")
    assert (entry.actor, entry.data["password"]) == ("vera", "changed")


def test_a_password_change_needs_the_csrf_token(engine: Engine, browser_as: Any) -> None:
    vera: Browser = browser_as("vera")
    before = user(engine, "vera").password_hash
    answer = vera.client.post(
        "/ui/account/password",
        data={"current": PASSWORD, "new": NEW_PASSWORD, "confirm": NEW_PASSWORD},
        follow_redirects=False,
    )
    assert answer.status_code == 403
    assert user(engine, "vera").password_hash == before


def test_own_api_tokens_shown_once_listed_and_revoked(
    api: TestClient, engine: Engine, browser_as: Any
) -> None:
    vera: Browser = browser_as("vera")
    made = vera.post_form("/ui/account/tokens", {"name": "laptop", "expires": "30d"})
    assert made.status_code == 201, made.text
    assert made.headers["cache-control"] == "no-store"
    secret = re.search(r'value="(efu_[^"]+)" id="api-token-secret"', made.text)
    assert secret is not None
    me = api.get("/api/v1/me", headers={"Authorization": f"Bearer {secret.group(1)}"})
    assert me.json()["name"] == "vera"
    page = vera.client.get("/ui/account").text
    assert secret.group(1) not in page
    token_id = re.search(r'<tr data-token="(\d+)">', page)
    assert token_id is not None
    assert 'data-state="active"' in page
    bad = vera.post_form("/ui/account/tokens", {"name": "x", "expires": "forever"})
    assert bad.status_code == 422
    assert 'id="err-expires"' in bad.text
    revoked = vera.post_form(f"/ui/account/tokens/{token_id.group(1)}/revoke", {})
    assert revoked.status_code == 303
    refused = api.get("/api/v1/me", headers={"Authorization": f"Bearer {secret.group(1)}"})
    assert refused.status_code == 401
    assert 'data-state="revoked"' in vera.client.get("/ui/account").text
    with Session(engine) as session:
        actions = session.exec(
            select(AuditEntry.action).where(AuditEntry.subject == "user:vera")
        ).all()
    assert {"api_token.create", "api_token.revoke"} <= set(actions)


def test_nobody_revokes_someone_elses_token(engine: Engine, browser_as: Any) -> None:
    vera: Browser = browser_as("vera")
    assert vera.post_form("/ui/account/tokens", {"name": "mine"}).status_code == 201
    with Session(engine) as session:
        (row,) = session.exec(select(ApiToken)).all()
    oscar: Browser = browser_as("oscar")
    answer = oscar.post_form(f"/ui/account/tokens/{row.id}/revoke", {})
    assert answer.status_code == 404
    with Session(engine) as session:
        again = session.get(ApiToken, row.id)
        assert again is not None
        assert again.revoked_at is None
