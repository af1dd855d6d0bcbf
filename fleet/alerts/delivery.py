"""Deliver the alert outbox to the webhook: at least once, in order, never in the way.

:func:`deliver` runs in the app's lifespan. It looks at the oldest row of the outbox
(:mod:`fleet.alerts.webhook`); when it is due, it claims it, posts it, and deletes it
once the webhook answered 2xx. Anything else (an error status, a refused connection,
no answer within ``alert_webhook_timeout_s``) puts the row back with its next attempt
after an exponential, jittered backoff (``alert_webhook_backoff_initial_s`` doubling
up to ``alert_webhook_backoff_max_s``, :class:`fleet.link.backoff.ReconnectPolicy`).
Rows are posted one at a time, oldest first, so a receiver sees an alert's raise
before its clear; a dead webhook holds the rest back, in the database, not in memory.

A claim is a conditional update of the row (its attempt count as the version) that
also moves ``next_attempt_at`` to the end of a lease, so two replicas never post one
row at the same time, and a replica that dies mid-post leaves a row another retries
when the lease ends: a receiver may see a change twice (``X-Edgefleet-Delivery``
names the row so it can tell), never zero times. The rounds that raise alerts only
write rows; nothing here can slow them down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from pydantic import JsonValue
from sqlmodel import Session, col, select

from fleet.alerts.threads import in_thread
from fleet.alerts.webhook import SIGNATURE_HEADER, DeliveryEvent, body_of, signature
from fleet.config import FleetSettings
from fleet.errors import NotFound
from fleet.link.backoff import ReconnectPolicy
from fleet.tables import AlertDelivery, AlertWebhook, as_utc

__all__ = [
    "Attempt",
    "DeliveryPolicy",
    "deliver",
    "drain",
    "policy_of",
    "post",
    "sample_payload",
    "send_test",
]

log = logging.getLogger(__name__)

_LEASE_MARGIN_S = 30.0  # a claim outlives its POST's timeout by this much
_MAX_ERROR = 500  # characters of the last error kept


@dataclass(frozen=True)
class DeliveryPolicy:
    """How the outbox is drained (``FleetSettings.alert_webhook_*``)."""

    idle_s: float  # seconds between looks at an outbox with nothing due
    timeout_s: float  # seconds one POST may take, all of it
    backoff: ReconnectPolicy  # seconds before the next try of a failed row

    @property
    def lease_s(self) -> float:
        return self.timeout_s + _LEASE_MARGIN_S


def policy_of(settings: FleetSettings) -> DeliveryPolicy:
    return DeliveryPolicy(
        idle_s=settings.alert_webhook_interval_s,
        timeout_s=settings.alert_webhook_timeout_s,
        backoff=ReconnectPolicy(
            initial_s=settings.alert_webhook_backoff_initial_s,
            max_s=settings.alert_webhook_backoff_max_s,
        ),
    )


@dataclass(frozen=True)
class Attempt:
    """How one POST went."""

    delivered: bool
    status: int | None  # the webhook's HTTP status; None when it never answered
    error: str  # "" when delivered


async def post(
    http: httpx.AsyncClient,
    url: str,
    secret: str | None,
    payload: dict[str, JsonValue],
    *,
    delivery: str,
    timeout_s: float,
) -> Attempt:
    """POST ``payload`` to ``url``, signed with ``secret``; delivered on a 2xx answer."""
    body = body_of(payload)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "edgefleet-controller",
        "X-Edgefleet-Event": str(payload.get("event", "")),
        "X-Edgefleet-Delivery": delivery,
    }
    if secret is not None:
        headers[SIGNATURE_HEADER] = signature(body, secret)
    try:
        async with asyncio.timeout(timeout_s):
            response = await http.post(url, content=body, headers=headers)
    except TimeoutError:
        return Attempt(False, None, f"no answer within {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return Attempt(False, None, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR])
    if response.is_success:
        return Attempt(True, response.status_code, "")
    return Attempt(False, response.status_code, f"HTTP {response.status_code}")


def sample_payload(now: datetime) -> dict[str, JsonValue]:
    """What ``POST /api/v1/alerts/webhook/test`` sends: an alert's shape, id 0."""
    event: DeliveryEvent = "test"
    return {
        "event": event,
        "id": 0,
        "kind": "test",
        "subject": "alert_webhook",
        "severity": "info",
        "state": "open",
        "message": "a test of the alert webhook from the edgefleet controller",
        "data": {},
        "raised_at": now.isoformat(),
        "cleared_at": None,
        "acknowledged_at": None,
        "acknowledged_by": None,
    }


