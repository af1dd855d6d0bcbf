"""The controller keeps a NATS cluster's users: enrolled devices log in, a revoked one is put out.

Real processes: three ``nats-server`` nodes including the users file the controller
writes (``--broker-auth-format nats``), one ``edgefleet serve`` that SIGHUPs every node
through their pid files, and MQTT clients logging in with the passwords enrollment
handed out (docs/broker.md, "NATS").
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest

from fleet.simulate import Simulation, SimulationConfig
from scripts import servers
from scripts.broker_cluster import NATS_SERVER, NatsNode, first_users_file, nats_cluster
from tests.integration.test_broker_cluster import Peer, Peers
from tests.integration.test_broker_cluster import peers as peers  # the fixture
from tests.integration.test_rollout_controllers import ADMIN_TOKEN, api, ok
from tests.polling import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="nats-server is not installed"),
]

CONTROLLER = "edgefleet-controller"  # FleetSettings.broker_username's default


async def enroll(url: str, devices: int, state_dir: Path) -> list[tuple[str, str]]:
    """``devices`` enrolled through the API; ``(username, password)`` of each."""
    async with api(url) as client:
        await ok(await client.post("/api/v1/groups", json={"name": "lab"}))
        token = await ok(
            await client.post("/api/v1/tokens", json={"uses": devices, "group": "lab"})
        )
    config = SimulationConfig(
        devices=devices, fleet_url=url, token=token["secret"], duration_s=0, state_dir=state_dir
    )
    await Simulation(config).run()
    logins = await asyncio.to_thread(saved_logins, state_dir)
    assert len(logins) == devices
    return logins


def saved_logins(state_dir: Path) -> list[tuple[str, str]]:
    """``(username, password)`` of every enrolled device, from its saved identity."""
    logins = []
    for path in sorted(state_dir.glob("*.json")):
        broker = json.loads(path.read_text())["broker"]
        logins.append((broker["username"], broker["password"]))
    return logins


async def revoke(url: str, device_id: str) -> None:
    async with api(url) as client:
        await ok(await client.post(f"/api/v1/devices/{device_id}/revoke"))


def test_devices_log_in_with_their_enrollment_password_until_revoked(
    tmp_path: Path, peers: Peers
) -> None:
    password = secrets.token_urlsafe(18)
    # The nodes start on what the controller writes before any device enrolled.
    users_file = first_users_file(tmp_path / "data" / "broker", (CONTROLLER, password))
    with nats_cluster(tmp_path / "nats", users_file=users_file) as cluster:
        nodes = [node for node in cluster.nodes if isinstance(node, NatsNode)]
        with servers.running_controller(
            tmp_path,
            f"sqlite:///{tmp_path / 'fleet.db'}",
            "--broker", nodes[0].url,
            "--broker-auth-format", "nats",
            "--broker-pid-file", str(nodes[0].pid_file.with_name("*.pid")),
            env={
                "EDGEFLEET_FLEET_ADMIN_TOKEN": ADMIN_TOKEN,
                "EDGEFLEET_FLEET_BROKER_PASSWORD": password,
            },
            data_dir=tmp_path / "data",
        ) as controller:  # fmt: skip
            (a, a_pw), (b, b_pw) = asyncio.run(enroll(controller.url, 2, tmp_path / "ids"))
            assert "$2a$04$" in users_file.read_text()  # hashes only, never a password
            assert a_pw not in users_file.read_text()

            # Every node knows both devices; each may use its own topics, not the other's.
            for node in nodes:
                peer = peers(node, a, login=(a, a_pw), retrying=True)
                assert peer.subscribe(f"edgefleet/v1/devices/{a}/desired") == [1]
                assert peer.subscribe(f"edgefleet/v1/devices/{b}/desired") == [128]
                peer.close()
            wrong = Peer(nodes[1], b, login=(b, a_pw))
            peers.opened.append(wrong)
            assert wrong.connect() == 135  # CONNACK "not authorized"

            held = peers(nodes[1], a, login=(a, a_pw))
            other = peers(nodes[2], b, login=(b, b_pw))
            asyncio.run(revoke(controller.url, a))
            # Each node drops the revoked device's session at its reload, and refuses it.
            wait_until(held.lost.is_set, "the revoked device's session closed", within_s=30)
            for node in nodes:
                again = Peer(node, a, login=(a, a_pw))
                peers.opened.append(again)
                assert again.connect() == 135
            assert not other.lost.is_set()  # the other device is left alone
            other.publish(f"edgefleet/v1/devices/{b}/events", b"still here")
