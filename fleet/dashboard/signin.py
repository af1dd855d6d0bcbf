"""Signing in and out of the dashboard.

The sign-in form has no session yet, so it is protected from cross-site posts by a
double-submit token: a random cookie that the form must echo. A signed-in session's
cookie is HttpOnly and SameSite=Lax, and Secure when the dashboard is served over TLS
(or ``cookie_secure`` says so, behind a TLS-terminating proxy). Signing out revokes
the session on the server, so a copied cookie stops working too.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from fleet.api.deps import SESSION_COOKIE, SessionDep, StateDep, client_address
from fleet.auth import Role
from fleet.auth.sessions import open_session, revoke_session
from fleet.auth.signin import sign_in
from fleet.dashboard.guard import page_role, require_admin_exists
from fleet.dashboard.templating import Pages
from fleet.errors import RateLimited, Unauthorized
from fleet.tables import WebSession
from fleet.tokens import hash_secret, same_secret

__all__ = ["LOGIN_COOKIE", "router", "safe_next"]

router = APIRouter(prefix="/ui")
LOGIN_COOKIE = "edgefleet_login"  # the sign-in form's double-submit token
_ANY_SIGNED_IN = page_role(write=Role.VIEWER)


def safe_next(target: str | None) -> str:
    """Where to go after signing in: only a path of this dashboard, never another site."""
    if not target or not target.startswith("/ui") or target.startswith("//") or "\\" in target:
        return "/ui/"
    return target


def _secure(request: Request, state: StateDep) -> bool:
    configured = state.settings.cookie_secure
    return configured if configured is not None else request.url.scheme == "https"


def _form(
    request: Request,
    pages: Pages,
    *,
    error: str = "",
    status: int = 200,
    next_path: str = "/ui/",
    name: str = "",
) -> Response:
    token = secrets.token_urlsafe(32)
    response = pages.render(
        request,
        None,
        "login.html",
        status_code=status,
        error=error,
        next_path=safe_next(next_path),
        login_token=token,
        name=name,
    )
    response.set_cookie(
        LOGIN_COOKIE, token, max_age=3600, httponly=True, samesite="strict", path="/ui/login"
    )
    return response


@router.get("/login", include_in_schema=False)
def login_page(request: Request, session: SessionDep, next: str = "/ui/") -> Response:
    require_admin_exists(session)
    return _form(request, request.app.state.pages, next_path=next)


@router.post("/login", include_in_schema=False)
def login(
    request: Request,
    state: StateDep,
    session: SessionDep,
    name: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    login_token: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/ui/",
) -> Response:
    pages: Pages = request.app.state.pages
    require_admin_exists(session)
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not cookie or not same_secret(cookie, login_token):
        return _form(
            request, pages, error="The form expired: please sign in again.", status=403,
            next_path=next, name=name,
        )  # fmt: skip
    try:
        user = sign_in(
            session,
            name,
            password,
            address=client_address(request),
            now=state.clock(),
            limits=state.sign_in,
        )
    except RateLimited as exc:
        response = _form(request, pages, error=str(exc), status=429, next_path=next, name=name)
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response
    except Unauthorized:
        return _form(
            request, pages, error="Wrong name or password.", status=401, next_path=next, name=name
        )
    _, secret = open_session(
        session, user, address=client_address(request), now=state.clock(), limits=state.sessions
    )
    session.commit()
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        secret,
        max_age=int(state.sessions.lifetime.total_seconds()),
        httponly=True,
        samesite="lax",
        secure=_secure(request, state),
        path="/",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/ui/login")
    return response


@router.post("/logout", include_in_schema=False, dependencies=[_ANY_SIGNED_IN])
def logout(request: Request, state: StateDep, session: SessionDep) -> Response:
    row = session.get(WebSession, hash_secret(request.cookies.get(SESSION_COOKIE, "")))
    if row is not None:
        revoke_session(session, row, state.clock())
        session.commit()
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