@dataclass(frozen=True)
class _Claim:
    id: int
    attempts: int  # counting this one
    payload: dict[str, Any]
    url: str
    secret: str | None


def _claim(engine: sa.Engine, now: datetime, lease_s: float) -> _Claim | float | None:
    """The oldest row if due, claimed; else seconds until it is due; None: nothing to do."""
    with Session(engine) as session:
        hook = session.get(AlertWebhook, 1)
        head = session.exec(select(AlertDelivery).order_by(col(AlertDelivery.id)).limit(1)).first()
        if hook is None or head is None or head.id is None:
            return None
        due = as_utc(head.next_attempt_at) or now
        if due > now:
            return (due - now).total_seconds()
        claim = _Claim(head.id, head.attempts + 1, dict(head.payload), hook.url, hook.secret)
        claimed = session.connection().execute(
            sa.update(AlertDelivery)
            .where(col(AlertDelivery.id) == claim.id, col(AlertDelivery.attempts) == head.attempts)
            .values(attempts=claim.attempts, next_attempt_at=now + timedelta(seconds=lease_s))
        )
        session.commit()
        return claim if claimed.rowcount == 1 else 0.0  # 0: another replica was first


def _settle(
    engine: sa.Engine, claim: _Claim, attempt: Attempt, now: datetime, backoff: ReconnectPolicy
) -> None:
    """Delete a delivered row; put a failed one back for later, with why it failed."""
    mine = (col(AlertDelivery.id) == claim.id, col(AlertDelivery.attempts) == claim.attempts)
    with Session(engine) as session:
        if attempt.delivered:
            session.execute(sa.delete(AlertDelivery).where(*mine))
        else:
            retry_at = now + timedelta(seconds=backoff.delay(claim.attempts - 1))
            session.execute(
                sa.update(AlertDelivery)
                .where(*mine)
                .values(next_attempt_at=retry_at, last_error=attempt.error[:_MAX_ERROR])
            )
        session.commit()


async def drain(
    engine: sa.Engine,
    http: httpx.AsyncClient,
    policy: DeliveryPolicy,
    clock: Callable[[], datetime],
) -> float:
    """Post what is due, oldest first, until a row fails or none is due.

    Returns the seconds until the outbox is worth another look.
    """
    while True:
        claim = await in_thread(_claim, engine, clock(), policy.lease_s)
        if claim is None:
            return policy.idle_s
        if isinstance(claim, float):
            return min(policy.idle_s, claim)
        attempt = await post(
            http,
            claim.url,
            claim.secret,
            claim.payload,
            delivery=str(claim.id),
            timeout_s=policy.timeout_s,
        )
        await in_thread(_settle, engine, claim, attempt, clock(), policy.backoff)
        if not attempt.delivered:
            log.warning(
                "alert webhook: delivery %d failed (attempt %d): %s",
                claim.id,
                claim.attempts,
                attempt.error,
            )


async def deliver(
    engine: sa.Engine, settings: FleetSettings, clock: Callable[[], datetime]
) -> None:
    """Drain the outbox until cancelled; a failed look is logged and retried."""
    policy = policy_of(settings)
    async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False) as http:
        while True:
            try:
                wait = await drain(engine, http, policy, clock)
            except Exception:
                log.exception("cannot deliver the alert webhooks")
                wait = policy.idle_s
            await asyncio.sleep(max(wait, 0.01))


def _webhook(engine: sa.Engine) -> tuple[str, str | None]:
    with Session(engine) as session:
        hook = session.get(AlertWebhook, 1)
        if hook is None:
            raise NotFound("no alert webhook is set")
        return hook.url, hook.secret


async def send_test(engine: sa.Engine, settings: FleetSettings, now: datetime) -> Attempt:
    """Post :func:`sample_payload` to the webhook now, outside the outbox; ``NotFound``."""
    url, secret = await in_thread(_webhook, engine)
    policy = policy_of(settings)
    async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False) as http:
        return await post(
            http, url, secret, sample_payload(now), delivery="test", timeout_s=policy.timeout_s
        )
