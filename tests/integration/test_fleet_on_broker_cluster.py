"""Two controller replicas and their devices on a 3-node NATS cluster: kill a node, a replica.

Real processes: three ``nats-server`` nodes (MQTT gateway, JetStream R3), haproxy in TCP
mode in front of their MQTT ports as a network load balancer would be, two ``edgefleet
serve`` replicas on PostgreSQL, and simulated devices. Every MQTT client, the replicas
included, connects through haproxy, so a client of the dead node reconnects to a
survivor. NATS's gateway has no MQTT 5 shared subscriptions, so the replicas share
ingest by pulling from JetStream consumers on ``$MQTT_msgs`` (``fleet/link/jetstream.py``),
where every QoS 1 message is stored first. The node killed is the one leading that
stream: the loss that hurts most (docs/scale.md, "The broker cluster"). Then one replica
is SIGKILLed and never restarted: what it held unacknowledged goes to the other.

The replicas write the NATS users (``--broker-auth-format nats``): one file every node
includes, each enrolled device with its own permissions, and SIGHUP every node through
its pid file, as in production (docs/broker.md, "NATS"). The devices log in with the
password enrollment gave them. What is checked is read from the database: every sample
a device had acknowledged stored exactly once, and a desired state set after the faults
served by every device.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.simulate import Simulation, SimulationConfig
from scripts import servers
from scripts.broker_cluster import (
    NATS_SERVER,
    BrokerCluster,
    NatsNode,
    NatsUser,
    first_users_file,
    nats_cluster,
    nats_msgs_leader,
)
from tests.integration.test_rollout_controllers import (
    ADMIN_TOKEN,
    STARTS_ON,
    Database,
    all_on_v1,
    api,
    fleet_on_v1,
    ok,
    until,
)
from tests.integration.test_scale_out import each_acknowledged_sample_stored_once, telemetry_counts

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="nats-server is not installed"),
]

CONTROLLER = "edgefleet-controller"  # FleetSettings.broker_username's default


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


# A node back is one whose every stream and session consumer is current again (plain
# /healthz): devices get desired states through those consumers. That took 15-25 s
# alone, and over 60 s once with the whole suite running beside it; once, two devices
# that reconnected while consumers were stalled got a desired state set after the
# faults later than 45 s. Every wait after a fault on this cluster is allowed as long.
RECOVERY_S = 180.0


async def all_on_v1_after_a_fault(client: httpx.AsyncClient, db: Database, ids: list[str]) -> None:
    put_at = time.monotonic()
    await all_on_v1(client, db, ids, within_s=RECOVERY_S)
    print(f"every device serving 1.0 {time.monotonic() - put_at:.1f} s after the PUT")


async def whole_again(cluster: BrokerCluster, index: int) -> float:
    """Start a killed node again with its data; seconds until the cluster agrees again."""
    started = time.monotonic()
    cluster.nodes[index].start()
    await asyncio.to_thread(cluster.wait_ready, RECOVERY_S)
    return time.monotonic() - started


ACK_WAIT_S = "3"  # a killed replica's unacknowledged messages go to the other after 3 s


def replica(
    tmp_path: Path,
    postgres_url: str,
    cluster: BrokerCluster,
    broker_url: str,
    password: str,
    name: str,
) -> AbstractContextManager[servers.Controller]:
    """Replica ``name`` through haproxy, pulling device messages from every node.

    Both replicas write the same users file (``<data>/broker``) and reload every node.
    """
    nodes = [node for node in cluster.nodes if isinstance(node, NatsNode)]
    nats_urls = ",".join(node.nats_url for node in nodes)
    return servers.running_controller(
        tmp_path,
        postgres_url,
        "--broker", broker_url,
        "--broker-auth-format", "nats",
        "--broker-pid-file", str(nodes[0].pid_file.with_name("*.pid")),
        env={
            "EDGEFLEET_FLEET_ADMIN_TOKEN": ADMIN_TOKEN,
            "EDGEFLEET_FLEET_BROKER_PASSWORD": password,
            "EDGEFLEET_FLEET_ROLLOUT_INTERVAL_S": "0.2",
            "EDGEFLEET_FLEET_LEADER_LEASE_S": "2",
            "EDGEFLEET_FLEET_CLIENT_ID": f"edgefleet-controller-{name}",
            "EDGEFLEET_FLEET_NATS_INGEST_URL": nats_urls,
            "EDGEFLEET_FLEET_NATS_INGEST_ACK_WAIT_S": ACK_WAIT_S,
            "EDGEFLEET_FLEET_NATS_EXTRA_USERS_FILE": str(admin_file(tmp_path)),
        },
        ready_s=60,
        name=name,
        data_dir=tmp_path / "data",
    )  # fmt: skip


async def link_of(running: servers.Controller) -> dict[str, Any]:
    async with api(running.url) as client:
        return dict((await ok(await client.get("/api/v1/status")))["link"])


async def stored_by(running: servers.Controller) -> int:
    return int((await link_of(running))["stored"])


ADMIN = NatsUser("test-admin", secrets.token_urlsafe(18), (">",), (">",), mqtt_only=False)


def admin_file(tmp_path: Path) -> Path:
    """The test's own NATS login, which the replicas write beside theirs (stepdowns)."""
    path = tmp_path / "nats-admin.json"
    if not path.exists():
        path.write_text(json.dumps([ADMIN.config()]))
    return path


