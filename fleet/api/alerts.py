"""Alerts: list and acknowledge them, tune their rules, set the webhook they are posted to.

The controller raises and clears alerts on its own (:mod:`fleet.alerts`); admins
acknowledge them (an event alert clears then, a condition alert stays open while it
holds), enable, disable and tune the rules, and may name a webhook. Every change is
in the audit log: an alert's under its subject (``GET /api/v1/audit?subject=...``), a
rule's under ``alert_rule:<kind>``, the webhook's under ``alert_webhook``. The acting
admin may name themselves in ``X-Edgefleet-Actor``; the audit log records
``admin:<name>``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from fleet import alerts
from fleet.api.deps import PrincipalDep, SessionDep, StateDep, authorize
from fleet.auth import Role
from fleet.tables import Alert, as_utc

__all__ = [
    "AlertList",
    "AlertPublic",
    "RuleList",
    "RulePublic",
    "RuleUpdate",
    "WebhookDeleted",
    "WebhookPublic",
    "WebhookTest",
    "router",
]

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"], dependencies=[authorize()])
_ADMIN = authorize(read=Role.VIEWER, write=Role.ADMIN)  # the rule set and the webhook


class AlertPublic(BaseModel):
    """One alert; ``data`` holds the numbers behind its message."""

    id: int
    kind: str  # fleet.alerts.RuleKind
    subject: str  # "group:<name>", "device:<id>", "rollout:<id>", "tuf:<role>"
    severity: str  # "info", "warning", "error"
    state: Literal["open", "cleared"]
    event: bool  # cleared by an acknowledgement, not by its condition
    message: str
    data: dict[str, Any]
    raised_at: datetime
    updated_at: datetime  # its numbers last changed
    cleared_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None


class AlertList(BaseModel):
    """Alerts, newest first."""

    items: list[AlertPublic]


class RulePublic(BaseModel):
    """One rule: enabled or not, the parameters it runs with, the ones an admin set."""

    kind: str
    enabled: bool
    event: bool
    params: dict[str, Any]
    overrides: dict[str, Any]
    defaults: dict[str, Any]
    updated_by: str | None
    updated_at: datetime | None


class RuleList(BaseModel):
    """Every rule, in a fixed order."""

    items: list[RulePublic]


class RuleUpdate(BaseModel):
    """A rule's new settings, in full: ``params`` holds only what differs from the defaults."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    params: dict[str, Any] = {}


class WebhookPublic(BaseModel):
    """The webhook (never its secret) and what it is still owed."""

    url: str
    secret_set: bool
    updated_by: str
    updated_at: datetime
    pending: int
    oldest_pending_at: datetime | None
    attempts: int
    last_error: str


class WebhookDeleted(BaseModel):
    """What removing the webhook dropped."""

    dropped: int  # undelivered alert changes dropped with it


class WebhookTest(BaseModel):
    """How the test POST went."""

    delivered: bool
    status: int | None
    error: str


def _public(row: Alert) -> AlertPublic:
    assert row.id is not None
    return AlertPublic(
        id=row.id,
        kind=row.kind,
        subject=row.subject,
        severity=row.severity,
        state="open" if row.cleared_at is None else "cleared",
        event=alerts.is_event(row.kind),
        message=row.message,
        data=row.data or {},
        raised_at=as_utc(row.raised_at) or row.raised_at,
        updated_at=as_utc(row.updated_at) or row.updated_at,
        cleared_at=as_utc(row.cleared_at),
        acknowledged_at=as_utc(row.acknowledged_at),
        acknowledged_by=row.acknowledged_by,
    )


def _rule(rule: alerts.Rule) -> RulePublic:
    return RulePublic(
        kind=rule.kind.value,
        enabled=rule.enabled,
        event=rule.kind in alerts.EVENT_KINDS,
        params=rule.params.model_dump(),
        overrides=rule.overrides,
        defaults=rule.defaults.model_dump(),
        updated_by=rule.updated_by,
        updated_at=rule.updated_at,
    )


def _webhook(view: alerts.WebhookView) -> WebhookPublic:
    return WebhookPublic(**vars(view))


@router.get("")
def get_alerts(
    session: SessionDep,
    state: Annotated[
        alerts.AlertState, Query(description="open: not cleared; all: cleared too")
    ] = "open",
    kind: Annotated[alerts.RuleKind | None, Query(description="only this kind")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> AlertList:
    """The open alerts (or all of them), newest first."""
    return AlertList(
        items=[_public(row) for row in alerts.list_alerts(session, state, limit, kind)]
    )


@router.post("/{alert_id}/acknowledge")
def acknowledge(
    alert_id: int, session: SessionDep, state: StateDep, who: PrincipalDep
) -> AlertPublic:
    """Acknowledge an open alert: an event clears, a condition stays open; 409 if cleared."""
    row = alerts.acknowledge(
        session, alert_id, actor=who.name, now=state.clock(), source=who.source
    )
    return _public(row)


@router.get("/rules")
def get_rules(session: SessionDep, state: StateDep) -> RuleList:
    """Every rule, with its parameters, defaults and who changed it last."""
    rules = alerts.load_rules(session, alerts.defaults_of(state.settings))
    return RuleList(items=[_rule(rule) for rule in rules.values()])


@router.put("/rules/{kind}", dependencies=[_ADMIN])
def put_rule(
    kind: str, body: RuleUpdate, session: SessionDep, state: StateDep, who: PrincipalDep
) -> RulePublic:
    """Replace a rule's settings; 404 for an unknown kind, 422 naming ``params.<field>``."""
    rule = alerts.set_rule(
        session,
        kind,
        enabled=body.enabled,
        overrides=body.params,
        actor=who.name,
        now=state.clock(),
        defaults=alerts.defaults_of(state.settings),
        source=who.source,
    )
    return _rule(rule)


@router.get("/webhook", dependencies=[authorize(read=Role.ADMIN)])  # its URL may hold a key
def get_webhook(session: SessionDep) -> WebhookPublic:
    """The webhook and its outbox; 404 when none is set."""
    return _webhook(alerts.get_webhook(session))


@router.put("/webhook", dependencies=[_ADMIN])
def put_webhook(
    body: alerts.WebhookSettings, session: SessionDep, state: StateDep, who: PrincipalDep
) -> WebhookPublic:
    """Set the webhook (http or https) and its optional secret (16 to 256 characters)."""
    view = alerts.set_webhook(session, body, actor=who.name, now=state.clock(), source=who.source)
    return _webhook(view)


@router.delete("/webhook", dependencies=[_ADMIN])
def delete_webhook(session: SessionDep, state: StateDep, who: PrincipalDep) -> WebhookDeleted:
    """Remove the webhook, and the deliveries it was still owed; 404 when none is set."""
    dropped = alerts.delete_webhook(session, actor=who.name, now=state.clock(), source=who.source)
    return WebhookDeleted(dropped=dropped)


@router.post("/webhook/test", dependencies=[_ADMIN])
async def try_webhook(state: StateDep) -> WebhookTest:
    """Post a test alert to the webhook now and say how it went; 404 when none is set."""
    attempt = await alerts.send_test(state.engine, state.settings, state.clock())
    return WebhookTest(delivered=attempt.delivered, status=attempt.status, error=attempt.error)
