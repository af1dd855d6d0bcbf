"""The audit log page: newest first, filtered, paged by entry id, and nothing can write to it."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet.tables import AuditEntry
from tests.fleet.dashboard.conftest import Browser
from tests.fleet.helpers import START, create_group


def add_entries(engine: Engine, count: int, **fields: Any) -> None:
    with Session(engine) as session:
        for i in range(count):
            values = {
                "at": START + timedelta(seconds=i),
                "actor": "controller",
                "action": "rollout.stage_advanced",
                "subject": "rollout:ro-0000000001",
                "reason": f"entry {i}",
            }
            session.add(AuditEntry(**(values | fields)))
        session.commit()


def shown(text: str) -> list[str]:
    return re.findall(r"<small>(entry \d+)</small>", text)


def entry_count(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(AuditEntry)).one())


def test_who_what_when_from_where_and_why_newest_first(api: TestClient, browser_as: Any) -> None:
    create_group(api, "lab")  # by the admin token
    oscar: Browser = browser_as("oscar")
    assert oscar.client.post(
        "/api/v1/groups", json={"name": "edge"}, headers={"X-CSRF-Token": oscar.csrf}
    ).is_success
    vera: Browser = browser_as("vera")
    page = vera.client.get("/ui/audit")
    assert page.status_code == 200, page.text
    rows = re.findall(r'<tr data-entry="\d+">(.*?)</tr>', page.text, re.S)
    texts = [re.sub(r"<[^>]+>", " ", row) for row in rows]
    edge = next(t for t in texts if "group:edge" in t)
    lab = next(t for t in texts if "group:lab" in t)
    assert texts.index(edge) < texts.index(lab)  # newest first
    assert "oscar" in edge
    assert "(session)" in edge
    assert "admin" in lab
    assert "(admin-token)" in lab
    assert "user:vera" in page.text  # the users the fixture made are audited too


def test_filters_by_actor_action_prefix_and_subject(
    api: TestClient, engine: Engine, browser: Browser
) -> None:
    add_entries(engine, 3)
    add_entries(engine, 2, actor="ada", action="rollout.paused", subject="rollout:ro-2")
    add_entries(engine, 1, actor="ada", action="policy_x.create", subject="policy:p")
    by_actor = browser.client.get("/ui/audit", params={"actor": "ada"}).text
    assert all("ada" in row for row in re.findall(r"<tr data-entry.*?</tr>", by_actor, re.S))
    assert "rollout.stage_advanced" not in by_actor
    prefixed = browser.client.get("/ui/audit", params={"action": "rollout."}).text
    assert "rollout.paused" in prefixed
    assert "rollout.stage_advanced" in prefixed
    assert "policy_x.create" not in prefixed
    # "_" and "%" are plain characters, not LIKE wildcards.
    assert "policy_x.create" in browser.client.get("/ui/audit?action=policy_").text
    assert "policy_x.create" not in browser.client.get("/ui/audit?action=policy%25").text
    assert "No entry matches" in browser.client.get("/ui/audit?action=polic_x").text
    subject = browser.client.get("/ui/audit", params={"subject": "rollout:ro-2"}).text
    assert len(re.findall(r"<tr data-entry", subject)) == 2
    assert 'href="/ui/rollouts/ro-2"' in subject
    assert 'value="rollout:ro-2"' in subject  # the filter is kept in the form


def test_pages_go_back_in_time_and_forward_again(engine: Engine, browser: Browser) -> None:
    add_entries(engine, 120, actor="robot")
    first = browser.client.get("/ui/audit?actor=robot").text
    assert shown(first) == [f"entry {i}" for i in range(119, 69, -1)]
    assert 'id="audit-newer"' not in first
    older = re.search(r'href="([^"]+)" rel="next" id="audit-older"', first)
    assert older is not None
    second = browser.client.get(older.group(1).replace("&amp;", "&")).text
    assert shown(second) == [f"entry {i}" for i in range(69, 19, -1)]
    oldest = re.search(r'href="([^"]+)" rel="next"', second)
    assert oldest is not None
    third = browser.client.get(oldest.group(1).replace("&amp;", "&")).text
    assert shown(third) == [f"entry {i}" for i in range(19, -1, -1)]
    assert 'id="audit-older"' not in third
    newer = re.search(r'href="([^"]+)" rel="prev"', third)
    assert newer is not None
    assert "actor=robot" in newer.group(1)
    back = browser.client.get(newer.group(1).replace("&amp;", "&")).text
    assert shown(back) == shown(second)


def every_route(routes: list[Any]) -> list[Any]:
    """The app's routes, those of included routers too (FastAPI may keep them nested)."""
    found = []
    for route in routes:
        nested = getattr(route, "original_router", None)
        found += every_route(nested.routes) if nested is not None else [route]
    return found


def test_no_route_accepts_a_write_to_the_audit_log(
    api: TestClient, engine: Engine, browser: Browser
) -> None:
    routes = [
        r for r in every_route(api.app.routes) if isinstance(r, APIRoute) and "audit" in r.path
    ]
    assert {r.path for r in routes} >= {"/ui/audit", "/api/v1/audit"}
    for route in routes:
        assert route.methods <= {"GET", "HEAD"}, (route.path, route.methods)
    add_entries(engine, 1)
    before = entry_count(engine)
    for path in ("/api/v1/audit", "/api/v1/audit/1", "/ui/audit", "/ui/audit/1"):
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            as_admin = api.request(method, path, json={"reason": "rewritten"})
            as_session = browser.client.request(
                method, path, data={"csrf_token": browser.csrf, "reason": "rewritten"}
            )
            for answer in (as_admin, as_session):
                assert answer.status_code in (404, 405), (method, path, answer.status_code)
    assert entry_count(engine) == before
    with Session(engine) as session:
        assert "rewritten" not in session.exec(select(AuditEntry.reason)).all()