@dataclass
class NatsFleet:
    """Two replicas (``a``, ``b``) and ``devices`` enrolled devices on a NATS cluster."""

    cluster: BrokerCluster
    a: servers.Controller
    b: servers.Controller
    state_dir: Path
    devices: int

    def simulation(self) -> Simulation:
        return Simulation(devices_config(self.a.url, self.devices, self.state_dir))


async def fleet_on_nats(
    stack: ExitStack,
    tmp_path: Path,
    postgres_url: str,
    devices: int,
    netns: servers.NetworkNamespace | None = None,
) -> NatsFleet:
    """The cluster, haproxy in front of it, two replicas; devices enrolled.

    haproxy checks each node's ``/healthz`` (docs/scale.md): a node that lost its
    cluster leaves the rotation, though its MQTT port still answers. The nodes start on
    the users file a replica writes before any device enrolled, as a deployment's nodes
    wait for it (deploy/compose).
    """
    password = secrets.token_urlsafe(18)
    users_file = first_users_file(tmp_path / "data" / "broker", (CONTROLLER, password), [ADMIN])
    cluster = stack.enter_context(
        nats_cluster(tmp_path / "nats", netns=netns, users_file=users_file)
    )
    nodes = [node for node in cluster.nodes if isinstance(node, NatsNode)]
    backends = [f"{node.address}:{node.mqtt_port}" for node in nodes]
    health = [node.http_port for node in nodes]
    lb = stack.enter_context(servers.haproxy(tmp_path / "lb", backends, "tcp", health))
    a, b = [
        await asyncio.to_thread(
            stack.enter_context, replica(tmp_path, postgres_url, cluster, lb, password, name)
        )
        for name in ("a", "b")
    ]
    async with api(a.url) as client:
        secret = await fleet_on_v1(client, devices)
    # Each enrollment rewrites the users file and reloads every node.
    state_dir = tmp_path / "identities"
    enroll = devices_config(a.url, devices, state_dir, token=secret, duration_s=0)
    await Simulation(enroll).run()
    assert len(list(state_dir.glob("*.json"))) == devices
    return NatsFleet(cluster, a, b, state_dir, devices)


def run_with(db: Database, scenario: Callable[[ExitStack], Awaitable[None]]) -> None:
    """Run ``scenario`` with an exit stack for what it starts; the database let go after."""
    try:
        with ExitStack() as stack:
            asyncio.run(scenario(stack))
    finally:
        db.dispose()


async def both_store(fleet: NatsFleet) -> bool:
    """Both replicas pull from JetStream, and each has stored some of what they pulled."""
    links = [await link_of(fleet.a), await link_of(fleet.b)]
    return all(link["ingest"] == "jetstream" and link["stored"] > 0 for link in links)


def test_a_broker_node_and_a_replica_killed_while_devices_publish_lose_nothing(
    tmp_path: Path, postgres_url: str
) -> None:
    db = Database(postgres_url)

    async def scenario(stack: ExitStack) -> None:
        fleet = await fleet_on_nats(stack, tmp_path, postgres_url, devices=12)
        cluster, a, b, devices = fleet.cluster, fleet.a, fleet.b, fleet.devices
        async with fleet.simulation() as sim:
            ids = [d.identity.device_id for d in sim.devices]
            await until(lambda: both_store(fleet), "both replicas storing samples")
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
            # Replica b dies for good, with whatever it had pulled and not acknowledged.
            assert await asyncio.to_thread(b.kill) == -9
            at_kill = await stored_by(a)

            async def a_alone_stores() -> bool:
                return await stored_by(a) > at_kill + 2 * devices

            await until(a_alone_stores, "replica a storing everything")
            async with api(a.url) as client:
                await all_on_v1_after_a_fault(client, db, ids)
        counters = sim.stats.counters
        await each_acknowledged_sample_stored_once(db, counters.published, counters.sent)

    run_with(db, scenario)


