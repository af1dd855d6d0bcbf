"""Signing in and out of the dashboard, sessions, CSRF and the page guard, in-process."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from fleet.api.deps import SESSION_COOKIE
from fleet.dashboard.app import SECURITY_HEADERS
from fleet.dashboard.signin import LOGIN_COOKIE, safe_next
from tests.fleet.dashboard.conftest import PASSWORD, Browser, login_token, sign_in
from tests.fleet.helpers import Clock


def fresh(api: TestClient) -> TestClient:
    return TestClient(api.app)


def test_with_no_admin_the_dashboard_says_how_to_make_one(api: TestClient) -> None:
    page = fresh(api).get("/ui/", follow_redirects=False)
    assert page.status_code == 503
    assert "edgefleet users create NAME --admin" in page.text
    assert fresh(api).get("/ui/login").status_code == 503


def test_a_page_without_a_session_sends_the_browser_to_sign_in(
    api: TestClient, users: dict[str, str]
) -> None:
    page = fresh(api).get("/ui/devices?group=lab", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/ui/login?next=/ui/devices?group=lab"
    htmx = fresh(api).get("/ui/", headers={"HX-Request": "true"}, follow_redirects=False)
    assert htmx.status_code == 401
    assert htmx.headers["HX-Redirect"].startswith("/ui/login")


def test_signing_in_sets_a_locked_down_cookie_and_opens_the_next_page(
    api: TestClient, users: dict[str, str]
) -> None:
    client = fresh(api)
    token = login_token(client)
    form = {"name": "vera", "password": PASSWORD, "login_token": token, "next": "/ui/audit"}
    answer = client.post("/ui/login", data=form, follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/audit"
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE))
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie
    assert "Secure" not in cookie  # plain http here; see the https test
    page = client.get("/ui/")
    assert page.status_code == 200
    assert "vera" in page.text


def test_over_https_the_session_cookie_is_secure(api: TestClient, users: dict[str, str]) -> None:
    client = TestClient(api.app, base_url="https://fleet.test")
    token = login_token(client)
    form = {"name": "vera", "password": PASSWORD, "login_token": token}
    answer = client.post("/ui/login", data=form, follow_redirects=False)
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE))
    assert "Secure" in cookie


@pytest.mark.parametrize("password", ["wrong password!!", ""])
def test_a_wrong_password_shows_the_form_again_without_saying_which_part_was_wrong(
    api: TestClient, users: dict[str, str], password: str
) -> None:
    client = fresh(api)
    form = {"name": "vera", "password": password, "login_token": login_token(client)}
    answer = client.post("/ui/login", data=form, follow_redirects=False)
    assert answer.status_code in (401, 422)
    assert SESSION_COOKIE not in client.cookies
    unknown = {"name": "nobody", "password": "wrong password!!", "login_token": login_token(client)}
    other = client.post("/ui/login", data=unknown, follow_redirects=False)
    assert other.status_code == 401
    if answer.status_code == 401:
        assert "Wrong name or password." in answer.text
        assert "Wrong name or password." in other.text


def test_the_sign_in_form_refuses_a_post_from_another_site(
    api: TestClient, users: dict[str, str]
) -> None:
    client = fresh(api)
    login_token(client)  # the cookie is set, but the forged form cannot know its value
    form = {"name": "vera", "password": PASSWORD, "login_token": "guessed"}
    answer = client.post("/ui/login", data=form, follow_redirects=False)
    assert answer.status_code == 403
    assert SESSION_COOKIE not in client.cookies
    client.cookies.delete(LOGIN_COOKIE, path="/ui/login")
    assert client.post("/ui/login", data=form, follow_redirects=False).status_code == 403


def test_repeated_failures_are_rate_limited_even_with_the_right_password(
    api: TestClient, users: dict[str, str], clock: Clock
) -> None:
    client = fresh(api)
    for _ in range(5):
        form = {"name": "vera", "password": "not her password", "login_token": login_token(client)}
        assert client.post("/ui/login", data=form).status_code == 401
    form = {"name": "vera", "password": PASSWORD, "login_token": login_token(client)}
    limited = client.post("/ui/login", data=form, follow_redirects=False)
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) > 0
    assert "too many failed sign-ins" in limited.text
    clock.advance(minutes=5, seconds=1)
    form["login_token"] = login_token(client)
    assert client.post("/ui/login", data=form, follow_redirects=False).status_code == 303


def test_signing_out_ends_the_session_on_the_server(api: TestClient, browser: Browser) -> None:
    stolen = browser.client.cookies[SESSION_COOKIE]
    answer = browser.post_form("/ui/logout", {})
    assert answer.status_code == 303  # type: ignore[attr-defined]
    thief = fresh(api)
    thief.cookies.set(SESSION_COOKIE, stolen)
    assert thief.get("/ui/", follow_redirects=False).status_code == 303
    assert thief.get("/api/v1/me").status_code == 401


def test_a_form_post_without_the_csrf_token_is_refused(api: TestClient, browser: Browser) -> None:
    answer = browser.client.post("/ui/logout", data={}, follow_redirects=False)
    assert answer.status_code == 403
    assert "CSRF" in answer.text
    wrong = browser.client.post("/ui/logout", data={"csrf_token": "x" * 43}, follow_redirects=False)
    assert wrong.status_code == 403
    assert browser.client.get("/ui/").status_code == 200  # still signed in


def test_the_session_also_works_for_the_api_with_the_csrf_header(
    api: TestClient, browser: Browser
) -> None:
    group = {"name": "lab"}
    refused = browser.client.post("/api/v1/groups", json=group)
    assert refused.status_code == 403
    made = browser.client.post("/api/v1/groups", json=group, headers={"X-CSRF-Token": browser.csrf})
    assert made.status_code == 201
    entry = api.get("/api/v1/audit", params={"subject": "group:lab"}).json()[0]
    assert (entry["action"], entry["actor"]) == ("group.create", "ada")
    assert entry["source"].endswith("(session)")


def test_a_changed_role_ends_the_users_sessions(api: TestClient, browser_as: object) -> None:
    oscar: Browser = browser_as("oscar")  # type: ignore[operator]
    assert api.patch("/api/v1/users/oscar", json={"role": "viewer"}).status_code == 200
    assert oscar.client.get("/ui/", follow_redirects=False).status_code == 303
    assert sign_in(oscar.client, "oscar")


def test_an_idle_session_expires(api: TestClient, browser: Browser, clock: Clock) -> None:
    clock.advance(hours=8, seconds=1)
    assert browser.client.get("/ui/", follow_redirects=False).status_code == 303


def test_every_page_carries_the_security_headers(api: TestClient, browser: Browser) -> None:
    page = browser.client.get("/ui/")
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    assert "'unsafe-inline'" not in page.headers["Content-Security-Policy"]
    assert "<script>" not in page.text  # no inline script: the CSP would block it


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/ui/devices?q=a", "/ui/devices?q=a"),
        ("https://evil.example/ui", "/ui/"),
        ("//evil.example/ui", "/ui/"),
        ("/ui\\@evil.example", "/ui/"),
        ("/api/v1/users", "/ui/"),
        (None, "/ui/"),
    ],
)
def test_after_signing_in_the_browser_only_goes_to_a_dashboard_page(
    target: str | None, expected: str
) -> None:
    assert safe_next(target) == expected


def test_a_tampered_form_gets_an_html_error_page_not_json(
    api: TestClient, browser: Browser
) -> None:
    answer = browser.client.post(
        "/ui/login", data={"password": "x", "login_token": "y"}, follow_redirects=False
    )
    assert answer.status_code == 422
    assert answer.headers["content-type"].startswith("text/html")
    assert "name" in answer.text
    assert api.post("/api/v1/groups", json={}).headers["content-type"] == "application/json"
