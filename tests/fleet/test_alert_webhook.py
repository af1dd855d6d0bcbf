"""Alert webhooks against a real HTTP server in a thread, on SQLite and PostgreSQL.

The receiver is Python's own ``http.server``: it answers from a script (500, 503,
then 200, say), records every request, and the tests check each body's HMAC the way
docs/alerts.md tells receivers to. The outbox is drained by the real
:func:`fleet.alerts.delivery.drain` with the real clock and short backoffs; the last
tests run the app's own lifespan task, the API and the CLI.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from fleet.alerts import RuleKind, WebhookSettings, evaluate, set_webhook
from fleet.alerts.delivery import DeliveryPolicy, drain, post
from fleet.alerts.webhook import body_of, enqueue, signature
from fleet.app import create_app
from fleet.config import FleetSettings
from fleet.db import make_engine, migrate
from fleet.link.backoff import ReconnectPolicy
from fleet.tables import Alert, AlertDelivery
from tests.fakes.fleet_link import FakeLink
from tests.fleet.cli_support import cli, ok
from tests.fleet.helpers import ADMIN, Clock, create_group, enroll
from tests.fleet.test_alerts import DEFAULTS, broken, ingest

SECRET = "a-shared-secret-of-some-length"
FAST = DeliveryPolicy(
    idle_s=0.02, timeout_s=2.0, backoff=ReconnectPolicy(initial_s=0.05, max_s=0.2)
)


@dataclass
class Request:
    at: float  # time.monotonic()
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """A webhook: answers ``script`` in order (then 200), after ``delay_s``; records all."""

    script: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    requests: list[Request] = field(default_factory=list)
    accepted: list[Request] = field(default_factory=list)  # the ones answered 2xx
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def answer(self, request: Request) -> int:
        with self.lock:
            self.requests.append(request)
            status = self.script.pop(0) if self.script else 200
            if 200 <= status < 300:
                self.accepted.append(request)
        return status

    def verified(self, request: Request, secret: str = SECRET) -> bool:
        """What a receiver does: HMAC-SHA256 of the raw body, compared in constant time."""
        sent = request.headers.get("x-edgefleet-signature", "")
        mac = hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(sent, f"sha256={mac}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            if state.delay_s:
                time.sleep(state.delay_s)
            status = state.answer(Request(time.monotonic(), headers, body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/alerts"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def db(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    migrate(engine)
    yield engine
    engine.dispose()


def now() -> datetime:
    return datetime.now(UTC)


def use_webhook(engine: sa.Engine, url: str, secret: str | None = SECRET) -> None:
    with Session(engine) as session:
        set_webhook(session, WebhookSettings.model_validate({"url": url, "secret": secret}),
                    actor="admin:test", now=now())  # fmt: skip


def queue(engine: sa.Engine, count: int = 1, event: str = "raised") -> list[int]:
    """``count`` alerts raised, each owed to the webhook; their ids."""
    ids = []
    with Session(engine, expire_on_commit=False) as session:
        for i in range(count):
            alert = Alert(
                kind="device_offline",
                subject=f"device:dev-{i}",
                severity="warning",
                message=f"dev-{i} is offline",
                data={"device": f"dev-{i}"},
                raised_at=now(),
                updated_at=now(),
            )
            session.add(alert)
            session.flush()
            enqueue(session, alert, event, now())  # type: ignore[arg-type]
            assert alert.id is not None
            ids.append(alert.id)
        session.commit()
    return ids


def outbox(engine: sa.Engine) -> list[AlertDelivery]:
    with Session(engine) as session:
        return list(session.exec(select(AlertDelivery).order_by(col(AlertDelivery.id))).all())


async def drain_until(
    engine: sa.Engine, done: Any, policy: DeliveryPolicy = FAST, limit_s: float = 10.0
) -> None:
    """Run the drain loop (as the lifespan task does) until ``done()`` or ``limit_s``."""
    deadline = time.monotonic() + limit_s
    async with httpx.AsyncClient() as http:
        while not done() and time.monotonic() < deadline:
            wait = await drain(engine, http, policy, now)
            await asyncio.sleep(max(wait, 0.005))


# --- the payload and its signature ----------------------------------------------------------


def test_the_body_is_compact_sorted_json_signed_with_hmac_sha256() -> None:
    body = body_of({"b": 1, "a": "é", "c": None})
    assert body == '{"a":"é","b":1,"c":null}'.encode()
    expected = hmac.new(b"k" * 16, body, hashlib.sha256).hexdigest()
    assert signature(body, "k" * 16) == f"sha256={expected}"
    assert signature(body, "j" * 16) != signature(body, "k" * 16)


# --- delivery -------------------------------------------------------------------------------


def test_a_webhook_failing_twice_gets_the_change_once_after_backing_off(
    db: sa.Engine, receiver: Receiver
) -> None:
    use_webhook(db, receiver.url)
    (alert_id,) = queue(db)
    receiver.script = [500, 503]
    asyncio.run(drain_until(db, lambda: not outbox(db)))

    assert outbox(db) == []
    assert [r.headers["x-edgefleet-delivery"] for r in receiver.requests] == ["1"] * 3
    assert len(receiver.accepted) == 1  # delivered exactly once: retried, not duplicated
    first, second, third = receiver.requests
    assert first.body == second.body == third.body
    assert all(receiver.verified(r) for r in receiver.requests)
    assert not receiver.verified(first, "another-secret-entirely")
    assert second.at - first.at >= 0.025  # the backoff: half the 0.05 s step at least
    assert third.at - second.at >= 0.05
    payload = third.json
    assert (payload["event"], payload["id"], payload["kind"]) == (
        "raised",
        alert_id,
        "device_offline",
    )
    assert (payload["subject"], payload["state"]) == ("device:dev-0", "open")
    assert third.headers["content-type"] == "application/json"
    assert third.headers["x-edgefleet-event"] == "raised"


def test_changes_arrive_in_order_and_a_failure_holds_the_rest_back(
    db: sa.Engine, receiver: Receiver
) -> None:
    use_webhook(db, receiver.url, secret=None)
    queue(db, 3)
    receiver.script = [500]
    asyncio.run(drain_until(db, lambda: not outbox(db)))
    subjects = [r.json["subject"] for r in receiver.requests]
    assert subjects == ["device:dev-0", "device:dev-0", "device:dev-1", "device:dev-2"]
    assert [r.json["subject"] for r in receiver.accepted] == subjects[1:]
    assert "x-edgefleet-signature" not in receiver.requests[0].headers  # no secret: unsigned


def test_a_dead_webhook_loses_nothing_and_tries_only_the_oldest(
    db: sa.Engine, receiver: Receiver
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/hook"
    use_webhook(db, dead)
    queue(db, 20)

    async def tries() -> None:
        async with httpx.AsyncClient() as http:
            for attempt in range(4):
                if attempt:
                    await asyncio.sleep(0.25)  # longer than the longest backoff
                await drain(db, http, FAST, now)

    asyncio.run(tries())
    owed = outbox(db)
    assert len(owed) == 20  # nothing lost
    assert owed[0].attempts == 4
    assert "ConnectError" in owed[0].last_error
    assert as_aware(owed[0].next_attempt_at) > now()  # backing off
    assert all(d.attempts == 0 for d in owed[1:])  # the rest wait in the database

    use_webhook(db, receiver.url)  # fixed: what is owed goes to the new URL
    asyncio.run(drain_until(db, lambda: not outbox(db)))
    assert [r.json["subject"] for r in receiver.accepted] == [f"device:dev-{i}" for i in range(20)]


def as_aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def test_no_answer_within_the_timeout_is_a_failure(receiver: Receiver) -> None:
    receiver.delay_s = 1.0

    async def once() -> Any:
        async with httpx.AsyncClient() as http:
            return await post(
                http, receiver.url, None, {"event": "test"}, delivery="1", timeout_s=0.2
            )

    started = time.monotonic()
    attempt = asyncio.run(once())
    assert time.monotonic() - started < 0.9
    assert (attempt.delivered, attempt.status, attempt.error) == (
        False,
        None,
        "no answer within 0.2 s",
    )


def test_two_replicas_draining_together_post_each_change_once(
    db: sa.Engine, receiver: Receiver
) -> None:
    use_webhook(db, receiver.url)
    queue(db, 30)

    async def replicas() -> None:
        done = lambda: not outbox(db)  # noqa: E731
        await asyncio.gather(drain_until(db, done), drain_until(db, done))

    asyncio.run(replicas())
    ids = [r.headers["x-edgefleet-delivery"] for r in receiver.requests]
    assert len(ids) == 30
    assert len(set(ids)) == 30  # a claimed row is never posted by the other replica


# --- the app: its lifespan task, the API, the CLI -------------------------------------------


@pytest.fixture
def fast_api(settings: FleetSettings, link: FakeLink, clock: Clock) -> Iterator[TestClient]:
    """The app with its outbox looked at every 50 ms."""
    quick = settings.model_copy(update={"alert_webhook_interval_s": 0.05})
    with TestClient(create_app(quick, link.factory(), clock=clock), headers=ADMIN) as client:
        yield client


def wait_for(what: Any, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_app_posts_raised_and_acknowledged_alerts_signed(
    fast_api: TestClient, link: FakeLink, clock: Clock, receiver: Receiver
) -> None:
    engine = link.engine
    assert engine is not None
    response = fast_api.put("/api/v1/alerts/webhook", json={"url": receiver.url, "secret": SECRET})
    assert response.status_code == 200, response.text
    tested = fast_api.post("/api/v1/alerts/webhook/test")
    assert tested.json() == {"delivered": True, "status": 200, "error": ""}
    (probe,) = receiver.accepted
    assert (probe.json["event"], probe.json["kind"], probe.headers["x-edgefleet-delivery"]) == (
        "test",
        "test",
        "test",
    )
    assert receiver.verified(probe)

    create_group(fast_api, "lab")
    secret = fast_api.post("/api/v1/tokens", json={"group": "lab", "uses": 2}).json()["secret"]
    for _ in range(2):
        device = enroll(fast_api, clock, token=secret)["device_id"]
        ingest(engine, clock, device, [broken(clock)])
    evaluate(engine, DEFAULTS, now=clock.now, kinds=[RuleKind.GROUP_DEGRADED])
    wait_for(lambda: len(receiver.accepted) == 2)
    raised = receiver.accepted[1]
    assert receiver.verified(raised)
    assert (raised.json["event"], raised.json["subject"]) == ("raised", "group:lab")
    assert raised.json["message"].startswith("2 of 2 devices in lab are degraded")

    alert_id = raised.json["id"]
    fast_api.post(f"/api/v1/alerts/{alert_id}/acknowledge", headers={"X-Edgefleet-Actor": "eve"})
    wait_for(lambda: len(receiver.accepted) == 3)
    acked = receiver.accepted[2].json
    assert (acked["event"], acked["state"], acked["acknowledged_by"]) == (
        "acknowledged",
        "open",
        "admin:eve",
    )
    wait_for(lambda: fast_api.get("/api/v1/alerts/webhook").json()["pending"] == 0)

    receiver.script = [500]
    failed = fast_api.post("/api/v1/alerts/webhook/test").json()
    assert failed == {"delivered": False, "status": 500, "error": "HTTP 500"}


def test_cli_sets_shows_tests_and_clears_the_webhook(http: TestClient, receiver: Receiver) -> None:
    missing = cli(http, "alerts", "webhook")
    assert missing.exit_code == 1
    assert "no alert webhook is set" in missing.output
    refused = cli(http, "alerts", "webhook", "set", "ftp://example.com/x")
    assert refused.exit_code == 1
    assert "invalid url" in refused.output

    out = ok(http, "alerts", "webhook", "set", receiver.url, "--secret", SECRET)
    assert f"alerts are posted to {receiver.url} (signed)" in out
    shown = ok(http, "alerts", "webhook")
    assert f"url: {receiver.url}" in shown
    assert "signed: yes" in shown
    assert "owed: nothing" in shown
    assert SECRET not in shown
    assert json.loads(ok(http, "alerts", "webhook", "--json"))["secret_set"] is True

    assert "delivered (HTTP 200)" in ok(http, "alerts", "webhook", "test")
    assert receiver.verified(receiver.accepted[0])
    receiver.script = [502]
    failed = cli(http, "alerts", "webhook", "test")
    assert failed.exit_code == 1
    assert "not delivered: HTTP 502" in failed.output

    assert "webhook removed; 0 undelivered" in ok(http, "alerts", "webhook", "clear")
    assert cli(http, "alerts", "webhook", "clear").exit_code == 1
