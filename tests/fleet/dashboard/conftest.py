"""Fixtures for the dashboard's in-process tests: users of each role, signed-in browsers.

A :class:`Browser` is a cookie-keeping client of the same app as ``api`` (which holds
the admin token), signed in through the real sign-in form; ``csrf`` is the token its
pages carry, for posting forms the way a browser would.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

PASSWORD = "correct horse battery staple"
USERS = {"ada": "admin", "oscar": "operator", "vera": "viewer"}
_LOGIN_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Browser:
    client: TestClient
    name: str
    csrf: str

    def get(self, path: str, **kwargs: object) -> object:
        return self.client.get(path, **kwargs)  # type: ignore[arg-type]

    def post_form(self, path: str, data: dict[str, str], **kwargs: object) -> object:
        """A form post with the page's CSRF token, as the browser sends it."""
        return self.client.post(
            path,
            data={"csrf_token": self.csrf, **data},
            follow_redirects=False,
            **kwargs,  # type: ignore[arg-type]
        )


def login_token(client: TestClient) -> str:
    page = client.get("/ui/login")
    assert page.status_code == 200, page.text
    found = _LOGIN_TOKEN.search(page.text)
    assert found is not None
    return found.group(1)


def sign_in(client: TestClient, name: str, password: str = PASSWORD) -> str:
    """Sign in through the form; the CSRF token of the new session."""
    token = login_token(client)
    answer = client.post(
        "/ui/login",
        data={"name": name, "password": password, "login_token": token, "next": "/ui/"},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    page = client.get("/ui/")
    assert page.status_code == 200, page.text
    found = _CSRF.search(page.text)
    assert found is not None
    return found.group(1)


def share_loop(client: TestClient, api: TestClient) -> TestClient:
    """Run the browser's requests on the app's own event loop (``api``'s portal).

    Without a `with` block a TestClient runs each request on a new loop, and an asyncio
    lock the app's background tasks hold (the desired-state publisher's) would then be
    bound to a different loop.
    """
    client.portal = api.portal  # type: ignore[attr-defined]
    return client


@pytest.fixture
def users(api: TestClient) -> dict[str, str]:
    """ada (admin), oscar (operator) and vera (viewer), made with the admin token."""
    for name, role in USERS.items():
        answer = api.post("/api/v1/users", json={"name": name, "role": role, "password": PASSWORD})
        assert answer.status_code == 201, answer.text
    return dict(USERS)


@pytest.fixture
def browser(api: TestClient, users: dict[str, str]) -> Iterator[Browser]:
    """ada, the admin, signed in."""
    client = share_loop(TestClient(api.app), api)
    try:
        yield Browser(client, "ada", sign_in(client, "ada"))
    finally:
        client.close()


@pytest.fixture
def browser_as(api: TestClient, users: dict[str, str]) -> Iterator[object]:
    """A factory: ``browser_as("vera")`` signs that user in, in a browser of their own."""
    opened: list[TestClient] = []

    def make(name: str) -> Browser:
        client = share_loop(TestClient(api.app), api)
        opened.append(client)
        return Browser(client, name, sign_in(client, name))

    yield make
    for client in opened:
        client.close()
