"""Dependencies every route shares: the controller's state, a database session, admin auth."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.config import FleetSettings
from fleet.desired import DesiredStates
from fleet.errors import Unauthorized
from fleet.link.port import LinkPort
from fleet.registry.repository import TufRepository
from fleet.rollout.engine import RolloutEngine
from fleet.tokens import same_secret

__all__ = [
    "Admin",
    "FleetState",
    "LinkDep",
    "SessionDep",
    "StateDep",
    "TufDep",
    "get_link",
    "get_session",
    "get_state",
    "get_tuf",
    "require_admin",
]


@dataclass(frozen=True)
class FleetState:
    """What the lifespan builds and the routes use; one per app, never global."""

    settings: FleetSettings
    engine: Engine
    link: LinkPort
    admin_token: str
    clock: Callable[[], datetime]  # aware UTC; tests pass a fixed one
    tuf: TufRepository  # signs model targets; its director keys sign desired states
    desired: DesiredStates  # stores and publishes desired states, in order
    rollouts: RolloutEngine  # runs staged rollouts; admins' actions go through it


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


def require_admin(request: Request, state: StateDep) -> None:
    """Accept the request only with ``Authorization: Bearer <admin token>``."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "missing admin token: send 'Authorization: Bearer <token>' "
            "(the token is in <data_dir>/admin-token on the controller)"
        )
    if not same_secret(token.strip(), state.admin_token):
        raise Unauthorized("wrong admin token")


Admin = Depends(require_admin)
