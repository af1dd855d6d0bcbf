"""The rule set an admin tunes: one ``alert_rules`` row per kind they changed.

A kind without a row is enabled with its defaults. A row holds ``enabled`` and only
the parameters the admin set (validated over the defaults when set, and again when
read: a row a later version finds invalid is logged and its defaults used, so one bad
row never stops the other rules).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from fleet.alerts.params import Params, RuleKind, effective, kind_of
from fleet.audit import record
from fleet.errors import Conflict, InvalidInput
from fleet.tables import AlertRule, as_utc

__all__ = ["Rule", "load_rules", "set_rule"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """One rule as it runs: enabled or not, its parameters, and who changed it."""

    kind: RuleKind
    enabled: bool
    params: Params  # what the rule runs with: the defaults, overridden
    overrides: dict[str, Any]  # the parameters an admin set
    defaults: Params
    updated_by: str | None  # None: never changed
    updated_at: datetime | None


def _rule(kind: RuleKind, default: Params, row: AlertRule | None) -> Rule:
    if row is None:
        return Rule(kind, True, default, {}, default, None, None)
    overrides = dict(row.params or {})
    try:
        params = effective(kind, default, overrides)
    except InvalidInput as exc:
        log.error("alert rule %s: stored parameters are invalid (%s); using defaults", kind, exc)
        params = default
    return Rule(
        kind, row.enabled, params, overrides, default, row.updated_by, as_utc(row.updated_at)
    )


def load_rules(session: Session, defaults: Mapping[RuleKind, Params]) -> dict[RuleKind, Rule]:
    """Every rule, in :class:`RuleKind` order."""
    rows = {row.kind: row for row in session.exec(select(AlertRule)).all()}
    return {kind: _rule(kind, defaults[kind], rows.get(kind.value)) for kind in RuleKind}


def set_rule(
    session: Session,
    name: str,
    *,
    enabled: bool,
    overrides: Mapping[str, Any],
    actor: str,
    now: datetime,
    defaults: Mapping[RuleKind, Params],
    source: str = "",
) -> Rule:
    """Replace a rule's settings (``{}``: its defaults), audited as ``alert_rule.updated``.

    ``NotFound`` for an unknown kind; ``InvalidInput`` naming ``params.<field>``.
    """
    kind = kind_of(name)
    params = effective(kind, defaults[kind], overrides)
    stored = {key: getattr(params, key) for key in overrides}  # as validated: 30 -> 30.0
    row = session.get(AlertRule, kind.value)
    if row is None:
        row = AlertRule(kind=kind.value, updated_by=actor, updated_at=now)
    row.enabled, row.params, row.updated_by, row.updated_at = enabled, stored, actor, now
    session.add(row)
    record(
        session,
        at=now,
        actor=actor,
        action="alert_rule.updated",
        source=source,
        subject=f"alert_rule:{kind.value}",
        reason=f"{kind.value} {'enabled' if enabled else 'disabled'}",
        data={"enabled": enabled, "params": stored},
    )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"the {kind.value} rule was changed at the same time: try again") from None
    return _rule(kind, defaults[kind], row)
