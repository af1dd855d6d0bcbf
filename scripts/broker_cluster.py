"""A real 3-node MQTT broker cluster on loopback, for the scale-out tests and probes.

edgefleet's contract with a broker (docs/broker.md) is plain MQTT: retained desired
states, QoS 1, the controller's persistent session, per-device ACLs, and MQTT 5 shared
subscriptions where the broker has them. A single Mosquitto meets it; this module is for
the question of issue 15, what a *cluster* does with it when a node dies. Two clustered
brokers install from Debian here, so those are the two it runs (docs/scale.md, "The
broker cluster", has what they did):

- :func:`nats_cluster`: ``nats-server`` (2.9), whose MQTT gateway keeps sessions,
  retained and QoS 1 messages in JetStream streams; three nodes make those streams R3,
  so they survive the loss of any one node.
- :func:`rabbitmq_cluster`: ``rabbitmq-server`` (3.10) with the ``rabbitmq_mqtt``
  plugin, three Erlang nodes with their own names, ports, data folders and an ``epmd``
  of their own, sharing one cookie.

Each node lives in its own folder under ``root`` on ports picked free at creation and
kept for its life, so :meth:`kill` (SIGKILL, as a crash or the OOM killer would) and
:meth:`start` (the same node, ports and data) model a node lost and back. Readiness is
polled, never slept for: a node is up when its health endpoint says so, and the cluster
when every running node sees the others. Nothing here uses a fixed port or touches the
system's own brokers (a Mosquitto, NATS or RabbitMQ the machine may run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fleet.link.nats_auth import NATS_USERS_FILE, controller_user, device_user, render_nats_users
from fleet.link.passwords import hash_bcrypt

try:
    from scripts.servers import free_port
except ModuleNotFoundError:  # a bench script, run with scripts/ on sys.path
    from servers import free_port  # type: ignore[no-redef]

if TYPE_CHECKING:
    from scripts.servers import NetworkNamespace

__all__ = [
    "NATS_SERVER",
    "RABBITMQ_SERVER",
    "BrokerCluster",
    "BrokerNode",
    "NatsLogin",
    "NatsNode",
    "NatsUser",
    "RabbitNode",
    "edgefleet_nats_users",
    "first_users_file",
    "free_port",
    "nats_cluster",
    "nats_msgs_leader",
    "rabbitmq_cluster",
    "set_nats_users",
]

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
# Debian's rabbitmq-server (3.10.8 on bookworm) keeps its release under a versioned folder.
RABBITMQ_HOME = max(
    Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*"),
    default=Path("/usr/lib/rabbitmq/lib/rabbitmq_server"),
)
# The scripts themselves, not /usr/sbin's wrappers: those switch to the rabbitmq user,
# which could not write our folders.
RABBITMQ_SERVER = str(RABBITMQ_HOME / "sbin" / "rabbitmq-server")
RABBITMQCTL = str(RABBITMQ_HOME / "sbin" / "rabbitmqctl")

READY_S = 60.0  # a loaded 2-core machine; a ready cluster returns at once
POLL_S = 0.05


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _poll(probe: Callable[[], bool], what: str, within_s: float, log: Callable[[], str]) -> None:
    """Call ``probe`` until it is true; past ``within_s`` fail, naming ``what``, with a log."""
    deadline = time.monotonic() + within_s
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {within_s:g} s\n{log()[-4000:]}")
        time.sleep(POLL_S)  # polling other processes


class BrokerNode(Protocol):
    """One node of a cluster: its MQTT URL, and a life the tests control."""

    name: str
    mqtt_port: int

    @property
    def url(self) -> str: ...
    @property
    def running(self) -> bool: ...
    def start(self) -> None: ...
    def kill(self) -> None: ...
    def stop(self) -> None: ...
    def ready(self) -> bool: ...
    def log(self) -> str: ...


class _Process:
    """A node's server process: started into its log file, killed or stopped by its pid."""

    def __init__(self, log_file: Path) -> None:
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self, command: Sequence[str], env: dict[str, str] | None = None) -> None:
        assert self.process is None, "already running"
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(
                list(command),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its children (Erlang's) die with the group
            )

    def signal(self, sig: signal.Signals, wait_s: float) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


@dataclass
class BrokerCluster:
    """Nodes that form one cluster; :meth:`wait_ready` polls until the running ones agree."""

    nodes: list[BrokerNode]
    agreed: Callable[[list[BrokerNode]], bool]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def wait_ready(self, within_s: float = READY_S) -> None:
        running = [node for node in self.nodes if node.running]
        for node in running:
            _poll(node.ready, f"{node.name} ready", within_s, node.log)
        _poll(lambda: self.agreed(running), "the cluster", within_s, self.logs)

    def logs(self) -> str:
        return "\n".join(f"--- {node.name}\n{node.log()[-3000:]}" for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


# -- NATS -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NatsUser:
    """A login and the NATS subjects it may publish and subscribe to (MQTT ``a/b`` is ``a.b``).

    ``mqtt_only`` keeps the login off the NATS client port (``allowed_connection_types``):
    a device has no business there, and a NATS client could otherwise subscribe to the
    ``$MQTT.sub.`` delivery subjects an MQTT client needs (the gateway refuses MQTT
    subscriptions under that prefix, the NATS protocol cannot).
    """

    name: str
    password: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    mqtt_only: bool = True

    def config(self) -> dict[str, Any]:
        user: dict[str, Any] = {
            "user": self.name,
            "password": self.password,
            "permissions": {
                "publish": {"allow": list(self.publish)},
                "subscribe": {"allow": list(self.subscribe)},
            },
        }
        if self.mqtt_only:
            user["allowed_connection_types"] = ["MQTT"]
        return user


NatsLogin = NatsUser | Mapping[str, Any]
"""A user for a node's ``authorization``: a :class:`NatsUser`, or a nats-server user map."""


def edgefleet_nats_users(
    controller: tuple[str, str], devices: Sequence[tuple[str, str]]
) -> list[NatsLogin]:
    """The controller's rules for NATS (:mod:`fleet.link.nats_auth`), plain passwords in."""
    return [controller_user(*controller), *(device_user(*device) for device in devices)]


def first_users_file(
    auth_dir: Path, controller: tuple[str, str], extra: Sequence[NatsUser] = ()
) -> Path:
    """What a controller writes into ``auth_dir`` before any device enrolled.

    The nodes include it, so it must exist before they start: a deployment's nodes wait
    for the controller to write it (deploy/compose/nats-node.sh); a test writes it first.
    """
    name, password = controller
    auth_dir.mkdir(parents=True, exist_ok=True)
    users_file = auth_dir / NATS_USERS_FILE
    extra_users = [user.config() for user in extra]
    users_file.write_text(render_nats_users(name, hash_bcrypt(password), {}, extra_users))
    return users_file


def _user_map(user: NatsLogin) -> dict[str, Any]:
    return user.config() if isinstance(user, NatsUser) else dict(user)


def _http_json(host: str, port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as answer:
            return json.load(answer)
    except (OSError, ValueError, urllib.error.URLError):
        return None


class NatsNode:
    """One ``nats-server``: client, cluster-route, monitoring and MQTT ports, a JetStream folder."""

    def __init__(
        self,
        root: Path,
        name: str,
        *,
        address: str = "127.0.0.1",
        route_address: str = "127.0.0.1",
        netns: NetworkNamespace | None = None,
    ) -> None:
        """``address`` is where clients reach it, ``route_address`` where other nodes do.

        In ``netns`` it runs in that network namespace (the others reach its route port
        at ``route_address``, which may be on another link than ``address``); outside, with
        a node in a namespace, it listens on every address for that node to reach it.
        """
        self.name = name
        self.root = root
        self.address, self.route_address, self.netns = address, route_address, netns
        self.consumer_replicas: int | None = None  # the MQTT sessions' consumers: as streams
        self.client_port, self.route_port = free_port(), free_port()
        self.http_port, self.mqtt_port = free_port(), free_port()
        self.config_file = root / "nats.conf"
        self.pid_file = root.parent / f"{name}.pid"  # beside its peers': "<root>/*.pid"
        # An authorization block to include (the controller's, broker_auth_format "nats").
        self.users_file: Path | None = None
        self._process = _Process(root / "nats.log")
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"mqtt://{self.address}:{self.mqtt_port}"

    @property
    def nats_url(self) -> str:
        return f"nats://{self.address}:{self.client_port}"

    @property
    def health_url(self) -> str:
        return f"http://{self.address}:{self.http_port}/healthz"

    @property
    def pid(self) -> int | None:
        process = self._process.process
        return process.pid if process is not None and self.running else None

    @property
    def running(self) -> bool:
        return self._process.running

    def configure(self, peers: Sequence[NatsNode], users: Sequence[NatsLogin]) -> None:
        # One node in a namespace: every node listens everywhere, so it can reach them.
        spread = self.netns is not None or any(peer.netns is not None for peer in peers)
        host = "0.0.0.0" if spread else "127.0.0.1"  # test nodes on host-only links
        config: dict[str, Any] = {
            "server_name": self.name,
            "listen": f"{host}:{self.client_port}",
            "http": f"{host}:{self.http_port}",
            "pid_file": str(self.pid_file),
            "jetstream": {"store_dir": str(self.root / "jetstream")},
            "cluster": {
                "name": "edgefleet",
                "listen": f"{host}:{self.route_port}",
                "routes": [
                    f"nats-route://{self._route_to(peer)}:{peer.route_port}" for peer in peers
                ],
                "no_advertise": True,  # the routes above are the whole mesh
            },
            # Said outright: left out, the gateway counts this node's configured routes
            # (two here, so R2) when it first creates its streams.
            "mqtt": {
                "listen": f"{host}:{self.mqtt_port}",
                "stream_replicas": min(3, len(peers) + 1),
                **({"consumer_replicas": self.consumer_replicas} if self.consumer_replicas else {}),
            },
        }
        if users:
            config["authorization"] = {"users": [_user_map(user) for user in users]}
        # NATS reads JSON values, which saves quoting "$MQTT.sub.>" by hand; an include
        # is relative to this file.
        lines = [f"{key}: {json.dumps(value, indent=2)}" for key, value in config.items()]
        if self.users_file is not None:
            lines.append(f'include "{os.path.relpath(self.users_file, self.root)}"')
        self.config_file.write_text("\n".join(lines) + "\n")

    def _route_to(self, peer: NatsNode) -> str:
        return "127.0.0.1" if peer.netns is self.netns else peer.route_address

    def start(self) -> None:
        command = [NATS_SERVER, "-c", str(self.config_file)]
        self._process.spawn(self.netns.command(*command) if self.netns else command)

    def reload(self) -> None:
        """Make the running server re-read its configuration (SIGHUP), users included."""
        if self._process.process is not None and self.running:
            os.kill(self._process.process.pid, signal.SIGHUP)

    def kill(self) -> None:
        self._process.signal(signal.SIGKILL, wait_s=10)

    def stop(self) -> None:
        self._process.signal(signal.SIGTERM, wait_s=30)

    def varz(self, path: str) -> Any:
        return _http_json(self.address, self.http_port, path)

    def ready(self) -> bool:
        """Up, JetStream current with its meta leader (``/healthz``), and MQTT listening."""
        if not self.running:
            raise RuntimeError(f"{self.name} exited\n{self.log()[-4000:]}")
        health = self.varz("/healthz")
        healthy = bool(health and health.get("status") == "ok")
        return healthy and _listening(self.mqtt_port, self.address)

    def log(self) -> str:
        return self._process.log()


def _nats_agreed(nodes: list[BrokerNode]) -> bool:
    """Every node routes to every other, and all name the same JetStream meta leader."""
    leaders = set()
    for node in nodes:
        assert isinstance(node, NatsNode)
        routes, jsz = node.varz("/routez"), node.varz("/jsz")
        if not routes or not jsz or routes.get("num_routes", 0) < len(nodes) - 1:
            return False
        leaders.add((jsz.get("meta_cluster") or {}).get("leader"))
    return len(leaders) == 1 and None not in leaders and "" not in leaders


def set_nats_users(cluster: BrokerCluster, users: Sequence[NatsLogin]) -> None:
    """Give every node ``users`` and make the running ones reload (as ``sync_auth`` would)."""
    nodes = [node for node in cluster.nodes if isinstance(node, NatsNode)]
    for node in nodes:
        node.configure([peer for peer in nodes if peer is not node], users)
        node.reload()


def nats_msgs_leader(cluster: BrokerCluster) -> int:
    """The node leading ``$MQTT_msgs``, where every QoS 1 message is stored first."""
    node = cluster.nodes[0]
    assert isinstance(node, NatsNode)
    jsz = node.varz("/jsz?accounts=true&streams=true")
    for account in jsz["account_details"]:
        for stream in account.get("stream_detail") or []:
            if stream["name"] == "$MQTT_msgs":
                leader = stream["cluster"]["leader"]
                return [n.name for n in cluster.nodes].index(leader)
    raise AssertionError(f"no $MQTT_msgs stream: {jsz}")


@contextmanager
def nats_cluster(
    root: Path,
    users: Sequence[NatsLogin] = (),
    size: int = 3,
    netns: NetworkNamespace | None = None,
    consumer_replicas: int | None = None,
    users_file: Path | None = None,
) -> Iterator[BrokerCluster]:
    """``size`` NATS nodes with MQTT and JetStream, clustered and ready; killed on the way out.

    No ``users``: anyone may connect and do anything. With them, only they may, each
    within its permissions. With ``netns`` (two links), the first node runs in it: its
    clients reach it over the first link, the other nodes over the second, so cutting
    the second partitions it from its peers and nothing else. ``consumer_replicas`` sets
    the gateway's ``mqtt.consumer_replicas`` (a JetStream consumer per QoS 1
    subscription; left out, as many replicas as the streams: docs/scale.md).
    ``users_file`` is included by every node: the users a controller writes there
    (``broker_auth_format`` "nats"), reloaded through the pid files ``<root>/*.pid``.
    It must exist before the nodes start.
    """
    nodes = [NatsNode(root / f"nats-{i}", f"n{i}") for i in range(1, size + 1)]
    if netns is not None:
        clients, routes = netns.links[0], netns.links[1]
        nodes[0] = NatsNode(
            root / "nats-1",
            "n1",
            address=clients.inside_ip,
            route_address=routes.inside_ip,
            netns=netns,
        )
        for node in nodes[1:]:
            node.route_address = routes.host_ip
    for node in nodes:
        node.consumer_replicas = consumer_replicas
        node.users_file = users_file
        node.configure([peer for peer in nodes if peer is not node], users)
    cluster = BrokerCluster(list[BrokerNode](nodes), _nats_agreed)
    try:
        for node in nodes:
            node.start()
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


# -- RabbitMQ -------------------------------------------------------------------------------


class RabbitNode:
    """One RabbitMQ node, ``ef<i>@localhost``, with the MQTT plugin and its own folders."""

    def __init__(self, root: Path, index: int, epmd_port: int, cookie: str) -> None:
        self.name = f"ef{index}@localhost"
        self.root = root
        self.amqp_port, self.dist_port = free_port(), free_port()
        self.mqtt_port = free_port()
        self.epmd_port = epmd_port
        self._process = _Process(root / "console.log")
        root.mkdir(parents=True, exist_ok=True)
        (root / "home").mkdir(exist_ok=True)
        cookie_file = root / "home" / ".erlang.cookie"
        cookie_file.write_text(cookie)
        cookie_file.chmod(0o400)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        return self._process.running

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.root / "home"),  # where Erlang reads the shared cookie
            "ERL_EPMD_PORT": str(self.epmd_port),  # our own epmd, not the system's
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "rabbit.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
        }

    def configure(self, peers: Sequence[RabbitNode], durable_queue_type: str) -> None:
        names = [self.name, *(peer.name for peer in peers)]
        lines = [
            "loopback_users = none",
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}",
            f"mqtt.listeners.tcp.1 = 127.0.0.1:{self.mqtt_port}",
            "mqtt.allow_anonymous = true",
            # A persistent session's queue: "quorum" is replicated (Raft, on every node
            # here); "classic", the default, lives on the node where the session began.
            f"mqtt.durable_queue_type = {durable_queue_type}",
            "cluster_formation.peer_discovery_backend = classic_config",
            *(
                f"cluster_formation.classic_config.nodes.{i} = {name}"
                for i, name in enumerate(sorted(names), 1)
            ),
            "cluster_partition_handling = pause_minority",
            "log.file.level = info",
        ]
        (self.root / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (self.root / "advanced.config").write_text("[].\n")
        (self.root / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.root / "rabbitmq-env.conf").write_text("")

    def start(self) -> None:
        self._process.spawn([RABBITMQ_SERVER], env=self.env())

    def kill(self) -> None:
        self._process.signal(signal.SIGKILL, wait_s=10)

    def stop(self) -> None:
        self._process.signal(signal.SIGTERM, wait_s=60)

    def ctl(self, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RABBITMQCTL, "-n", self.name, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def ready(self) -> bool:
        """The MQTT listener is up: the plugin starts last, after the node joined its peers."""
        if not self.running:
            raise RuntimeError(f"{self.name} exited\n{self.log()[-4000:]}")
        return _listening(self.mqtt_port)

    def running_nodes(self) -> list[str]:
        status = self.ctl("cluster_status", "--formatter", "json")
        if status.returncode != 0:
            return []
        return list(json.loads(status.stdout).get("running_nodes", []))

    def log(self) -> str:
        logs = sorted((self.root / "log").glob("*.log")) if (self.root / "log").exists() else []
        return self._process.log() + "".join(p.read_text(errors="replace") for p in logs)


def _rabbit_agreed(nodes: list[BrokerNode]) -> bool:
    want = sorted(node.name for node in nodes)
    for node in nodes:
        assert isinstance(node, RabbitNode)
        if sorted(node.running_nodes()) != want:
            return False
    return True


@contextmanager
def rabbitmq_cluster(
    root: Path, size: int = 3, durable_queue_type: str = "quorum"
) -> Iterator[BrokerCluster]:
    """``size`` RabbitMQ nodes with the MQTT plugin, clustered and ready; killed on the way out.

    ``durable_queue_type`` is where persistent sessions keep their QoS 1 messages: on
    "classic" queues a session's messages live on one node and are dropped while it is
    down (docs/scale.md); "quorum" replicates them.

    They run their own ``epmd`` on a free port (``ERL_EPMD_PORT``), so the system's
    RabbitMQ and its epmd are never involved.
    """
    epmd_port = free_port()
    cookie = os.urandom(16).hex()
    nodes = [RabbitNode(root / f"rabbit-{i}", i, epmd_port, cookie) for i in range(1, size + 1)]
    for node in nodes:
        node.configure([peer for peer in nodes if peer is not node], durable_queue_type)
    epmd = subprocess.Popen(
        ["epmd", "-port", str(epmd_port), "-address", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cluster = BrokerCluster(list[BrokerNode](nodes), _rabbit_agreed)
    try:
        _poll(lambda: _listening(epmd_port), "epmd", 10, lambda: "")
        # The first node alone, then the rest: booted together, classic_config peer
        # discovery races (each finds the others without tables yet, "tables_not_present")
        # and retries for up to minutes.
        nodes[0].start()
        _poll(nodes[0].ready, f"{nodes[0].name} ready", READY_S, nodes[0].log)
        for node in nodes[1:]:
            node.start()
        cluster.wait_ready(within_s=120)
        yield cluster
    finally:
        cluster.stop()
        epmd.kill()
        epmd.wait(timeout=10)
