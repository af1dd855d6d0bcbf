"""Policies as the dashboard shows and edits them: a body from text, chains for people.

A new version is typed as TOML (or JSON), with the structure of a policy file
(docs/policies.md: ``description``, ``breaker``, ``chains``; the name and version are
the controller's): :func:`policy_body` reads it, refusing what the file format
refuses, and :func:`fleet.policy.store.create_policy` validates it with the agent's
own model. The rest is pure presentation of :class:`PolicyDetail`.
"""

from __future__ import annotations

import json
import tomllib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from fleet.errors import InvalidInput
from fleet.policy.views import DeviceStatus, PolicySummary
from fleet.tables import Device, PolicyAssignment, PolicyRow, as_utc

__all__ = [
    "BODY_KEYS",
    "ChainView",
    "assignments_by_policy",
    "chain_views",
    "enforcement_counts",
    "policy_body",
    "policy_rows",
    "status_counts",
]

BODY_KEYS = frozenset({"description", "breaker", "chains"})


def policy_body(text: str, name: str) -> dict[str, Any]:
    """The body typed in the form (TOML, or JSON when it starts with ``{``); 422 naming ``body``."""
    stripped = text.strip()
    if not stripped:
        raise InvalidInput("type the policy: its breaker and chains, as TOML or JSON", field="body")
    kind = "JSON" if stripped.startswith("{") else "TOML"
    try:
        data = json.loads(stripped) if kind == "JSON" else tomllib.loads(stripped)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise InvalidInput(f"this is not valid {kind}: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise InvalidInput("the policy must be a table (an object)", field="body")
    if "version" in data:
        raise InvalidInput("leave 'version' out: the controller numbers versions", field="body")
    if data.pop("name", name) != name:
        raise InvalidInput(f"the text names another policy than {name!r}", field="body")
    unknown = sorted(set(data) - BODY_KEYS)
    if unknown:
        raise InvalidInput(
            f"unknown keys {', '.join(unknown)} (use description, breaker, chains)", field="body"
        )
    for key in ("breaker", "chains"):
        if not isinstance(data.get(key, {}), dict):
            raise InvalidInput(f"'{key}' must be a table (an object)", field=f"body.{key}")
    if not isinstance(data.get("description", ""), str):
        raise InvalidInput("'description' must be text", field="description")
    return data


@dataclass(frozen=True)
class ChainView:
    """One served model's chain: its tiers in order, for people."""

    served: str
    tiers: list[str]  # "gemma3-270m-q2 [out_of_memory, load_failed]", "cache (minilm)", ...
    retry_after: int
    own_breaker: bool


def _tier(tier: dict[str, Any]) -> str:
    when = f" [{', '.join(tier['when'])}]" if tier.get("when") else ""
    kind = tier.get("kind", "model")
    if kind == "model":
        cpu = " (cpu copy)" if tier.get("device") == "cpu" else ""
        return f"{tier.get('model')}{cpu}{when}"
    if kind == "cache":
        return f"cache ({tier.get('embedder')}, similarity {tier.get('threshold', 0.9)}){when}"
    rules = len(tier.get("rules", []))
    default = " + a default answer" if tier.get("default") else ""
    return f"rules ({rules} rule{'s' if rules != 1 else ''}{default}){when}"


def chain_views(body: dict[str, Any]) -> list[ChainView]:
    """The policy's chains, by served model."""
    chains = body.get("chains") or {}
    return [
        ChainView(
            served=served,
            tiers=[_tier(t) for t in chain.get("tiers", [])],
            retry_after=int(chain.get("retry_after", 30)),
            own_breaker=chain.get("breaker") is not None,
        )
        for served, chain in sorted(chains.items())
    ]


def status_counts(devices: Sequence[DeviceStatus]) -> dict[str, int]:
    """Assigned devices by status: enforcing, pending, ineligible, rejected."""
    counts = Counter(d.status for d in devices)
    return {s: counts.get(s, 0) for s in ("enforcing", "pending", "rejected", "ineligible")}


def assignments_by_policy(session: Session) -> dict[str, list[PolicyAssignment]]:
    """Where each policy is assigned (the table holds a row per group or device so assigned)."""
    found: dict[str, list[PolicyAssignment]] = {}
    rows = session.exec(
        select(PolicyAssignment).order_by(
            col(PolicyAssignment.policy), col(PolicyAssignment.scope), col(PolicyAssignment.target)
        )
    ).all()
    for row in rows:
        found.setdefault(row.policy, []).append(row)
    return found


def enforcement_counts(session: Session) -> dict[str, tuple[int, int]]:
    """Per policy: devices it applies to, and those reporting its digest; counted in SQL.

    A device's own assignment wins over its group's, and a device is enforcing when
    the policy it reports has the digest of the version assigned to it, as
    :func:`fleet.policy.views.policy_summaries` decides it device by device.
    """
    own, grp = aliased(PolicyAssignment), aliased(PolicyAssignment)
    mine = col(own.policy).is_not(None)
    policy = sa.case((mine, col(own.policy)), else_=col(grp.policy))
    version = sa.case((mine, col(own.version)), else_=col(grp.version))
    reported = col(Device.reported)["policy"]["digest"].as_string()
    enforcing = sa.case((reported == col(PolicyRow.digest), 1), else_=0)
    rows = session.exec(
        select(policy, func.count(), func.sum(enforcing))
        .select_from(Device)
        .outerjoin(own, sa.and_(col(own.scope) == "device", col(own.target) == col(Device.id)))
        .outerjoin(grp, sa.and_(col(grp.scope) == "group", col(grp.target) == col(Device.group)))
        .join(
            PolicyRow,
            sa.and_(col(PolicyRow.name) == policy, col(PolicyRow.version) == version),
        )
        .where(col(Device.revoked_at).is_(None))
        .group_by(policy)
    ).all()
    return {str(name): (int(count), int(enforced or 0)) for name, count, enforced in rows}


def policy_rows(session: Session) -> list[PolicySummary]:
    """The API's :func:`~fleet.policy.views.policy_summaries`, without loading every device."""
    latest = session.exec(
        select(PolicyRow.name, func.max(PolicyRow.version), func.count())
        .group_by(col(PolicyRow.name))
        .order_by(col(PolicyRow.name))
    ).all()
    assignments = dict(
        session.exec(
            select(PolicyAssignment.policy, func.count()).group_by(col(PolicyAssignment.policy))
        ).all()
    )
    counts = enforcement_counts(session)
    summaries = []
    for name, version, versions in latest:
        row = session.exec(
            select(PolicyRow).where(col(PolicyRow.name) == name, col(PolicyRow.version) == version)
        ).one()
        assigned, enforcing = counts.get(name, (0, 0))
        summaries.append(
            PolicySummary(
                name=name,
                versions=int(versions),
                assignments=int(assignments.get(name, 0)),
                devices_assigned=assigned,
                devices_enforcing=enforcing,
                version=row.version,
                digest=row.digest,
                description=row.description,
                created_by=row.created_by,
                created_at=as_utc(row.created_at) or row.created_at,
            )
        )
    return summaries
