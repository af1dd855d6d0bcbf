"""Enrollment tokens: create one or a batch (secrets are shown once), list, revoke.

A token names an existing group or none: a typo in ``--group`` should fail loudly
rather than quietly start a new group. Revoking keeps the row, so devices still
show which token enrolled them.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter
from sqlmodel import col, select

from fleet.api.audited import audit_action
from fleet.api.deps import PrincipalDep, SessionDep, StateDep, authorize
from fleet.api.present import token_public
from fleet.api.schemas import (
    TokenBatchCreate,
    TokenBatchCreated,
    TokenCreate,
    TokenCreated,
    TokenPublic,
    TokenSecret,
)
from fleet.auth import Role
from fleet.errors import InvalidInput, NotFound
from fleet.tables import EnrollmentToken, Group
from fleet.tokens import hash_secret, new_secret, new_token_id

__all__ = ["router"]

router = APIRouter(
    prefix="/api/v1/tokens",
    tags=["tokens"],
    dependencies=[authorize(read=Role.OPERATOR, write=Role.ADMIN)],
)


def _check_group(session: SessionDep, group: str | None) -> None:
    if group is not None and session.get(Group, group) is None:
        raise InvalidInput(f"no group {group!r}: create it first (edgefleet groups create {group})")


def _new_tokens(body: TokenCreate, now: datetime, count: int) -> list[tuple[EnrollmentToken, str]]:
    """``count`` new rows and their secrets; ids distinct within the batch."""
    expires_at = None if body.expires_in_s is None else now + timedelta(seconds=body.expires_in_s)
    ids: dict[str, None] = {}
    while len(ids) < count:
        ids[new_token_id()] = None
    made = []
    for token_id in ids:
        secret = new_secret()
        row = EnrollmentToken(
            id=token_id,
            secret_sha256=hash_secret(secret),
            group=body.group,
            uses_total=body.uses,
            uses_left=body.uses,
            created_at=now,
            expires_at=expires_at,
            note=body.note,
        )
        made.append((row, secret))
    return made


@router.post("", status_code=201)
def create_token(
    body: TokenCreate, session: SessionDep, state: StateDep, who: PrincipalDep
) -> TokenCreated:
    """A new token; the response is the only place its secret ever appears."""
    _check_group(session, body.group)
    now = state.clock()
    ((token, secret),) = _new_tokens(body, now, 1)
    session.add(token)
    audit_action(
        session,
        who,
        now,
        "enrollment_token.create",
        f"token:{token.id}",
        group=body.group,
        uses=body.uses,
        expires_in_s=body.expires_in_s,
    )
    session.commit()
    public = token_public(token, now)
    return TokenCreated(
        **public.model_dump(), secret=secret, fleet_url=state.settings.resolved_public_url
    )


@router.post("/batch", status_code=201)
def create_token_batch(
    body: TokenBatchCreate, session: SessionDep, state: StateDep, who: PrincipalDep
) -> TokenBatchCreated:
    """``count`` tokens in one transaction and one audit entry, for flashing a batch of devices.

    The response is the only place their secrets ever appear; ``tokens`` keeps creation
    order, so a file written from it numbers them stably.
    """
    _check_group(session, body.group)
    now = state.clock()
    made = _new_tokens(body, now, body.count)
    session.add_all([row for row, _ in made])
    ids = [row.id for row, _ in made]
    audit_action(
        session,
        who,
        now,
        "enrollment_token.create_batch",
        f"token-batch:{ids[0]}",  # a batch is named by its first token
        count=body.count,
        group=body.group,
        uses=body.uses,
        expires_in_s=body.expires_in_s,
        ids=ids,
    )
    session.commit()
    return TokenBatchCreated(
        fleet_url=state.settings.resolved_public_url,
        tokens=[
            TokenSecret(**token_public(row, now).model_dump(), secret=secret)
            for row, secret in made
        ],
    )


@router.get("")
def list_tokens(session: SessionDep, state: StateDep) -> list[TokenPublic]:
    """Every token, newest first, without secrets."""
    now = state.clock()
    tokens = session.exec(
        select(EnrollmentToken).order_by(col(EnrollmentToken.created_at).desc())
    ).all()
    return [token_public(t, now) for t in tokens]


def _token(session: SessionDep, token_id: str) -> EnrollmentToken:
    token = session.get(EnrollmentToken, token_id)
    if token is None:
        raise NotFound(f"no enrollment token {token_id!r}")
    return token


@router.get("/{token_id}")
def get_token(token_id: str, session: SessionDep, state: StateDep) -> TokenPublic:
    return token_public(_token(session, token_id), state.clock())


@router.delete("/{token_id}")
def revoke_token(
    token_id: str, session: SessionDep, state: StateDep, who: PrincipalDep
) -> TokenPublic:
    """Revoke a token so no further device can enroll with it; idempotent."""
    token = _token(session, token_id)
    now = state.clock()
    if token.revoked_at is None:
        token.revoked_at = now
        session.add(token)
        audit_action(session, who, now, "enrollment_token.revoke", f"token:{token.id}")
        session.commit()
    return token_public(token, now)
