"""Users and their API tokens: admins manage users; everyone manages their own tokens.

The controller's admin token acts as an admin with no user of its own: it creates the
first users and can make tokens for any of them (``"user"`` in the body).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session

from fleet.api.deps import PrincipalDep, SessionDep, StateDep, authorize
from fleet.auth import Principal, Role
from fleet.auth.api_tokens import create_token, list_tokens, revoke_token
from fleet.auth.passwords import verify
from fleet.auth.users import NAME_PATTERN, create_user, get_user, list_users, update_user
from fleet.errors import Forbidden, InvalidInput
from fleet.tables import ApiToken, User, as_utc

__all__ = ["router", "tokens_router"]

router = APIRouter(prefix="/api/v1", tags=["users"])
tokens_router = APIRouter(prefix="/api/v1/api-tokens", tags=["users"])
_ADMIN = authorize(read=Role.ADMIN, write=Role.ADMIN)
_ANYONE = authorize(read=Role.VIEWER, write=Role.VIEWER)


class UserPublic(BaseModel):
    name: str
    role: Role
    disabled: bool
    created_by: str
    created_at: datetime
    password_changed_at: datetime


class Me(BaseModel):
    """Who the request is from; ``user`` is None for the controller's admin token."""

    name: str
    role: Role
    via: str
    user: UserPublic | None


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    role: Role = Role.VIEWER
    password: str = Field(max_length=1024)


class UserUpdate(BaseModel):
    """Only what is given changes; a new role, password or disabling ends their sessions."""

    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    password: str | None = Field(default=None, max_length=1024)
    disabled: bool | None = None


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current: str = Field(max_length=1024)
    new: str = Field(max_length=1024)


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    expires_in_s: float | None = Field(default=None, gt=0, le=10 * 365 * 86400)
    user: str | None = Field(default=None, max_length=64)  # admins only: someone else's


class TokenPublic(BaseModel):
    id: int
    user: str
    name: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked: bool


class TokenCreated(TokenPublic):
    secret: str  # shown only here, never again


def user_public(user: User) -> UserPublic:
    return UserPublic(
        name=user.name,
        role=Role(user.role),
        disabled=user.disabled,
        created_by=user.created_by,
        created_at=as_utc(user.created_at) or user.created_at,
        password_changed_at=as_utc(user.password_changed_at) or user.password_changed_at,
    )


def token_public(row: ApiToken, user: str) -> TokenPublic:
    assert row.id is not None
    return TokenPublic(
        id=row.id,
        user=user,
        name=row.name,
        created_at=as_utc(row.created_at) or row.created_at,
        expires_at=as_utc(row.expires_at),
        last_used_at=as_utc(row.last_used_at),
        revoked=row.revoked_at is not None,
    )


def _own_user(session: Session, who: Principal) -> User | None:
    return session.get(User, who.user_id) if who.user_id is not None else None


@router.get("/me", dependencies=[_ANYONE])
def me(session: SessionDep, who: PrincipalDep) -> Me:
    user = _own_user(session, who)
    return Me(name=who.name, role=who.role, via=who.via, user=user_public(user) if user else None)


@router.post("/me/password", status_code=204, dependencies=[_ANYONE])
def change_password(
    body: PasswordChange, session: SessionDep, state: StateDep, who: PrincipalDep
) -> None:
    """Change your own password (the current one is required); ends your other sessions."""
    user = _own_user(session, who)
    if user is None:
        raise InvalidInput("the admin token has no password: sign in as a user", field="current")
    if not verify(user.password_hash, body.current):
        raise Forbidden("the current password is wrong")
    update_user(
        session, user.name, password=body.new, actor=who.name, source=who.source, now=state.clock()
    )
    session.commit()


@router.get("/users", dependencies=[_ADMIN])
def get_users(session: SessionDep) -> list[UserPublic]:
    return [user_public(u) for u in list_users(session)]


@router.post("/users", status_code=201, dependencies=[_ADMIN])
def post_user(
    body: UserCreate, session: SessionDep, state: StateDep, who: PrincipalDep
) -> UserPublic:
    """A new user; 409 when the name is taken, 422 for a short password."""
    user = create_user(
        session,
        name=body.name,
        password=body.password,
        role=body.role,
        actor=who.name,
        source=who.source,
        now=state.clock(),
    )
    session.commit()
    return user_public(user)


@router.get("/users/{name}", dependencies=[_ADMIN])
def get_one(name: str, session: SessionDep) -> UserPublic:
    return user_public(get_user(session, name))


@router.patch("/users/{name}", dependencies=[_ADMIN])
def patch_user(
    name: str, body: UserUpdate, session: SessionDep, state: StateDep, who: PrincipalDep
) -> UserPublic:
    """Change a role, a password or disable; 409 when it would leave no enabled admin."""
    user = update_user(
        session,
        name,
        role=body.role,
        password=body.password,
        disabled=body.disabled,
        actor=who.name,
        source=who.source,
        now=state.clock(),
    )
    session.commit()
    return user_public(user)


@tokens_router.get("", dependencies=[_ANYONE])
def get_tokens(
    session: SessionDep,
    who: PrincipalDep,
    everyone: Annotated[bool, Query(alias="all")] = False,
) -> list[TokenPublic]:
    """Your tokens (admins: everyone's with ``?all=true``), newest first, without secrets."""
    if everyone and who.role != Role.ADMIN:
        raise Forbidden("only admins can list everyone's tokens")
    user = _own_user(session, who)
    if user is None and not everyone:
        return []
    return [
        token_public(row, name) for row, name in list_tokens(session, None if everyone else user)
    ]


@tokens_router.post("", status_code=201, dependencies=[_ANYONE])
def post_token(
    body: TokenCreate, session: SessionDep, state: StateDep, who: PrincipalDep
) -> TokenCreated:
    """A new token for you (admins: for ``user``); its secret is in this answer only."""
    if body.user is not None:
        if who.role != Role.ADMIN:
            raise Forbidden("only admins can make tokens for other users")
        user: User | None = get_user(session, body.user)
    else:
        user = _own_user(session, who)
        if user is None:
            raise InvalidInput("the admin token has no user: name one in 'user'", field="user")
    assert user is not None
    now = state.clock()
    expires = now + timedelta(seconds=body.expires_in_s) if body.expires_in_s else None
    row, secret = create_token(
        session,
        user,
        name=body.name,
        expires_at=expires,
        actor=who.name,
        source=who.source,
        now=now,
    )
    session.commit()
    return TokenCreated(**token_public(row, user.name).model_dump(), secret=secret)


@tokens_router.delete("/{token_id}", dependencies=[_ANYONE])
def delete_token(
    token_id: int, session: SessionDep, state: StateDep, who: PrincipalDep
) -> TokenPublic:
    """Revoke one of your tokens (admins: anyone's); revoking twice changes nothing."""
    owner = None if who.role == Role.ADMIN else _own_user(session, who)
    row = revoke_token(
        session, token_id, owner=owner, actor=who.name, source=who.source, now=state.clock()
    )
    session.commit()
    user = session.get(User, row.user_id)
    return token_public(row, user.name if user else "")
