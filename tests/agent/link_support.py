"""Helpers for the link's tests: broker accounts, identities, a controller-side watcher.

Broker-independent of the controller on purpose: the broker's password file is written
here in Mosquitto's own ``$7$`` form (PBKDF2-SHA512), and the ACL gives each device its
own topics only, as the controller's does. Desired states are signed by a real TUF
repository's director key (:func:`make_director`), whose root the agent trusts.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import os
import secrets
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt

from agent.link.identity import Identity, StateDir
from fleet.registry.keys import KeyStore
from fleet.registry.repository import TufRepository
from models.director import sign_desired
from models.wire import BrokerCredentials, DesiredState, utc_now
from scripts.servers import MosquittoBroker
from tests.polling import eventually

CONTROLLER = "test-controller"
WITHIN_S = 20.0  # seconds: the link tests' waits (their reconnect backoff is capped at 0.3 s)
CONTROLLER_PASSWORD = "controller-secret"

ACL = """\
user {controller}
topic readwrite edgefleet/#

pattern read edgefleet/v1/devices/%u/desired
pattern read edgefleet/v1/devices/%u/cmd
pattern write edgefleet/v1/devices/%u/reported
pattern write edgefleet/v1/devices/%u/telemetry
pattern write edgefleet/v1/devices/%u/events
"""


def mosquitto_hash(password: str, iterations: int = 101) -> str:
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def authorize(broker: MosquittoBroker, devices: dict[str, str]) -> None:
    """Accounts for the controller and ``devices`` (id -> password), then reload the broker."""
    accounts = {CONTROLLER: CONTROLLER_PASSWORD, **devices}
    lines = [f"{user}:{mosquitto_hash(pw)}" for user, pw in accounts.items()]
    (broker.auth_dir / "passwd").write_text("\n".join(lines) + "\n")
    (broker.auth_dir / "acl").write_text(ACL.format(controller=CONTROLLER))
    os.kill(int(broker.pid_file.read_text()), signal.SIGHUP)
    asyncio.run(_wait_for_login(broker))


async def _wait_for_login(broker: MosquittoBroker, within_s: float = 10.0) -> None:
    async def log_in() -> bool:
        async with controller_client(broker, "probe-login"):
            return True

    await eventually(
        log_in,
        "the broker to accept the controller after reloading its accounts",
        within_s=within_s,
        every_s=0.05,
        ignoring=(aiomqtt.MqttError,),
    )


def controller_client(
    broker: MosquittoBroker, client_id: str, *, clean: bool = True
) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        username=CONTROLLER,
        password=CONTROLLER_PASSWORD,
        identifier=client_id,
        clean_session=clean,
        protocol=aiomqtt.ProtocolVersion.V311,
    )


def write_identity(
    state_dir: Path,
    broker: MosquittoBroker,
    device_id: str,
    password: str,
    *,
    telemetry_interval_s: float = 3600.0,
    fleet_url: str = "http://127.0.0.1:9",
) -> Identity:
    identity = Identity(
        device_id=device_id,
        fleet_url=fleet_url,
        broker=BrokerCredentials(
            url=broker.url, username=device_id, password=password, client_id=device_id
        ),
        telemetry_interval_s=telemetry_interval_s,
        heartbeat_interval_s=30.0,
        enrolled_at=datetime.now(UTC),
    )
    StateDir(state_dir).save_identity(identity)
    return identity


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool

    @property
    def channel(self) -> str:
        return self.topic.rsplit("/", 1)[1]

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Watcher:
    """The controller's view: every message on the devices' topics, in arrival order."""

    broker: MosquittoBroker
    client_id: str = "watcher"
    persistent: bool = False  # keep the subscription (and queue messages) across restarts
    messages: list[Received] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _stop: bool = False

    async def start(self) -> None:
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._run(ready))
        await asyncio.wait_for(ready.wait(), 10)

    async def _run(self, ready: asyncio.Event) -> None:
        while not self._stop:
            try:
                async with controller_client(
                    self.broker, self.client_id, clean=not self.persistent
                ) as client:
                    await client.subscribe("edgefleet/v1/devices/#", qos=1)
                    ready.set()
                    async for message in client.messages:
                        payload = message.payload
                        assert isinstance(payload, bytes | bytearray)
                        self.messages.append(
                            Received(str(message.topic), bytes(payload), message.retain)
                        )
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)  # the broker is down: poll until it is back

    async def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def on(self, channel: str) -> list[Received]:
        return [m for m in self.messages if m.channel == channel]

    async def wait_for(
        self, probe: Callable[[Watcher], Any], what: str, *, within_s: float = WITHIN_S
    ) -> Any:
        """:func:`tests.polling.eventually` over the messages, showing the last ten on timeout."""

        def last_messages() -> str:
            return f"last messages: {[(m.channel, m.payload[:120]) for m in self.messages[-10:]]}"

        return await eventually(lambda: probe(self), what, within_s=within_s, detail=last_messages)


@dataclass
class Director:
    """A fleet's TUF root (for the agent to trust) and the director keys that sign for it."""

    repository: TufRepository
    root_file: Path

    def sign(self, state: DesiredState) -> bytes:
        return sign_desired(state, self.repository.director_signers())


def make_director(folder: Path) -> Director:
    """A new TUF repository in ``folder``, its root saved as ``folder/root.json``."""
    repository = TufRepository(folder / "tuf", KeyStore(folder / "keys"))
    repository.init(utc_now())
    root_file = folder / "root.json"
    root_file.write_bytes(repository.root_json())
    return Director(repository, root_file)


@functools.cache
def shared_director() -> Director:
    """One repository for every link test in this process (creating keys takes a moment)."""
    return make_director(Path(tempfile.mkdtemp(prefix="edgefleet-director-")))
