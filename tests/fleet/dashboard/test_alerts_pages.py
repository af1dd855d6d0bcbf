"""Alerts in the dashboard: open first, then history; acknowledging; the rules and webhook."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet.config import FleetSettings
from fleet.tables import Alert, AlertRule, AlertWebhook, AuditEntry
from tests.fleet.dashboard.conftest import Browser
from tests.fleet.helpers import START


@pytest.fixture
def settings(settings: FleetSettings) -> FleetSettings:
    """No alert round during a test: it would clear the alerts the test raised by hand."""
    return settings.model_copy(update={"degraded_alert_interval_s": 3600.0})


def raise_alert(
    engine: Engine, kind: str, subject: str, *, cleared: bool = False, **at: float
) -> int:
    when = START + timedelta(**at)
    with Session(engine) as session:
        row = Alert(
            kind=kind,
            subject=subject,
            severity="error" if kind == "rollout_failed" else "warning",
            message=f"{kind} on {subject}",
            raised_at=when,
            updated_at=when,
            cleared_at=when + timedelta(minutes=5) if cleared else None,
        )
        session.add(row)
        session.commit()
        assert row.id is not None
        return row.id


def alert(engine: Engine, alert_id: int) -> Alert:
    with Session(engine) as session:
        row = session.get(Alert, alert_id)
        assert row is not None
        return row


def ids_in(text: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr data-alert="(\d+)"', text)]


def test_open_alerts_first_then_the_history_and_viewers_only_read(
    engine: Engine, browser_as: Any
) -> None:
    old = raise_alert(engine, "device_offline", "device:edge-001", cleared=True, minutes=1)
    offline = raise_alert(engine, "device_offline", "device:edge-002", minutes=2)
    failed = raise_alert(engine, "rollout_failed", "rollout:ro-1", minutes=3)
    vera: Browser = browser_as("vera")
    page = vera.client.get("/ui/alerts")
    assert page.status_code == 200, page.text
    open_part, history = page.text.split('id="alerts-history"')
    assert ids_in(open_part) == [failed, offline]  # newest first
    assert 'id="open-count">2<' in open_part
    assert ids_in(history) == [old]
    assert 'href="/ui/rollouts/ro-1"' in open_part
    assert 'sse-connect="/ui/events?topics=alerts"' in page.text
    assert 'data-action="acknowledge"' not in page.text
    assert 'class="rule-form"' not in page.text  # the rules, read-only
    assert 'data-rule="device_offline"' in page.text
    assert 'id="webhook-form"' not in page.text
    fragment = vera.client.get("/ui/alerts/open").text
    assert fragment.lstrip().startswith('<article id="alerts-open"')
    assert ids_in(fragment) == [failed, offline]


def test_the_history_is_paged(engine: Engine, browser: Browser) -> None:
    assert browser.client.app.state.fleet.settings.degraded_alert_interval_s == 3600
    for i in range(55):
        raise_alert(engine, "device_offline", f"device:edge-{i:03d}", cleared=True, minutes=i)
    first = browser.client.get("/ui/alerts").text
    assert len(ids_in(first)) == 50
    assert "page 1 of 2" in first
    second = browser.client.get("/ui/alerts?page=2").text
    assert len(ids_in(second)) == 5
    assert not set(ids_in(first)) & set(ids_in(second))


def test_an_operator_acknowledges_an_event_clears_and_a_condition_stays_open(
    engine: Engine, browser_as: Any
) -> None:
    offline = raise_alert(engine, "device_offline", "device:edge-002")
    failed = raise_alert(engine, "rollout_failed", "rollout:ro-1")
    oscar: Browser = browser_as("oscar")
    page = oscar.client.get("/ui/alerts").text
    assert page.count('data-action="acknowledge"') == 2
    for alert_id in (offline, failed):
        answer = oscar.post_form(f"/ui/alerts/{alert_id}/acknowledge", {})
        assert answer.status_code == 303, answer.text
    assert alert(engine, failed).cleared_at is not None
    kept = alert(engine, offline)
    assert (kept.cleared_at, kept.acknowledged_by) == (None, "oscar")
    page = oscar.client.get("/ui/alerts").text
    open_part = page.split('id="alerts-history"')[0]
    assert ids_in(open_part) == [offline]
    assert 'data-action="acknowledge"' not in open_part  # acknowledged already
    again = oscar.post_form(f"/ui/alerts/{failed}/acknowledge", {})
    assert again.status_code == 409
    assert "cleared already" in again.text
    with Session(engine) as session:
        acks = session.exec(
            select(AuditEntry.actor, AuditEntry.source).where(
                AuditEntry.action == "alert.acknowledged"
            )
        ).all()
    assert [actor for actor, _ in acks] == ["oscar", "oscar"]
    assert all(source.endswith("(session)") for _, source in acks)


def test_a_viewer_or_a_missing_csrf_token_acknowledges_nothing(
    engine: Engine, browser: Browser, browser_as: Any
) -> None:
    failed = raise_alert(engine, "rollout_failed", "rollout:ro-1")
    vera: Browser = browser_as("vera")
    assert vera.post_form(f"/ui/alerts/{failed}/acknowledge", {}).status_code == 403
    bare = browser.client.post(f"/ui/alerts/{failed}/acknowledge", follow_redirects=False)
    assert bare.status_code == 403
    row = alert(engine, failed)
    assert (row.acknowledged_at, row.cleared_at) == (None, None)


def test_an_admin_tunes_a_rule_and_a_bad_value_is_refused_beside_it(
    engine: Engine, browser: Browser, browser_as: Any
) -> None:
    answer = browser.post_form(
        "/ui/alerts/rules/device_offline", {"enabled": "on", "param-minutes": "30"}
    )
    assert answer.status_code == 303, answer.text
    disabled = browser.post_form(
        "/ui/alerts/rules/rollout_failed", {"param-gate_failures": "false"}
    )
    assert disabled.status_code == 303
    with Session(engine) as session:
        rules = {r.kind: r for r in session.exec(select(AlertRule)).all()}
    assert (rules["device_offline"].enabled, rules["device_offline"].params) == (
        True,
        {"minutes": 30.0},
    )
    assert (rules["rollout_failed"].enabled, rules["rollout_failed"].params) == (
        False,
        {"gate_failures": False},
    )
    page = browser.client.get("/ui/alerts").text
    assert 'name="param-minutes" value="30.0"' in page
    bad = browser.post_form("/ui/alerts/rules/device_offline", {"param-minutes": "-1"})
    assert bad.status_code == 422
    message = re.search(r'id="err-rule-device_offline" role="alert">([^<]+)<', bad.text)
    assert message is not None
    assert "params.minutes" in message.group(1)
    assert browser.post_form("/ui/alerts/rules/nothing", {}).status_code == 404
    oscar: Browser = browser_as("oscar")
    refused = oscar.post_form("/ui/alerts/rules/device_offline", {"param-minutes": "1"})
    assert refused.status_code == 403
    with Session(engine) as session:
        kept = session.get(AlertRule, "device_offline")
        assert kept is not None
        assert kept.params == {"minutes": 30.0}


def test_an_admin_sets_and_removes_the_webhook(
    engine: Engine, browser: Browser, browser_as: Any
) -> None:
    for fields, words in [
        ({"url": "ftp://hooks.example.com/x"}, "url"),
        ({"url": "https://hooks.example.com/x", "secret": "short"}, "secret"),
    ]:
        bad = browser.post_form("/ui/alerts/webhook", fields)
        assert bad.status_code == 422
        message = re.search(r'id="err-webhook" role="alert">([^<]+)<', bad.text)
        assert message is not None
        assert message.group(1).startswith(words)
    oscar: Browser = browser_as("oscar")
    assert oscar.post_form("/ui/alerts/webhook", {"url": "https://x.example"}).status_code == 403
    with Session(engine) as session:
        assert session.exec(select(AlertWebhook)).first() is None
    answer = browser.post_form(
        "/ui/alerts/webhook",
        {"url": "https://hooks.example.com/edgefleet", "secret": "0123456789abcdef"},
    )
    assert answer.status_code == 303
    page = browser.client.get("/ui/alerts").text
    assert '<code id="webhook-url">https://hooks.example.com/edgefleet</code>' in page
    assert "0123456789abcdef" not in page  # never the secret
    assert "signed with the shared secret" in page
    assert oscar.post_form("/ui/alerts/webhook/delete", {}).status_code == 403
    assert browser.post_form("/ui/alerts/webhook/delete", {}).status_code == 303
    with Session(engine) as session:
        assert session.exec(select(AlertWebhook)).first() is None
        actions = session.exec(
            select(AuditEntry.action, AuditEntry.actor).where(
                AuditEntry.subject == "alert_webhook", AuditEntry.source.endswith("(session)")
            )
        ).all()
    assert sorted(actions) == [("alert_webhook.deleted", "ada"), ("alert_webhook.set", "ada")]
    assert browser.post_form("/ui/alerts/webhook/delete", {}).status_code == 404
