"""Enrollment: the signed request, private files, the controller's refusals, the CLI."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from agent.cli import app as cli
from agent.config import LinkSettings
from agent.errors import ConfigError
from agent.link.enroll import enroll, explain_rejection, request_enrollment
from agent.link.errors import EnrollmentRejected, IdentityError, LinkUnavailable
from agent.link.fleet import FleetLink, prepare_identity
from agent.link.identity import StateDir
from models.device import DeviceReport
from models.trust import sign_enrollment, verify_enrollment
from models.wire import EnrollmentRequest
from scripts.servers import MosquittoBroker, free_port
from tests.agent.link_support import WITHIN_S, Watcher, authorize
from tests.agent.test_link_session import DEVICE_REPORT, settings
from tests.fakes.enrollment import FakeController, accept_as
from tests.fakes.link_host import FakeHost, FakeTelemetry
from tests.polling import eventually

DEVICE = "dev-enroll-1"
PASSWORD = "enroll-secret"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The worst case: a umask that would let everyone read new files."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_the_request_proves_possession_of_the_key() -> None:
    key = Ed25519PrivateKey.generate()
    now = datetime.now(UTC)
    request = sign_enrollment(
        key, "tok-1", name="edge-1", agent_version="0.1.0", device=DEVICE_REPORT, now=now
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert verify_enrollment(request, now) == raw  # the controller's own check
    assert request.name == "edge-1"
    assert request.device == DEVICE_REPORT


def test_enrolling_saves_a_private_identity_and_keeps_the_key(
    tmp_path: Path, open_umask: None
) -> None:
    state = StateDir(tmp_path / "state")
    with FakeController(accept_as(DEVICE, "mqtt://127.0.0.1:1883", PASSWORD)) as ctl:
        identity = asyncio.run(enroll(state, ctl.url, "tok-1", DEVICE_REPORT, agent_version="1"))
        again = asyncio.run(enroll(state, ctl.url, "tok-2", DEVICE_REPORT, agent_version="1"))
    assert identity.device_id == DEVICE
    assert identity.fleet_url == ctl.url
    assert identity.broker.password == PASSWORD
    assert state.load_identity() == again
    assert mode(state.root) == 0o700
    assert mode(state.key_path) == 0o600
    assert mode(state.identity_path) == 0o600
    assert ctl.requests[0].public_key == ctl.requests[1].public_key  # one key per device
    assert b"PRIVATE KEY" in state.key_path.read_bytes()
    assert not any(p.name.endswith(".tmp") for p in state.root.iterdir())


def test_a_key_file_others_can_read_is_tightened(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    key = state.device_key()
    state.key_path.chmod(0o644)
    assert state.device_key().public_key() == key.public_key()
    assert mode(state.key_path) == 0o600


@pytest.mark.parametrize(
    ("status", "body", "expect"),
    [
        (403, b'{"detail": "token already used"}', "`edgefleet tokens create`"),
        (
            403,
            b'{"error": {"code": "enrollment_rejected", "message": "token t1 is used up"}}',
            "token t1 is used up; each token enrolls a limited number",
        ),
        (403, b'{"detail": "token expired"}', "create a new one"),
        (403, b'{"detail": "timestamp is 900 s away from the controller\'s clock"}', "NTP"),
        (
            422,
            b'{"detail": [{"loc": ["body", "public_key"], "msg": "too short"}]}',
            "public_key: too short",
        ),
        (404, b"<html>nope</html>", "check --fleet"),
    ],
)
def test_refusals_say_what_to_do(status: int, body: bytes, expect: str) -> None:
    message = explain_rejection(status, body, "https://fleet.example")
    assert f"HTTP {status}" in message
    assert expect in message


def request() -> EnrollmentRequest:
    key = Ed25519PrivateKey.generate()
    return sign_enrollment(
        key, "t", name="n", agent_version="1", device=DEVICE_REPORT, now=datetime.now(UTC)
    )


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (httpx.Response(503), LinkUnavailable),
        (httpx.Response(429), LinkUnavailable),
        (httpx.Response(200, content=b"<html>captive portal</html>"), LinkUnavailable),
        (httpx.Response(403, json={"detail": "token revoked"}), EnrollmentRejected),
        (httpx.Response(307, headers={"location": "https://elsewhere"}), EnrollmentRejected),
        (httpx.ConnectError("refused"), LinkUnavailable),
    ],
)
def test_what_is_worth_retrying(answer: httpx.Response | Exception, error: type[Exception]) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def attempt() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await request_enrollment(client, "https://fleet.example", request())

    with pytest.raises(error):
        asyncio.run(attempt())


def probe() -> DeviceReport:
    return DEVICE_REPORT


def refuse_to_probe() -> DeviceReport:
    raise AssertionError("no enrollment, so no probe")


def test_startup_checks_before_serving(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    unreachable = f"http://127.0.0.1:{free_port()}"
    base = {"state_dir": state_dir, "enroll_timeout_s": 2}
    with pytest.raises(ConfigError, match="pass --token"):
        asyncio.run(prepare_identity(LinkSettings(url=unreachable, **base), probe))
    # Unreachable: not fatal, the link retries in the background.
    assert (
        asyncio.run(prepare_identity(LinkSettings(url=unreachable, token="t", **base), probe))
        is None
    )
    assert StateDir(state_dir).key_path.exists()  # the key exists before the first attempt
    with FakeController(accept_as(DEVICE, "mqtt://127.0.0.1:1883", PASSWORD)) as ctl:
        enrolled = asyncio.run(
            prepare_identity(LinkSettings(url=ctl.url, token="t", **base), probe)
        )
    assert enrolled is not None
    # Later starts need no token and no controller ...
    later = asyncio.run(prepare_identity(LinkSettings(**base), refuse_to_probe))
    assert later == enrolled
    # ... but refuse to silently move the device to another controller.
    with pytest.raises(IdentityError, match="is enrolled with"):
        asyncio.run(prepare_identity(LinkSettings(url=unreachable, **base), refuse_to_probe))


def test_serve_exits_with_the_controllers_reason(tmp_path: Path) -> None:
    def refuse(_: EnrollmentRequest) -> tuple[int, dict[str, str]]:
        return 403, {"detail": "token already used"}

    with FakeController(refuse) as ctl:
        result = CliRunner().invoke(
            cli,
            [
                "serve",
                "--fleet",
                ctl.url,
                "--token",
                "used-token",
                "--state-dir",
                str(tmp_path / "state"),
                "--port",
                str(free_port()),
            ],
        )
    assert result.exit_code == 2
    assert "token already used" in result.output
    assert "edgefleet tokens create" in result.output


def test_enrollment_retries_in_the_background_then_connects(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    authorize(broker, {DEVICE: PASSWORD})
    port = free_port()
    link_settings = settings(tmp_path / "state", url=f"http://127.0.0.1:{port}", token="tok")

    async def scenario() -> None:
        watcher = Watcher(broker)
        await watcher.start()
        link = FleetLink(link_settings, FakeHost(), FakeTelemetry(), DEVICE_REPORT)
        async with link:
            await eventually(
                lambda: link.status()["last_error"], "a failed attempt", within_s=WITHIN_S
            )
            assert link.status()["state"] == "enrolling"
            assert not link.status()["enrolled"]
            with FakeController(accept_as(DEVICE, broker.url, PASSWORD), port=port):
                await eventually(
                    lambda: link.status()["connected"], "enrolled and connected", within_s=WITHIN_S
                )
            status = link.status()
            assert (status["device_id"], status["enrolled"]) == (DEVICE, True)
            await watcher.wait_for(lambda w: w.on("events"), "ONLINE")
        await watcher.stop()

    asyncio.run(scenario())


def test_a_refusal_in_the_background_stops_the_link_not_the_agent(tmp_path: Path) -> None:
    def refuse(_: EnrollmentRequest) -> tuple[int, dict[str, str]]:
        return 403, {"detail": "token revoked"}

    async def scenario(url: str) -> None:
        link = FleetLink(
            settings(tmp_path / "state", url=url, token="tok"),
            FakeHost(),
            FakeTelemetry(),
            DEVICE_REPORT,
        )
        async with link:
            await eventually(
                lambda: link.status()["state"] == "rejected", "rejected", within_s=WITHIN_S
            )
            assert "token revoked" in link.status()["last_error"]

    with FakeController(refuse) as ctl:
        asyncio.run(scenario(ctl.url))