def msgs_leader_now(cluster: BrokerCluster) -> int | None:
    """The node leading ``$MQTT_msgs``; None while it elects one."""
    try:
        return nats_msgs_leader(cluster)
    except (AssertionError, KeyError, ValueError):
        return None


async def lead_msgs_stream(cluster: BrokerCluster, index: int) -> None:
    """Make node ``index`` the leader of ``$MQTT_msgs``: step the leader down until it is."""
    import nats

    survivor = cluster.nodes[(index + 1) % len(cluster.nodes)]
    assert isinstance(survivor, NatsNode)
    client = await nats.connect(survivor.nats_url, user=ADMIN.name, password=ADMIN.password)
    try:
        for _ in range(20):
            await until(lambda: msgs_leader_now(cluster) is not None, "a $MQTT_msgs leader")
            leader = msgs_leader_now(cluster)
            if leader == index:
                return
            await client.request("$JS.API.STREAM.LEADER.STEPDOWN.$MQTT_msgs", b"", timeout=10)

            def moved(was: int | None = leader) -> bool:
                return msgs_leader_now(cluster) not in (was, None)

            await until(moved, "a new $MQTT_msgs leader")
    finally:
        await client.close()
    raise AssertionError(f"{cluster.nodes[index].name} never led $MQTT_msgs")


def test_a_broker_node_cut_off_from_its_peers_loses_nothing_and_the_fleet_converges(
    tmp_path: Path, postgres_url: str
) -> None:
    """The node leading ``$MQTT_msgs`` loses its routes; its clients can still reach it.

    Node n1 runs in a network namespace with two links: its clients reach it over the
    first, the other nodes over the second, which is cut. It is then a minority of one:
    it cannot store a QoS 1 message or serve a session, while its MQTT port answers.
    haproxy's ``/healthz`` check takes it out of the rotation; its clients' connections
    fail and they reconnect to the majority, which elects new leaders. After the heal it
    catches up. Every sample a device had acknowledged is stored once, and a desired
    state set afterwards reaches every device.
    """
    db = Database(postgres_url)

    async def scenario(stack: ExitStack) -> None:
        ns = stack.enter_context(servers.network_namespace(links=2))
        fleet = await fleet_on_nats(stack, tmp_path, postgres_url, devices=12, netns=ns)
        cluster, a, devices = fleet.cluster, fleet.a, fleet.devices
        async with fleet.simulation() as sim:
            ids = [d.identity.device_id for d in sim.devices]
            await until(lambda: both_store(fleet), "both replicas storing samples")
            await lead_msgs_stream(cluster, 0)
            published, stored = sim.stats.counters.published, telemetry_counts(db)[0]
            cut_at = time.monotonic()
            await asyncio.to_thread(ns.cut, 1)  # n1's routes; its client link stays up
            n1 = cluster.nodes[0]
            assert isinstance(n1, NatsNode)

            def n1_says_it_is_cut_off() -> bool:  # what haproxy checks
                return (n1.varz(servers.NATS_LB_HEALTH) or {}).get("status") != "ok"

            await until(n1_says_it_is_cut_off, "n1 unhealthy to the load balancer")
            print(f"n1 unhealthy {time.monotonic() - cut_at:.1f} s after the cut")

            def publishing_again() -> bool:
                return sim.stats.counters.published >= published + 2 * devices

            await until(publishing_again, "devices publishing again after the cut")
            print(f"devices publishing again {time.monotonic() - cut_at:.1f} s after the cut")
            # The replicas pull from the majority meanwhile, whichever node they were on.
            more = stored + 2 * devices
            await until(lambda: telemetry_counts(db)[0] >= more, "samples stored during the cut")
            healed_at = time.monotonic()
            await asyncio.to_thread(ns.heal, 1)
            await asyncio.to_thread(cluster.wait_ready, RECOVERY_S)
            print(f"n1 back in the cluster {time.monotonic() - healed_at:.1f} s after the heal")
            async with api(a.url) as client:
                await all_on_v1_after_a_fault(client, db, ids)
        counters = sim.stats.counters
        await each_acknowledged_sample_stored_once(db, counters.published, counters.sent)

    run_with(db, scenario)
