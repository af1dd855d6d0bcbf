"""Enrollment tokens as the dashboard makes, lists and revokes them.

The same steps as ``POST`` and ``DELETE /api/v1/tokens`` (:mod:`fleet.api.tokens`, whose
logic is inline in its routes): a token's group must exist, only the SHA-256 of its
secret is stored, the secret is returned once, and creating and revoking are audited
in the same transaction (``enrollment_token.create``, ``enrollment_token.revoke``).
:func:`create_token` and :func:`revoke_token` are those steps as functions, so the
API could call them too. The caller commits.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import ValidationError
from sqlmodel import Session, col, select

from fleet.api.audited import audit_action
from fleet.api.present import token_public
from fleet.api.schemas import TokenCreate, TokenPublic
from fleet.auth import Principal
from fleet.errors import InvalidInput, NotFound
from fleet.tables import EnrollmentToken, Group
from fleet.tokens import hash_secret, new_secret, new_token_id, parse_duration

__all__ = ["create_token", "list_tokens", "parse_token_form", "revoke_token"]


def parse_token_form(
    group: str, uses: str, expires: str, note: str
) -> tuple[TokenCreate | None, dict[str, str]]:
    """The form's fields as the API's body, or the errors by field."""
    errors: dict[str, str] = {}
    expires_in_s: float | None = None
    try:
        duration = parse_duration(expires or "24h")
        expires_in_s = None if duration is None else duration.total_seconds()
    except ValueError as exc:
        errors["expires"] = str(exc)
    body = {"group": group or None, "uses": uses.strip() or "1", "note": note.strip()}
    try:
        parsed = TokenCreate.model_validate(body | {"expires_in_s": expires_in_s})
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            name = str(error["loc"][0]) if error["loc"] else "form"
            errors.setdefault("expires" if name == "expires_in_s" else name, error["msg"])
        return None, errors
    return (None, errors) if errors else (parsed, {})


def create_token(
    session: Session, body: TokenCreate, who: Principal, now: datetime
) -> tuple[EnrollmentToken, str]:
    """A new token and its secret (shown once), audited; 422 naming ``group`` if it is unknown."""
    if body.group is not None and session.get(Group, body.group) is None:
        raise InvalidInput(
            f"no group {body.group!r}: create it first (edgefleet groups create {body.group})",
            field="group",
        )
    secret = new_secret()
    token = EnrollmentToken(
        id=new_token_id(),
        secret_sha256=hash_secret(secret),
        group=body.group,
        uses_total=body.uses,
        uses_left=body.uses,
        created_at=now,
        expires_at=None
        if body.expires_in_s is None
        else now + timedelta(seconds=body.expires_in_s),
        note=body.note,
    )
    session.add(token)
    audit_action(
        session, who, now, "enrollment_token.create", f"token:{token.id}",
        group=body.group, uses=body.uses, expires_in_s=body.expires_in_s,
    )  # fmt: skip
    return token, secret


def revoke_token(session: Session, token_id: str, who: Principal, now: datetime) -> EnrollmentToken:
    """Revoke a token so no further device can enroll with it; idempotent, audited once."""
    token = session.get(EnrollmentToken, token_id)
    if token is None:
        raise NotFound(f"no enrollment token {token_id!r}")
    if token.revoked_at is None:
        token.revoked_at = now
        session.add(token)
        audit_action(session, who, now, "enrollment_token.revoke", f"token:{token.id}")
    return token


def list_tokens(session: Session, now: datetime, limit: int = 500) -> list[TokenPublic]:
    """The newest tokens, without secrets."""
    rows = session.exec(
        select(EnrollmentToken).order_by(col(EnrollmentToken.created_at).desc()).limit(limit)
    ).all()
    return [token_public(t, now) for t in rows]
