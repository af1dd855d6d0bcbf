"""Policy versions: created validated and numbered by the controller, never changed after.

An admin gives a name, a description and the body (breaker and chains); the controller
numbers it (the name's highest version plus one), validates it with the same model the
agent uses (:class:`models.policy.FallbackPolicy`), and stores its JSON with its digest.
An invalid body is :class:`fleet.errors.InvalidInput` naming the field, dotted.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet import audit
from fleet.errors import Conflict, InvalidInput, NotFound
from fleet.tables import PolicyRow
from models.policy import FallbackPolicy, policy_digest

__all__ = ["create_policy", "get_policy", "policy_of", "subject", "validate_policy"]

_TIER_KINDS = {"model", "cache", "rules"}


def subject(name: str) -> str:
    """The audit log's subject for a policy."""
    return f"policy:{name}"


def get_policy(session: Session, name: str, version: int | None = None) -> PolicyRow:
    """Version ``version`` of the named policy, or its latest when None; ``NotFound`` otherwise."""
    query = select(PolicyRow).where(col(PolicyRow.name) == name)
    if version is not None:
        row = session.exec(query.where(col(PolicyRow.version) == version)).first()
        if row is None:
            known = _versions(session, name)
            if not known:
                raise NotFound(f"no policy {name!r}")
            listed = ", ".join(str(v) for v in known)
            raise NotFound(f"policy {name!r} has no version {version} (it has {listed})")
        return row
    latest = session.exec(query.order_by(col(PolicyRow.version).desc())).first()
    if latest is None:
        raise NotFound(f"no policy {name!r}")
    return latest


def _versions(session: Session, name: str) -> list[int]:
    return list(
        session.exec(
            select(PolicyRow.version)
            .where(col(PolicyRow.name) == name)
            .order_by(col(PolicyRow.version))
        )
    )


def policy_of(row: PolicyRow) -> FallbackPolicy:
    """The stored version as the policy the agent receives."""
    return FallbackPolicy.model_validate(row.body)


def validate_policy(
    name: str, version: int, breaker: Mapping[str, Any], chains: Mapping[str, Any]
) -> FallbackPolicy:
    """The policy, or ``InvalidInput`` naming the first offending field, dotted."""
    raw = {"name": name, "version": version, "breaker": dict(breaker), "chains": dict(chains)}
    try:
        return FallbackPolicy.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = _dotted(first["loc"]) or _self_fallback_field(chains)
        raise InvalidInput(str(first["msg"]).removeprefix("Value error, "), field=field) from None


def _dotted(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for i, part in enumerate(loc):
        # pydantic puts the tier kind in its path ("tiers.0.model.model"): drop it.
        if part in _TIER_KINDS and i > 0 and isinstance(loc[i - 1], int):
            continue
        parts.append(str(part))
    return ".".join(parts)


def _self_fallback_field(chains: Mapping[str, Any]) -> str | None:
    """Where a chain's model tier names the model it serves (the one whole-policy check)."""
    for served, chain in chains.items():
        tiers = chain.get("tiers", []) if isinstance(chain, Mapping) else []
        for i, tier in enumerate(tiers):
            if (
                isinstance(tier, Mapping)
                and tier.get("kind", "model") == "model"
                and tier.get("model") == served
                and tier.get("device") is None
            ):
                return f"chains.{served}.tiers.{i}.model"
    return None


def create_policy(
    session: Session,
    *,
    name: str,
    description: str,
    breaker: Mapping[str, Any],
    chains: Mapping[str, Any],
    actor: str,
    now: datetime,
    source: str = "",
) -> PolicyRow:
    """Validate and store the next version of ``name``, with its audit entry; the caller commits.

    ``Conflict`` when another admin stored the same version first (retry gets the next).
    """
    latest = session.exec(
        select(func.max(PolicyRow.version)).where(col(PolicyRow.name) == name)
    ).one()
    version = int(latest or 0) + 1
    policy = validate_policy(name, version, breaker, chains)
    body = policy.model_dump(mode="json")
    row = PolicyRow(
        name=name,
        version=version,
        body=body,
        digest=policy_digest(policy),
        description=description,
        created_by=actor,
        created_at=now,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"policy {name!r} version {version} was just created: try again") from None
    audit.record(
        session,
        at=now,
        actor=actor,
        action="policy.create",
        source=source,
        subject=subject(name),
        reason=description,
        data={"version": version, "digest": row.digest},
    )
    return row
