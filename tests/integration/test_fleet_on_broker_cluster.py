"""The controller and its devices on a 3-node NATS cluster: kill a broker node, bring it back.

Real processes: three ``nats-server`` nodes (MQTT gateway, JetStream R3), haproxy in TCP
mode in front of their MQTT ports as a network load balancer would be, ``edgefleet
serve`` on PostgreSQL, and simulated devices. Every MQTT client, the controller
included, connects through haproxy, so a client of the dead node reconnects to a
survivor. The node killed is the one leading ``$MQTT_msgs``, where every QoS 1 message
is stored first: the loss that hurts most (docs/scale.md, "The broker cluster").

NATS reads its users from its configuration, and the controller writes Mosquitto's
files only; so here the test writes the NATS users (``edgefleet_nats_users``: the same
per-device permissions) from the identities the devices enrolled with, and reloads
every node, the way ``sync_auth`` does for Mosquitto. What is checked is read from the
database: every sample a device had acknowledged stored exactly once, and a desired
state set after the node's return served by every device.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from fleet.simulate import Simulation, SimulationConfig
from scripts import servers
from scripts.broker_cluster import (
    NATS_SERVER,
    BrokerCluster,
    edgefleet_nats_users,
    nats_cluster,
    nats_msgs_leader,
    set_nats_users,
)
from tests.integration.test_rollout_controllers import (
    ADMIN_TOKEN,
    STARTS_ON,
    Database,
    all_on_v1,
    api,
    fleet_on_v1,
    until,
)
from tests.integration.test_scale_out import each_acknowledged_sample_stored_once, telemetry_counts

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="nats-server is not installed"),
]

CONTROLLER = "edgefleet-controller"  # FleetSettings.broker_username's default


def device_logins(state_dir: Path) -> list[tuple[str, str]]:
    """``(username, password)`` of every device that enrolled, from its saved identity."""
    logins = []
    for path in sorted(state_dir.glob("*.json")):
        broker = json.loads(path.read_text())["broker"]
        logins.append((broker["username"], broker["password"]))
    return logins


def devices_config(url: str, devices: int, state_dir: Path, **more: object) -> SimulationConfig:
    return SimulationConfig(
        devices=devices,
        fleet_url=url,
        interval_s=0.5,
        models=(STARTS_ON,),
        update_s=1.0,
        update_jitter=0,
        state_dir=state_dir,
        **more,  # type: ignore[arg-type]
    )


async def whole_again(cluster: BrokerCluster, index: int) -> float:
    """Start a killed node again with its data; seconds until the cluster agrees again."""
    started = time.monotonic()
    cluster.nodes[index].start()
    await asyncio.to_thread(cluster.wait_ready)
    return time.monotonic() - started


def test_a_broker_node_killed_while_devices_publish_loses_nothing_and_the_fleet_converges(
    tmp_path: Path, postgres_url: str
) -> None:
    devices = 12
    password = secrets.token_urlsafe(18)
    db = Database(postgres_url)
    state_dir = tmp_path / "identities"

    async def scenario(stack: ExitStack, cluster: BrokerCluster) -> None:
        backends = [url.removeprefix("mqtt://") for url in cluster.urls]
        broker_url = stack.enter_context(servers.haproxy(tmp_path / "lb", backends, mode="tcp"))
        served = stack.enter_context(
            servers.running_controller(
                tmp_path,
                postgres_url,
                "--broker", broker_url,
                "--no-manage-broker-auth",  # NATS's users are written below
                env={
                    "EDGEFLEET_FLEET_ADMIN_TOKEN": ADMIN_TOKEN,
                    "EDGEFLEET_FLEET_BROKER_PASSWORD": password,
                    "EDGEFLEET_FLEET_ROLLOUT_INTERVAL_S": "0.2",
                },
                ready_s=60,
            )
        )  # fmt: skip
        async with api(served.url) as client:
            secret = await fleet_on_v1(client, devices)
        # Enroll, then let the devices in: NATS learns their logins at the reload.
        enroll = devices_config(served.url, devices, state_dir, token=secret, duration_s=0)
        await Simulation(enroll).run()
        logins = device_logins(state_dir)
        assert len(logins) == devices
        users = edgefleet_nats_users((CONTROLLER, password), logins)
        await asyncio.to_thread(set_nats_users, cluster, users)

        async with Simulation(devices_config(served.url, devices, state_dir)) as sim:
            ids = [d.identity.device_id for d in sim.devices]
            await until(lambda: telemetry_counts(db)[0] >= 2 * devices, "samples stored")
            victim = nats_msgs_leader(cluster)
            published = sim.stats.counters.published
            killed_at = time.monotonic()
            await asyncio.to_thread(cluster.nodes[victim].kill)

            def publishing_again() -> bool:
                return sim.stats.counters.published >= published + 2 * devices

            await until(publishing_again, "devices publishing again after the kill")
            print(f"devices publishing again {time.monotonic() - killed_at:.1f} s after the kill")
            back_s = await whole_again(cluster, victim)
            print(f"the killed node back in the cluster in {back_s:.1f} s")
            async with api(served.url) as client:
                await all_on_v1(client, db, ids)
        counters = sim.stats.counters
        await each_acknowledged_sample_stored_once(db, counters.published, counters.sent)

    try:
        with ExitStack() as stack:
            users = edgefleet_nats_users((CONTROLLER, password), [])
            cluster = stack.enter_context(nats_cluster(tmp_path / "nats", users))
            asyncio.run(scenario(stack, cluster))
    finally:
        db.dispose()
