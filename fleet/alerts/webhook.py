"""The alert webhook: its configuration, the payload and its signature, the outbox.

An admin may name one URL (http or https) and a shared secret; it is stored in the
``alert_webhook`` table (one row, id 1; none: no webhook). Every raise, clear and
acknowledgement then adds a row to the ``alert_deliveries`` outbox, in the same
transaction as the alert's change, so a delivery is owed exactly when the change
committed; :mod:`fleet.alerts.delivery` sends them. Without a webhook nothing is
queued. Deleting the webhook drops what was still owed; replacing it sends what is
owed to the new URL.

The body is the alert as JSON (:func:`payload`), serialised once, compactly, with
sorted keys (:func:`body_of`); with a secret, ``X-Edgefleet-Signature: sha256=<hex>``
is the HMAC-SHA256 of exactly those bytes under the secret (:func:`signature`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

import sqlalchemy as sa
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, JsonValue
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet.audit import record
from fleet.errors import Conflict, NotFound
from fleet.tables import Alert, AlertDelivery, AlertWebhook, as_utc

__all__ = [
    "SIGNATURE_HEADER",
    "WEBHOOK_SUBJECT",
    "DeliveryEvent",
    "WebhookSettings",
    "WebhookView",
    "body_of",
    "configured",
    "delete_webhook",
    "enqueue",
    "get_webhook",
    "origin",
    "payload",
    "set_webhook",
    "signature",
]

SIGNATURE_HEADER = "X-Edgefleet-Signature"
WEBHOOK_SUBJECT = "alert_webhook"  # the audit log's subject for its changes
_WEBHOOK_ID = 1

DeliveryEvent = Literal["raised", "cleared", "acknowledged", "test"]


class WebhookSettings(BaseModel):
    """Where to POST alert changes, and the secret that signs them (optional)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: AnyHttpUrl = Field(max_length=2000)  # http or https
    secret: str | None = Field(default=None, min_length=16, max_length=256)


@dataclass(frozen=True)
class WebhookView:
    """The webhook as admins see it: never the secret, and how delivery goes."""

    url: str
    secret_set: bool
    updated_by: str
    updated_at: datetime
    pending: int  # deliveries owed
    oldest_pending_at: datetime | None  # when the oldest of them was queued
    attempts: int  # of the oldest: 0 when it was never tried
    last_error: str  # why its last try failed ("" when none)


def origin(url: str) -> str:
    """'https://hooks.example.com': what the audit log keeps of a URL (paths hold tokens)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


def configured(session: Session) -> bool:
    return session.get(AlertWebhook, _WEBHOOK_ID) is not None


def get_webhook(session: Session) -> WebhookView:
    """The webhook and its outbox; ``NotFound`` when none is set."""
    row = session.get(AlertWebhook, _WEBHOOK_ID)
    if row is None:
        raise NotFound("no alert webhook is set")
    pending = session.exec(select(sa.func.count()).select_from(AlertDelivery)).one()
    head = session.exec(select(AlertDelivery).order_by(col(AlertDelivery.id)).limit(1)).first()
    return WebhookView(
        url=row.url,
        secret_set=row.secret is not None,
        updated_by=row.updated_by,
        updated_at=as_utc(row.updated_at) or row.updated_at,
        pending=int(pending),
        oldest_pending_at=as_utc(head.created_at) if head is not None else None,
        attempts=head.attempts if head is not None else 0,
        last_error=head.last_error if head is not None else "",
    )


def set_webhook(
    session: Session, settings: WebhookSettings, *, actor: str, now: datetime, source: str = ""
) -> WebhookView:
    """Set (or replace) the webhook, audited as ``alert_webhook.set``."""
    url = str(settings.url)
    row = session.get(AlertWebhook, _WEBHOOK_ID) or AlertWebhook(
        id=_WEBHOOK_ID, url=url, updated_by=actor, updated_at=now
    )
    row.url, row.secret, row.updated_by, row.updated_at = url, settings.secret, actor, now
    session.add(row)
    record(
        session,
        at=now,
        actor=actor,
        action="alert_webhook.set",
        source=source,
        subject=WEBHOOK_SUBJECT,
        reason=f"alerts are posted to {origin(url)}",
        data={"origin": origin(url), "signed": settings.secret is not None},
    )
    try:
        session.commit()
    except IntegrityError:  # another admin set the first webhook at the same moment
        session.rollback()
        raise Conflict("the webhook was set at the same time: try again") from None
    return get_webhook(session)


def delete_webhook(session: Session, *, actor: str, now: datetime, source: str = "") -> int:
    """Remove the webhook and what it was still owed (the count); ``NotFound`` if none."""
    row = session.get(AlertWebhook, _WEBHOOK_ID)
    if row is None:
        raise NotFound("no alert webhook is set")
    dropped = session.exec(select(sa.func.count()).select_from(AlertDelivery)).one()
    session.execute(sa.delete(AlertDelivery))
    session.delete(row)
    record(
        session,
        at=now,
        actor=actor,
        action="alert_webhook.deleted",
        source=source,
        subject=WEBHOOK_SUBJECT,
        reason=f"{dropped} undelivered alert change(s) dropped",
        data={"origin": origin(row.url), "dropped": int(dropped)},
    )
    session.commit()
    return int(dropped)


def _iso(value: datetime | None) -> str | None:
    stamp = as_utc(value)
    return stamp.isoformat() if stamp is not None else None


def payload(alert: Alert, event: DeliveryEvent) -> dict[str, JsonValue]:
    """The JSON an alert change is posted as: the alert as it stands, and what happened."""
    return {
        "event": event,
        "id": alert.id,
        "kind": alert.kind,
        "subject": alert.subject,
        "severity": alert.severity,
        "state": "open" if alert.cleared_at is None else "cleared",
        "message": alert.message,
        "data": dict(alert.data or {}),
        "raised_at": _iso(alert.raised_at),
        "cleared_at": _iso(alert.cleared_at),
        "acknowledged_at": _iso(alert.acknowledged_at),
        "acknowledged_by": alert.acknowledged_by,
    }


def body_of(payload: dict[str, JsonValue]) -> bytes:
    """The bytes posted, and signed: compact JSON, sorted keys, UTF-8."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def signature(body: bytes, secret: str) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the body under the shared secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def enqueue(session: Session, alert: Alert, event: DeliveryEvent, now: datetime) -> None:
    """Owe the webhook this change, in the caller's transaction (the alert has an id)."""
    assert alert.id is not None
    session.add(
        AlertDelivery(
            alert_id=alert.id,
            event=event,
            payload=payload(alert, event),
            created_at=now,
            next_attempt_at=now,
        )
    )
