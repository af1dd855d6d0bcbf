"""Alerts: what the controller raises for admins, by rules they tune, with a webhook.

Five rules (docs/alerts.md), each a pure function from facts, parameters and the
open alerts to raise, update and clear decisions:

    device_offline   fleet.alerts.offline     a device not seen for more than N minutes
    group_degraded   fleet.degraded.rules     a group's degraded share over a threshold
    rollout_failed   fleet.alerts.rollouts    a rollout aborted, a gate check failed (event)
    tuf_expiry       fleet.alerts.tuf         TUF metadata close to expiry
    spool_dropped    fleet.alerts.spool       a device's spool dropping telemetry samples

The shells around them: :mod:`~fleet.alerts.evaluate` (the locked round and the
lifespan's loop), :mod:`~fleet.alerts.ruleset` (the rules as admins set them),
:mod:`~fleet.alerts.store` (listing, acknowledging), :mod:`~fleet.alerts.webhook`
(configuration, payload, signature, outbox) and :mod:`~fleet.alerts.delivery` (the
outbox drained to the webhook). Errors are the controller's (:mod:`fleet.errors`):
``NotFound`` for an unknown rule or alert, ``InvalidInput`` naming ``params.<field>``,
``Conflict`` for acknowledging a cleared alert; a webhook failing is not an error
anyone sees but the outbox (its ``last_error``) and the log.
"""

from __future__ import annotations

from fleet.alerts.delivery import Attempt, deliver, send_test
from fleet.alerts.evaluate import Evaluation, evaluate, tuf_expiries, watch
from fleet.alerts.params import EVENT_KINDS, Params, RuleKind, defaults_of
from fleet.alerts.ruleset import Rule, load_rules, set_rule
from fleet.alerts.store import AlertState, acknowledge, is_event, list_alerts
from fleet.alerts.webhook import (
    WebhookSettings,
    WebhookView,
    delete_webhook,
    get_webhook,
    set_webhook,
)

__all__ = [
    "EVENT_KINDS",
    "AlertState",
    "Attempt",
    "Evaluation",
    "Params",
    "Rule",
    "RuleKind",
    "WebhookSettings",
    "WebhookView",
    "acknowledge",
    "defaults_of",
    "delete_webhook",
    "deliver",
    "evaluate",
    "get_webhook",
    "is_event",
    "list_alerts",
    "load_rules",
    "send_test",
    "set_rule",
    "set_webhook",
    "tuf_expiries",
    "watch",
]
