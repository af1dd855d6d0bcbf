"""Alerts as the dashboard pages them, and the rule set as a form.

Open alerts come first (few, by nature); cleared ones are the history, paged in SQL.
A rule's form shows each parameter with its default: a blank field means "the
default" (so a default changed later still applies), a typed value is the admin's
override, as the API's ``PUT /api/v1/alerts/rules/<kind>`` takes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet.alerts import Rule
from fleet.tables import Alert

__all__ = [
    "ParamField",
    "cleared_page",
    "open_count",
    "overrides_of",
    "param_fields",
    "severity_badge",
]


def severity_badge(severity: str) -> str:
    return {"error": "bad", "warning": "warn", "critical": "bad"}.get(severity, "")


def open_count(session: Session) -> int:
    return int(
        session.exec(
            select(func.count()).select_from(Alert).where(col(Alert.cleared_at).is_(None))
        ).one()
    )


def cleared_page(session: Session, page: int, per_page: int) -> tuple[list[Alert], int]:
    """One page (from 1) of cleared alerts, newest first, and how many there are."""
    cleared = col(Alert.cleared_at).is_not(None)
    total = session.exec(select(func.count()).select_from(Alert).where(cleared)).one()
    rows = session.exec(
        select(Alert)
        .where(cleared)
        .order_by(col(Alert.raised_at).desc(), col(Alert.id).desc())
        .offset((max(page, 1) - 1) * per_page)
        .limit(per_page)
    ).all()
    return list(rows), int(total)


@dataclass(frozen=True)
class ParamField:
    """One parameter of a rule, as its form shows it."""

    name: str
    boolean: bool
    default: Any
    override: Any | None  # None: the default applies
    value: Any  # what the rule runs with


def param_fields(rule: Rule) -> list[ParamField]:
    defaults = rule.defaults.model_dump()
    running = rule.params.model_dump()
    return [
        ParamField(
            name=name,
            boolean=isinstance(default, bool),
            default=default,
            override=rule.overrides.get(name),
            value=running[name],
        )
        for name, default in defaults.items()
    ]


def overrides_of(form: Mapping[str, str], rule: Rule) -> dict[str, Any]:
    """The parameters the form sets (``param-<name>``); blank or "default": not overridden."""
    found: dict[str, Any] = {}
    for name, default in rule.defaults.model_dump().items():
        text = form.get(f"param-{name}", "").strip()
        if not text or text == "default":
            continue
        if isinstance(default, bool):
            found[name] = text == "true"
        else:
            found[name] = text  # validated (and converted) by the rule's own model
    return found
