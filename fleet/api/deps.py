"""Dependencies every route shares: the controller's state, a database session, who asks.

Who asks (:func:`get_principal`) comes from, in order:
- ``Authorization: Bearer <token>``: the controller's admin token (role admin) or a
  user's API token (the user's role);
- the dashboard's session cookie, with the session's CSRF token required on every
  request that is not a read (header ``X-CSRF-Token`` or form field ``csrf_token``).

Every router states the roles it needs with :func:`authorize`; reads need ``viewer``
and writes ``operator`` unless it says otherwise (:mod:`fleet.auth.roles`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.auth import Principal, Role, allows, needed_role
from fleet.auth.api_tokens import resolve_token
from fleet.auth.limits import SignInLimits
from fleet.auth.principal import ADMIN_TOKEN_ACTOR
from fleet.auth.roles import SAFE_METHODS
from fleet.auth.sessions import SessionLimits, resolve_session
from fleet.config import FleetSettings
from fleet.desired import DesiredStates
from fleet.errors import Forbidden, Unauthorized
from fleet.leases import Leadership
from fleet.link.port import LinkPort
from fleet.registry.repository import TufRepository
from fleet.rollout.engine import RolloutEngine
from fleet.tokens import same_secret

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "FleetState",
    "LinkDep",
    "PrincipalDep",
    "SessionDep",
    "StateDep",
    "TufDep",
    "authorize",
    "client_address",
    "get_link",
    "get_principal",
    "get_session",
    "get_state",
    "get_tuf",
]

SESSION_COOKIE = "edgefleet_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
_ACTOR = re.compile(r"[^A-Za-z0-9_.@-]")


@dataclass(frozen=True)
class FleetState:
    """What the lifespan builds and the routes use; one per app, never global."""

    settings: FleetSettings
    engine: Engine
    link: LinkPort
    admin_token: str
    clock: Callable[[], datetime]  # aware UTC; tests pass a fixed one
    leadership: Leadership  # whether this replica runs the fleet-wide jobs
    tuf: TufRepository  # signs model targets; its director keys sign desired states
    desired: DesiredStates  # stores and publishes desired states, in order
    rollouts: RolloutEngine  # runs staged rollouts; admins' actions go through it
    sessions: SessionLimits = field(default_factory=SessionLimits)
    sign_in: SignInLimits = field(default_factory=SignInLimits)


def get_state(request: Request) -> FleetState:
    state: FleetState = request.app.state.fleet
    return state


StateDep = Annotated[FleetState, Depends(get_state)]


def get_tuf(state: StateDep) -> TufRepository:
    return state.tuf


TufDep = Annotated[TufRepository, Depends(get_tuf)]


def get_link(state: StateDep) -> LinkPort:
    return state.link


LinkDep = Annotated[LinkPort, Depends(get_link)]


def get_session(state: StateDep) -> Iterator[Session]:
    """One session per request, closed (and rolled back if uncommitted) afterwards."""
    with Session(state.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def _bearer(request: Request, state: FleetState, session: Session) -> Principal | None:
    header = request.headers.get("authorization", "")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send 'Authorization: Bearer <token>' (an API token or the admin token)")
    address = client_address(request)
    if same_secret(token, state.admin_token):
        label = _ACTOR.sub("", request.headers.get("x-edgefleet-actor", ""))[:48]
        name = f"{ADMIN_TOKEN_ACTOR}:{label}" if label else ADMIN_TOKEN_ACTOR
        return Principal(name=name, role=Role.ADMIN, via="admin-token", address=address)
    user = resolve_token(session, token, state.clock())
    if user is None:
        raise Unauthorized("unknown, revoked or expired token")
    return Principal(
        name=user.name, role=Role(user.role), via="api-token", address=address, user_id=user.id
    )


async def _check_csrf(request: Request, expected: str) -> None:
    sent = request.headers.get(CSRF_HEADER.lower())
    content_type = request.headers.get("content-type", "")
    if sent is None and content_type.startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        value = (await request.form()).get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if sent is None or not same_secret(sent, expected):
        raise Forbidden(
            "missing or wrong CSRF token: reload the page and try again "
            f"(forms send {CSRF_FIELD!r}, scripts the {CSRF_HEADER} header)"
        )


async def get_principal(request: Request, state: StateDep, session: SessionDep) -> Principal:
    """Who sent the request; 401 when nobody is signed in, 403 for a failed CSRF check."""
    principal = _bearer(request, state, session)
    if principal is not None:
        return principal
    cookie = request.cookies.get(SESSION_COOKIE)
    found = (
        resolve_session(session, cookie, now=state.clock(), limits=state.sessions)
        if cookie
        else None
    )
    if found is None:
        raise Unauthorized(
            "sign in: send 'Authorization: Bearer <token>' (an API token from "
            "`edgefleet users token create`, or the admin token in <data_dir>/admin-token)"
        )
    row, user = found
    if request.method.upper() not in SAFE_METHODS:
        await _check_csrf(request, row.csrf_token)
    return Principal(
        name=user.name,
        role=Role(user.role),
        via="session",
        address=client_address(request),
        user_id=user.id,
        csrf_token=row.csrf_token,
    )


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def authorize(read: Role = Role.VIEWER, write: Role = Role.OPERATOR) -> Any:
    """A dependency that lets the request through only with the role its method needs."""

    def check(request: Request, who: PrincipalDep) -> Principal:
        needed = needed_role(request.method, read=read, write=write)
        if not allows(who.role, needed):
            raise Forbidden(
                f"{who.name} is a {who.role.value}: {request.method} {request.url.path} "
                f"needs the {needed.value} role"
            )
        return who

    return Depends(check)
