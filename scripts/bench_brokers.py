"""The broker scripts/bench-fleet and scripts/bench-scale run against.

``mosquitto``: one Mosquitto on the password and ACL files the controller writes;
replicas share ingest through an MQTT 5 shared subscription. ``nats``: three
``nats-server`` nodes (MQTT gateway, JetStream R3) behind haproxy in TCP mode, as
tests/integration/test_fleet_on_broker_cluster.py runs them; replicas (one included)
share ingest through JetStream consumers (fleet/link/jetstream.py), and the devices'
NATS users are written once they have enrolled, as that test does (the controller
writes Mosquitto's files only: docs/scale.md).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from broker_cluster import (
    BrokerCluster,
    NatsNode,
    edgefleet_nats_users,
    nats_cluster,
    set_nats_users,
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
    def admit(self, state_dir: Path) -> None: ...
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

    def admit(self, state_dir: Path) -> None:
        """Nothing to do: the controller wrote Mosquitto's files at each enrollment."""

    def log(self) -> str:
        return self.broker.log()


@dataclass
class NatsBench:
    cluster: BrokerCluster
    url: str  # haproxy's
    password: str  # the controller's
    name: str = "nats"
    nodes: list[NatsNode] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = [node for node in self.cluster.nodes if isinstance(node, NatsNode)]

    def pids(self) -> list[int]:
        return [pid for node in self.nodes if (pid := node.pid) is not None]

    def controller_args(self) -> list[str]:
        return ["--broker", self.url, "--no-manage-broker-auth"]

    def replica_env(self, index: int, replicas: int) -> dict[str, str]:
        return {
            "EDGEFLEET_FLEET_CLIENT_ID": f"edgefleet-controller-r{index}",
            "EDGEFLEET_FLEET_NATS_INGEST_URL": ",".join(node.nats_url for node in self.nodes),
        }

    def admit(self, state_dir: Path) -> None:
        """Write every enrolled device's NATS user, with its permissions, and reload."""
        logins = []
        for path in sorted(state_dir.glob("*.json")):
            broker = json.loads(path.read_text())["broker"]
            logins.append((broker["username"], broker["password"]))
        set_nats_users(self.cluster, edgefleet_nats_users((CONTROLLER_USER, self.password), logins))

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
    users = edgefleet_nats_users((CONTROLLER_USER, controller_password), [])
    with nats_cluster(root / "nats", users, consumer_replicas=consumer_replicas) as cluster:
        nodes = [node for node in cluster.nodes if isinstance(node, NatsNode)]
        backends = [f"{node.address}:{node.mqtt_port}" for node in nodes]
        health = [node.http_port for node in nodes]
        with haproxy(root / "haproxy", backends, "tcp", health) as lb:
            yield NatsBench(cluster, lb, controller_password)


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883
