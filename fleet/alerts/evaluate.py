"""The alert round: read each enabled rule's facts, apply its pure rule, write the alerts.

:func:`evaluate` runs one round in one transaction, after taking the alert lock
(:mod:`fleet.alerts.lock`: several replicas may evaluate at once, and a subject must
never have two open alerts). For each rule it reads the facts and the rule's open
alerts, decides (:mod:`fleet.alerts.offline`, :mod:`fleet.degraded.rules`,
:mod:`fleet.alerts.rollouts`, :mod:`fleet.alerts.tuf`, :mod:`fleet.alerts.spool`)
and writes: each raise and clear with an audit entry (``alert.raised``,
``alert.cleared``; actor ``controller``, the alert's subject) and, when a webhook is
set, an outbox row. An update of an open alert's message or data is not audited nor
posted: the alert row shows it. A disabled rule's open alerts clear.

The TUF expiries come in from outside (the repository is files, not the database);
without them (``None``) the ``tuf_expiry`` rule is skipped and its alerts left as
they are. :func:`watch` runs a round every ``degraded_alert_interval_s`` in the app's
lifespan.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session

from fleet.alerts import facts, offline, rollouts, spool, tuf
from fleet.alerts.lock import lock_alerts
from fleet.alerts.params import (
    DeviceOfflineParams,
    GroupDegradedParams,
    Params,
    RolloutFailedParams,
    RuleKind,
    SpoolDroppedParams,
    TufExpiryParams,
    defaults_of,
)
from fleet.alerts.ruleset import load_rules
from fleet.alerts.threads import in_thread
from fleet.alerts.webhook import configured, enqueue
from fleet.audit import ENGINE, record
from fleet.config import FleetSettings
from fleet.degraded.rules import Action, Clear, OpenAlert, Raise, Thresholds, Update, decide
from fleet.errors import FleetError
from fleet.registry.repository import TufRepository
from fleet.tables import Alert

__all__ = ["Evaluation", "evaluate", "tuf_expiries", "watch"]

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What one round changed: ``(kind, subject)`` of the alerts raised, updated, cleared."""

    raised: list[tuple[str, str]] = field(default_factory=list)
    updated: list[tuple[str, str]] = field(default_factory=list)
    cleared: list[tuple[str, str]] = field(default_factory=list)


def _decide(
    session: Session,
    params: Params,
    opened: list[OpenAlert],
    now: datetime,
    expiries: Mapping[str, datetime] | None,
) -> list[Action] | None:
    """One rule's changes; None when its facts are not at hand (no TUF expiries)."""
    match params:
        case DeviceOfflineParams():
            return offline.decide(facts.presence(session), opened, params, now)
        case GroupDegradedParams():
            health = facts.groups_health(session, now, params.seen_within_s)
            return decide(health, opened, Thresholds(params.share, params.min_devices))
        case RolloutFailedParams():
            troubles = facts.troubles(session, now - timedelta(hours=params.lookback_hours))
            subjects = [rollouts.rollout_subject(t.rollout) for t in troubles]
            return rollouts.decide(
                troubles,
                opened,
                facts.covered(session, RuleKind.ROLLOUT_FAILED, subjects),
                gate_failures=params.gate_failures,
                lookback_hours=params.lookback_hours,
                now=now,
            )
        case TufExpiryParams():
            return None if expiries is None else tuf.decide(expiries, opened, params, now)
        case SpoolDroppedParams():
            alerted = [offline.device_of_subject(a.subject) or a.subject for a in opened]
            since = now - timedelta(minutes=params.window_minutes)
            found = facts.drop_facts(session, since, alerted)
            return spool.decide(found.reports, found.names, found.totals, opened, params, now)


