"""Re-flash and revocation on a real broker, through a real controller process.

A board enrolls, is re-flashed (a new key, the same hardware) and enrolls again: its
old broker password stops working and the new one works. Revoking the device then
cuts the new session off at once, and its login is refused from then on. Mosquitto on
SQLite and PostgreSQL, and the embedded broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from models.paths import ENROLL_PATH
from models.topics import Channel, DeviceTopic
from scripts.servers import Controller, MosquittoBroker, free_port, running_controller
from tests.fleet.helpers import DeviceKey
from tests.polling import eventually

pytestmark = pytest.mark.integration

HW = "0c1d2e3f-4a5b-6c7d-8e9f-a0b1c2d3e4f5"
DEADLINE_S = 20.0


@pytest.fixture
def mosquitto_controller(
    tmp_path: Path, broker: MosquittoBroker, database_url: str
) -> Iterator[tuple[Controller, int]]:
    with running_controller(
        tmp_path,
        database_url,
        "--broker", broker.url,
        "--broker-auth-dir", str(broker.auth_dir),
        "--broker-pid-file", str(broker.pid_file),
    ) as running:  # fmt: skip
        yield running, broker.port


@pytest.fixture
def embedded_controller(tmp_path: Path) -> Iterator[tuple[Controller, int]]:
    port = free_port()
    database_url = f"sqlite:///{tmp_path / 'controller' / 'fleet.db'}"
    with running_controller(tmp_path, database_url, "--broker-port", str(port)) as running:
        yield running, port


def admin(controller: Controller) -> httpx.Client:
    token = (controller.data_dir / "admin-token").read_text().strip()
    return httpx.Client(
        base_url=controller.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def enroll(controller: Controller, key: DeviceKey, secret: str) -> dict[str, Any]:
    body = key.request(secret, datetime.now(UTC), hardware_id=HW)
    response = httpx.post(f"{controller.url}{ENROLL_PATH}", json=body, timeout=10)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def login(port: int, creds: dict[str, Any]) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username=creds["username"],
        password=creds["password"],
        identifier=creds["client_id"],
        timeout=5,
    )


async def refused(port: int, creds: dict[str, Any]) -> bool:
    """One try: True when the broker refuses the login."""
    try:
        async with aiomqtt.Client(
            "127.0.0.1",
            port,
            username=creds["username"],
            password=creds["password"],
            identifier=f"probe-{creds['client_id']}",  # never takes a live session over
            timeout=5,
        ):
            return False
    except aiomqtt.MqttError:
        return True


async def disconnected(client: aiomqtt.Client) -> None:
    """Read until the broker drops ``client``."""

    async def drain() -> None:
        async with asyncio.timeout(DEADLINE_S):
            async for _ in client.messages:
                pass

    with pytest.raises(aiomqtt.MqttError):
        await drain()


async def connect(stack: AsyncExitStack, port: int, creds: dict[str, Any], what: str) -> Any:
    """Log in, retrying while the broker reloads its files; the session stays open."""

    async def once() -> aiomqtt.Client:
        return await stack.enter_async_context(login(port, creds))

    return await eventually(
        once, what, within_s=DEADLINE_S, every_s=0.05, ignoring=(aiomqtt.MqttError,)
    )


def reflash_then_revoke(controller: Controller, port: int, *, old_session_dropped: bool) -> None:
    """Enroll, re-flash, revoke; ``old_session_dropped``: check the old image's session too."""
    with admin(controller) as api:
        token = api.post("/api/v1/tokens", json={"uses": 2}).json()
        first = enroll(controller, DeviceKey(), token["secret"])
        device_id = first["device_id"]
        old = first["broker"]
        desired = str(DeviceTopic(device_id, Channel.DESIRED))

        async def scenario() -> None:
            async with AsyncExitStack() as stack:
                before = await connect(stack, port, old, "the first login")
                await before.subscribe(desired, qos=1)

                again = await asyncio.to_thread(enroll, controller, DeviceKey(), token["secret"])
                assert again["device_id"] == device_id  # the board was re-flashed
                new = again["broker"]
                assert new["username"] == old["username"] == device_id

                after = await connect(stack, port, new, "the new login")
                await after.subscribe(desired, qos=1)
                assert await refused(port, old)  # the old password is gone
                if old_session_dropped:
                    await disconnected(before)  # and so is a session still open with it

                revoked = await asyncio.to_thread(api.post, f"/api/v1/devices/{device_id}/revoke")
                assert revoked.status_code == 200, revoked.text
                await disconnected(after)  # the live session goes at once
            assert await refused(port, new)  # and it cannot come back

        asyncio.run(scenario())
        detail = api.get(f"/api/v1/devices/{device_id}").json()
        assert (detail["status"], detail["hardware_id"]) == ("revoked", HW)
        # the revoked hardware stays out, whatever the token
        fresh = api.post("/api/v1/tokens", json={}).json()
        body = DeviceKey().request(fresh["secret"], datetime.now(UTC), hardware_id=HW)
        refusal = httpx.post(f"{controller.url}{ENROLL_PATH}", json=body, timeout=10)
        assert refusal.status_code == 403
        assert "with this hardware was revoked" in refusal.json()["error"]["message"]


def test_reflash_then_revoke_on_mosquitto(mosquitto_controller: tuple[Controller, int]) -> None:
    reflash_then_revoke(*mosquitto_controller, old_session_dropped=True)


def test_reflash_then_revoke_on_the_embedded_broker(
    embedded_controller: tuple[Controller, int],
) -> None:
    reflash_then_revoke(*embedded_controller, old_session_dropped=False)


@pytest.mark.xfail(
    strict=True,
    reason="the embedded broker keeps a session whose password changed, and one that a "
    "newer connection with its client id replaced (no MQTT 3.1.1 takeover), even past "
    "revocation: fleet/link/embedded.py drops only sessions whose user is gone",
)
def test_the_embedded_broker_drops_the_old_images_session(
    embedded_controller: tuple[Controller, int],
) -> None:
    reflash_then_revoke(*embedded_controller, old_session_dropped=True)
