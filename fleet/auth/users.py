"""Users: create, change, list; never lose the last admin.

Every change is audited in the same transaction (actor and where it came from), and
a change of role or password, or disabling, ends the user's browser sessions, so a
demoted admin's open tab loses its rights at its next request.
"""

from __future__ import annotations

import re
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select

from fleet import audit
from fleet.auth.passwords import hash_password
from fleet.auth.roles import Role
from fleet.errors import Conflict, InvalidInput, NotFound
from fleet.tables import User, WebSession

__all__ = [
    "NAME_PATTERN",
    "check_name",
    "create_user",
    "end_sessions",
    "get_user",
    "has_admin",
    "list_users",
    "update_user",
]

NAME_PATTERN = r"^[a-z0-9][a-z0-9._@-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            "use 1-64 lower-case letters, digits, '.', '_', '@' or '-', starting with a "
            "letter or digit",
            field="name",
        )
    return name


def has_admin(session: Session) -> bool:
    """Whether any enabled admin exists: the dashboard serves nobody until one does."""
    query = select(User.id).where(User.role == Role.ADMIN, col(User.disabled).is_(False))
    return session.exec(query.limit(1)).first() is not None


def get_user(session: Session, name: str) -> User:
    user = session.exec(select(User).where(User.name == name)).first()
    if user is None:
        raise NotFound(f"no user {name!r}")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.exec(select(User).order_by(col(User.name))))


def create_user(
    session: Session,
    *,
    name: str,
    password: str,
    role: Role,
    actor: str,
    source: str,
    now: datetime,
) -> User:
    """Add a user to the caller's transaction; 409 if the name is taken."""
    check_name(name)
    if session.exec(select(User.id).where(User.name == name)).first() is not None:
        raise Conflict(f"user {name!r} exists: change it with `edgefleet users set {name}`")
    user = User(
        name=name,
        role=role,
        password_hash=hash_password(password),
        created_by=actor[:64],
        created_at=now,
        password_changed_at=now,
    )
    session.add(user)
    session.flush()
    _audit(session, "user.create", name, actor, source, now, role=role.value)
    return user


def update_user(
    session: Session,
    name: str,
    *,
    role: Role | None = None,
    password: str | None = None,
    disabled: bool | None = None,
    actor: str,
    source: str,
    now: datetime,
) -> User:
    """Change a user's role, password or state; refuses to leave no enabled admin."""
    user = get_user(session, name)
    changed: dict[str, object] = {}
    if role is not None and role != user.role:
        changed["role"] = role.value
        user.role = role
    if disabled is not None and disabled != user.disabled:
        changed["disabled"] = disabled
        user.disabled = disabled
    if password is not None:
        user.password_hash = hash_password(password)
        user.password_changed_at = now
        changed["password"] = "changed"  # noqa: S105  (never the password itself)
    if not changed:
        return user
    session.add(user)
    session.flush()
    if not has_admin(session):
        raise Conflict(f"{name!r} is the last enabled admin: make another user admin first")
    ended = end_sessions(session, user, now)
    _audit(session, "user.update", name, actor, source, now, sessions_ended=ended, **changed)
    return user


def end_sessions(session: Session, user: User, now: datetime) -> int:
    """Revoke every open browser session of ``user``; how many there were."""
    result = session.execute(
        sa.update(WebSession)
        .where(col(WebSession.user_id) == user.id, col(WebSession.revoked_at).is_(None))
        .values(revoked_at=now)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _audit(
    session: Session,
    action: str,
    name: str,
    actor: str,
    source: str,
    now: datetime,
    **data: object,
) -> None:
    audit.record(
        session,
        at=now,
        actor=actor,
        action=action,
        subject=f"user:{name}",
        source=source,
        data=data,
    )