class _Writer:
    """Writes one round's changes: alert rows, audit entries, outbox rows."""

    def __init__(self, session: Session, now: datetime, result: Evaluation) -> None:
        self.session = session
        self.now = now
        self.result = result
        self.post = configured(session)

    def apply(self, kind: RuleKind, actions: list[Action], rows: Mapping[int, Alert]) -> None:
        for action in actions:
            if isinstance(action, Raise):
                self._raise(kind, action)
            elif isinstance(action, Update):
                row = rows[action.alert_id]
                row.message, row.data, row.updated_at = action.message, action.data, self.now
                self.session.add(row)
                self.result.updated.append((kind.value, action.subject))
            else:
                self._clear(kind, action, rows[action.alert_id])

    def _raise(self, kind: RuleKind, action: Raise) -> None:
        alert = Alert(
            kind=kind.value,
            subject=action.subject,
            severity=action.severity.value,
            message=action.message,
            data=action.data,
            raised_at=self.now,
            updated_at=self.now,
        )
        self.session.add(alert)
        self.session.flush()
        record(
            self.session,
            at=self.now,
            actor=ENGINE,
            action="alert.raised",
            subject=action.subject,
            reason=action.message,
            data={"alert": alert.id, "kind": kind.value, **action.data},
        )
        if self.post:
            enqueue(self.session, alert, "raised", self.now)
        self.result.raised.append((kind.value, action.subject))

    def _clear(self, kind: RuleKind, action: Clear, row: Alert) -> None:
        row.cleared_at, row.updated_at = self.now, self.now
        self.session.add(row)
        record(
            self.session,
            at=self.now,
            actor=ENGINE,
            action="alert.cleared",
            subject=action.subject,
            reason=action.reason,
            data={"alert": action.alert_id, "kind": kind.value},
        )
        if self.post:
            enqueue(self.session, row, "cleared", self.now)
        self.result.cleared.append((kind.value, action.subject))


def evaluate(
    engine: sa.Engine,
    defaults: Mapping[RuleKind, Params],
    *,
    now: datetime,
    expiries: Mapping[str, datetime] | None = None,
    kinds: Collection[RuleKind] | None = None,
) -> Evaluation | None:
    """One round over every rule (or only ``kinds``); None when another replica ran it.

    ``defaults`` are each kind's parameters where no admin set them
    (:func:`fleet.alerts.params.defaults_of`); ``expiries`` each TUF role's.
    """
    result = Evaluation()
    with Session(engine, expire_on_commit=False) as session:
        if not lock_alerts(session, wait=False):
            return None
        writer = _Writer(session, now, result)
        for kind, rule in load_rules(session, defaults).items():
            if kinds is not None and kind not in kinds:
                continue
            rows = facts.open_rows(session, kind)
            opened = [OpenAlert(i, r.subject, r.message, r.data or {}) for i, r in rows.items()]
            if rule.enabled:
                actions = _decide(session, rule.params, opened, now, expiries)
            else:
                reason = f"the {kind.value} rule was disabled"
                actions = [Clear(a.id, a.subject, reason) for a in opened]
            if actions:
                writer.apply(kind, actions, rows)
        session.commit()
    for kind_name, subject in result.raised:
        log.warning("alert raised: %s %s", kind_name, subject)
    for kind_name, subject in result.cleared:
        log.info("alert cleared: %s %s", kind_name, subject)
    return result


def tuf_expiries(repo: TufRepository) -> dict[str, datetime] | None:
    """Each TUF role's expiry; None (logged) when the repository cannot be read."""
    try:
        return {s.role: s.expires for s in repo.status() if s.expires is not None}
    except (FleetError, OSError, ValueError) as exc:
        log.warning("cannot read the TUF expiries for the tuf_expiry alerts: %s", exc)
        return None


def _round(
    engine: sa.Engine,
    defaults: Mapping[RuleKind, Params],
    now: datetime,
    repo: TufRepository | None,
) -> Evaluation | None:
    expiries = tuf_expiries(repo) if repo is not None else None
    return evaluate(engine, defaults, now=now, expiries=expiries)


async def watch(
    engine: sa.Engine,
    settings: FleetSettings,
    clock: Callable[[], datetime],
    repo: TufRepository | None = None,
) -> None:
    """Evaluate every ``degraded_alert_interval_s`` until cancelled; a failed round is logged."""
    defaults = defaults_of(settings)
    while True:
        await asyncio.sleep(settings.degraded_alert_interval_s)
        try:
            result = await in_thread(_round, engine, defaults, clock(), repo)
        except Exception:
            log.exception("cannot evaluate the alert rules")
            continue
        if result is None:
            log.debug("another controller evaluated the alert rules")
