"""Enrollment tokens in the dashboard: operators read, admins create and revoke, audited."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet.tables import AuditEntry, EnrollmentToken
from tests.fleet.dashboard.conftest import Browser
from tests.fleet.helpers import DeviceKey, create_group, create_token


def tokens(engine: Engine) -> list[EnrollmentToken]:
    with Session(engine) as session:
        return list(session.exec(select(EnrollmentToken)).all())


def audited(engine: Engine, action: str) -> list[AuditEntry]:
    with Session(engine) as session:
        return list(session.exec(select(AuditEntry).where(AuditEntry.action == action)).all())


def test_an_admin_creates_a_token_and_sees_its_secret_once_with_the_agent_command(
    api: TestClient, clock: Any, engine: Engine, browser: Browser
) -> None:
    create_group(api, "lab")
    answer = browser.post_form(
        "/ui/tokens", {"group": "lab", "uses": "3", "expires": "7d", "note": "shelf 2"}
    )
    assert answer.status_code == 201, answer.text
    assert answer.headers["cache-control"] == "no-store"
    secret = re.search(r'id="token-secret" class="mono"', answer.text)
    assert secret is not None
    found = re.search(r'<input readonly value="([^"]+)" id="token-secret"', answer.text)
    assert found is not None
    command = re.search(r'<code id="agent-command">([^<]+)</code>', answer.text)
    assert command is not None
    assert command.group(1) == (
        f"edgefleet-agent serve --fleet https://fleet.example.com --token {found.group(1)}"
    )
    (token,) = tokens(engine)
    assert (token.group, token.uses_total, token.note) == ("lab", 3, "shelf 2")
    assert token.expires_at is not None
    # The secret enrolls a device, and is never shown again.
    enrolled = api.post("/api/v1/enroll", json=DeviceKey().request(found.group(1), clock.now))
    assert enrolled.status_code == 200, enrolled.text
    listing = browser.client.get("/ui/tokens").text
    assert found.group(1) not in listing
    assert f'data-token="{token.id}"' in listing
    assert "2/3" in listing  # uses left
    assert "shelf 2" in listing
    (entry,) = audited(engine, "enrollment_token.create")
    assert (entry.actor, entry.subject) == ("ada", f"token:{token.id}")
    assert entry.source.endswith("(session)")
    assert entry.data["uses"] == 3


def test_bad_input_gives_the_form_back_and_creates_nothing(
    api: TestClient, engine: Engine, browser: Browser
) -> None:
    for fields, field, words in [
        ({"group": "nowhere"}, "group", "no group 'nowhere'"),
        ({"uses": "0"}, "uses", "greater than or equal to 1"),
        ({"uses": "lots"}, "uses", "integer"),
        ({"expires": "soon"}, "expires", "not a duration"),
    ]:
        answer = browser.post_form("/ui/tokens", {"uses": "1", "expires": "24h"} | fields)
        assert answer.status_code == 422, fields
        message = re.search(rf'id="err-{field}">([^<]+)<', answer.text)
        assert message is not None, (fields, answer.text)
        assert words in message.group(1).replace("&#39;", "'"), message.group(1)
    assert tokens(engine) == []


def test_an_admin_revokes_a_token_once_audited(
    api: TestClient, engine: Engine, browser: Browser
) -> None:
    made = create_token(api, uses=2)
    for _ in range(2):  # revoking twice changes nothing more
        answer = browser.post_form(f"/ui/tokens/{made['id']}/revoke", {})
        assert answer.status_code == 303
    (token,) = tokens(engine)
    assert token.revoked_at is not None
    assert len(audited(engine, "enrollment_token.revoke")) == 1
    listing = browser.client.get("/ui/tokens").text
    assert 'data-state="revoked"' in listing
    assert browser.post_form("/ui/tokens/tok-nothing/revoke", {}).status_code == 404


def test_operators_see_the_list_only_and_viewers_not_at_all(
    api: TestClient, engine: Engine, browser_as: Any
) -> None:
    made = create_token(api, note="for the lab")
    oscar: Browser = browser_as("oscar")
    page = oscar.client.get("/ui/tokens")
    assert page.status_code == 200
    assert "for the lab" in page.text
    assert 'id="token-form"' not in page.text
    assert 'data-action="revoke"' not in page.text
    assert oscar.post_form("/ui/tokens", {"uses": "1"}).status_code == 403
    assert oscar.post_form(f"/ui/tokens/{made['id']}/revoke", {}).status_code == 403
    vera: Browser = browser_as("vera")
    assert vera.client.get("/ui/tokens").status_code == 403
    (token,) = tokens(engine)
    assert token.revoked_at is None


def test_creating_without_the_csrf_token_is_refused(engine: Engine, browser: Browser) -> None:
    answer = browser.client.post("/ui/tokens", data={"uses": "1"}, follow_redirects=False)
    assert answer.status_code == 403
    assert tokens(engine) == []
