"""The broker scripts/bench-fleet and scripts/bench-scale run against.

``mosquitto``: one Mosquitto on the password and ACL files the controller writes;
replicas share ingest through an MQTT 5 shared subscription. ``nats``: three
``nats-server`` nodes (MQTT gateway, JetStream R3) behind haproxy in TCP mode, as
tests/integration/test_fleet_on_broker_cluster.py runs them; replicas (one included)
share ingest through JetStream consumers (fleet/link/jetstream.py). Either way the
controller writes the broker's users at each enrollment and makes every node reload.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from broker_cluster import (
    BrokerCluster,
    NatsNode,
    first_users_file,
    nats_cluster,
)
from servers import MosquittoBroker, haproxy

__all__ = ["BROKERS", "BenchBroker", "bench_broker"]

BROKERS = ("mosquitto", "nats")
CONTROLLER_USER = "edgefleet-controller"  # FleetSettings.broker_username's default


class BenchBroker(Protocol):
    name: str
    url: str  # what the controller and the devices connect to

    def pids(self) -> list[int]: ...
    def controller_args(self) -> list[str]: ...
    def replica_env(self, index: int, replicas: int) -> dict[str, str]: ...
    def log(self) -> str: ...


@dataclass
class MosquittoBench:
    broker: MosquittoBroker
    name: str = "mosquitto"

    @property
    def url(self) -> str:
        return self.broker.url

    def pids(self) -> list[int]:
        return [self.broker.process.pid] if self.broker.process else []

    def controller_args(self) -> list[str]:
        return [
            "--broker", self.broker.url, "--broker-auth-dir", str(self.broker.auth_dir),
            "--broker-pid-file", str(self.broker.pid_file),
        ]  # fmt: skip

    def replica_env(self, index: int, replicas: int) -> dict[str, str]:
        if replicas == 1:
            return {}
        return {
            "EDGEFLEET_FLEET_CLIENT_ID": f"edgefleet-controller-r{index}",
            "EDGEFLEET_FLEET_SHARED_SUBSCRIPTION_GROUP": "controllers",
        }

    def log(self) -> str:
        return self.broker.log()


@dataclass
class NatsBench:
    cluster: BrokerCluster
    url: str  # haproxy's
    auth_dir: Path  # where the controller writes the users every node includes
    name: str = "nats"
    nodes: list[NatsNode] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = [node for node in self.cluster.nodes if isinstance(node, NatsNode)]

    def pids(self) -> list[int]:
        return [pid for node in self.nodes if (pid := node.pid) is not None]

    def controller_args(self) -> list[str]:
        return [
            "--broker", self.url, "--broker-auth-format", "nats",
            "--broker-auth-dir", str(self.auth_dir),
            "--broker-pid-file", str(self.nodes[0].pid_file.with_name("*.pid")),
        ]  # fmt: skip

    def replica_env(self, index: int, replicas: int) -> dict[str, str]:
        return {
            "EDGEFLEET_FLEET_CLIENT_ID": f"edgefleet-controller-r{index}",
            "EDGEFLEET_FLEET_NATS_INGEST_URL": ",".join(node.nats_url for node in self.nodes),
        }

    def log(self) -> str:
        return self.cluster.logs()


@contextlib.contextmanager
def bench_broker(
    kind: str, root: Path, controller_password: str, consumer_replicas: int | None = None
) -> Iterator[BenchBroker]:
    """The broker ``kind`` (one of :data:`BROKERS`), started; stopped on the way out.

    ``consumer_replicas``: NATS's ``mqtt.consumer_replicas`` (docs/scale.md).
    """
    if kind == "mosquitto":
        broker = MosquittoBroker(root / "mosquitto")
        broker.start()
        try:
            yield MosquittoBench(broker)
        finally:
            broker.kill()
        return
    if kind != "nats":
        raise ValueError(f"unknown broker {kind!r}: one of {', '.join(BROKERS)}")
    auth_dir = root / "broker-auth"
    users_file = first_users_file(auth_dir, (CONTROLLER_USER, controller_password))
    with nats_cluster(
        root / "nats", consumer_replicas=consumer_replicas, users_file=users_file
    ) as cluster:
        nodes = [node for node in cluster.nodes if isinstance(node, NatsNode)]
        backends = [f"{node.address}:{node.mqtt_port}" for node in nodes]
        health = [node.http_port for node in nodes]
        with haproxy(root / "haproxy", backends, "tcp", health) as lb:
            yield NatsBench(cluster, lb, auth_dir)


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883
