"""A real 3-node MQTT broker cluster, across nodes: what edgefleet's contract asks of it.

For each clustered broker that installs here (``scripts/broker_cluster.py``): a retained
desired state reaches a subscriber on another node, also once the node that took it is
dead; a persistent session's QoS 1 messages wait for it and follow it to another node;
a node killed while a publisher sends QoS 1 loses nothing (duplicates are counted, not
refused); and what the broker answers to MQTT 5 and to ``$share/``. Each engine's row in
:data:`ENGINES` is what it was measured to do (docs/scale.md, "The broker cluster"), and
the tests hold it to that, so an upgrade that changes a behaviour fails here. On NATS,
also: per-device logins and permissions, and controller replicas sharing ingest through
a JetStream work queue instead of MQTT 5 shared subscriptions (needs ``nats-py``).

Absence is never waited out: a subscriber that should *not* get a retained message
publishes a marker on the same topic after its SUBACK, and when the marker arrives
whatever was retained would have come before it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from scripts.broker_cluster import (
    NATS_SERVER,
    RABBITMQ_SERVER,
    BrokerCluster,
    BrokerNode,
    NatsNode,
    NatsUser,
    edgefleet_nats_users,
    nats_cluster,
    nats_msgs_leader,
    rabbitmq_cluster,
)
from tests.polling import wait_until

pytestmark = pytest.mark.integration

WITHIN_S = 60.0

# -- an MQTT peer -------------------------------------------------------------------------


class Peer:
    """One paho client (MQTT 3.1.1) that records what it gets; it never reconnects by itself.

    A test decides where a client goes after its node dies, so paho's own reconnect loop
    (which would retry the dead node) is off.
    """

    def __init__(
        self,
        node: BrokerNode,
        client_id: str | None = None,
        *,
        clean: bool = True,
        login: tuple[str, str] | None = None,
    ) -> None:
        self.node = node
        self.client_id = client_id or f"t-{uuid.uuid4().hex[:12]}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        if login is not None:
            self.client.username_pw_set(*login)
        self.lock = threading.Lock()
        self.messages: list[mqtt.MQTTMessage] = []
        self.subacks: dict[int, list[int]] = {}
        self.acked: set[int] = set()
        self.first_ack_at: float | None = None  # time.monotonic() of its first PUBACK
        self.connack: ReasonCode | None = None
        self.session_present = False
        self.lost = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def _on_connect(
        self, _c: object, _u: object, flags: object, rc: ReasonCode, _p: object
    ) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        self.connack = rc

    def _on_disconnect(self, *_args: object) -> None:
        self.lost.set()

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(message)

    def _on_subscribe(
        self, _c: object, _u: object, mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        self.subacks[mid] = [code.value for code in codes]

    def _on_publish(self, _c: object, _u: object, mid: int, *_rest: object) -> None:
        with self.lock:
            self.acked.add(mid)
            if self.first_ack_at is None:
                self.first_ack_at = time.monotonic()

    def connect(self) -> int:
        """Connect and return the CONNACK code (paho's MQTT 5 numbering: 0 ok, 135 refused)."""
        self.client.connect("127.0.0.1", self.node.mqtt_port, keepalive=10)
        self.client.loop_start()
        wait_until(
            lambda: self.connack is not None or self.lost.is_set(), f"CONNACK from {self.node.name}"
        )
        return self.connack.value if self.connack is not None else -1

    def subscribe(self, *filters: str, qos: int = 1) -> list[int]:
        """Subscribe and return the SUBACK codes (1: granted QoS 1, 128: refused)."""
        _, mid = self.client.subscribe([(f, qos) for f in filters])
        return wait_until(lambda: self.subacks.get(mid), f"SUBACK for {filters}")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        mid = self.client.publish(topic, payload, qos=1, retain=retain).mid
        wait_until(lambda: mid in self.acked, f"PUBACK for {topic}")

    def payloads(self, topic: str | None = None) -> list[bytes]:
        with self.lock:
            return [m.payload for m in self.messages if topic is None or m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        # Our callbacks tie the client to us in a cycle; cut it, so that the client is freed
        # (and closes its sockets) at once, not by the garbage collector in any order.
        self.client.on_connect = self.client.on_disconnect = self.client.on_message = None
        self.client.on_subscribe = self.client.on_publish = None


@dataclass
class Peers:
    """Every peer a test opened, closed at its end."""

    opened: list[Peer] = field(default_factory=list)
    waited_s: float = 0.0  # how long the last one took to be accepted

    def __call__(
        self,
        node: BrokerNode,
        client_id: str | None = None,
        *,
        retrying: bool = False,
        **kw: object,
    ) -> Peer:
        """A connected peer; ``retrying``: connect again until accepted, as a device does."""
        started = time.monotonic()

        def attempt() -> Peer | None:
            peer = Peer(node, client_id, **kw)  # type: ignore[arg-type]
            self.opened.append(peer)
            code = peer.connect()
            if code != 0:
                assert retrying, f"CONNACK {code} from {node.name}"
                peer.close()
                return None
            return peer

        retry_on = (OSError,) if retrying else ()  # refused: the node is not up yet
        peer = wait_until(attempt, f"a session on {node.name}", every_s=0.1, ignoring=retry_on)
        self.waited_s = time.monotonic() - started
        return peer


@pytest.fixture
def peers() -> Iterator[Peers]:
    opened = Peers()
    yield opened
    for peer in opened.opened:
        peer.close()


def retained_on(
    peers: Peers, node: BrokerNode, topic: str, *, retrying: bool = False
) -> list[bytes]:
    """The retained payloads a new subscriber on ``node`` gets for ``topic``.

    A marker published on the same topic after the SUBACK closes the wait: the broker
    sends retained messages when it handles the SUBSCRIBE, so they come before it.
    ``retrying``: a refused CONNECT or SUBSCRIBE is tried again, as a device would.
    """

    def attempt() -> tuple[list[bytes]] | None:
        subscriber = peers(node, retrying=retrying)
        suback = subscriber.subscribe(topic)
        if suback != [1]:
            assert retrying, f"SUBACK {suback} from {node.name}"
            subscriber.close()
            return None
        subscriber.publish(topic, b"marker")
        wait_until(lambda: b"marker" in subscriber.payloads(), f"the marker on {node.name}")
        with subscriber.lock:
            return ([m.payload for m in subscriber.messages if m.retain],)

    return wait_until(attempt, f"a subscription on {node.name}", every_s=0.1)[0]


def mqtt5_connack(node: BrokerNode) -> bytes:
    """The raw answer to an MQTT 5 CONNECT: b"" when the broker closes without a CONNACK."""
    connect = bytes.fromhex("100f00044d5154540502003c000002") + b"v5"
    with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as s:
        s.sendall(connect)
        answer = b""
        while len(answer) < 4 and (chunk := s.recv(4 - len(answer))):
            answer += chunk
        return answer


# -- the engines ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    """A clustered broker, and what it was measured to do (docs/scale.md)."""

    name: str
    binary: str
    cluster: Callable[[Path], AbstractContextManager[BrokerCluster]]
    victim: Callable[[BrokerCluster], int]  # the node whose loss should hurt most
    retained_across_nodes: bool  # a retained message reaches subscribers on other nodes
    retained_survives_kill: bool  # an acknowledged retained message outlives a SIGKILL
    mqtt5_connack: bytes  # the raw answer to an MQTT 5 CONNECT
    share_suback: list[int]  # SUBACK for "$share/g/<topic>" on MQTT 3.1.1


ENGINES = [
    Engine(
        "nats",
        NATS_SERVER,
        nats_cluster,
        nats_msgs_leader,
        retained_across_nodes=True,
        retained_survives_kill=True,  # stored R3 before the PUBACK
        mqtt5_connack=bytes([0x20, 0x02, 0x00, 0x01]),  # 3.1.1 "unacceptable protocol version"
        share_suback=[1],  # granted, as a plain topic whose first level is "$share"
    ),
    Engine(
        "rabbitmq",
        RABBITMQ_SERVER,
        rabbitmq_cluster,
        lambda _cluster: 0,  # any: test (c) starts the subscriber's session on it
        retained_across_nodes=False,  # a DETS file on the node that took it
        retained_survives_kill=False,  # only what DETS saved (every 2 s) before the kill
        mqtt5_connack=b"",  # the connection is closed without a CONNACK
        share_suback=[1],
    ),
]


@pytest.fixture(scope="module", params=ENGINES, ids=lambda e: e.name)
def engine(request: pytest.FixtureRequest) -> Engine:
    engine: Engine = request.param
    if not os.access(engine.binary, os.X_OK):
        pytest.skip(f"{engine.binary} is not installed (Debian's {engine.name} package)")
    return engine


@pytest.fixture(scope="module")
def cluster(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerCluster]:
    started = time.monotonic()
    with engine.cluster(tmp_path_factory.mktemp(engine.name)) as running:
        print(f"{engine.name}: 3 nodes ready in {time.monotonic() - started:.1f} s")
        yield running


@pytest.fixture
def healthy(cluster: BrokerCluster) -> Iterator[BrokerCluster]:
    """The shared cluster, whole at the start of a test and again at its end."""
    assert all(node.running for node in cluster.nodes), "a node was left dead"
    yield cluster
    for node in cluster.nodes:
        if not node.running:
            node.start()
    cluster.wait_ready()


def restart(cluster: BrokerCluster, index: int) -> float:
    """Start a killed node again with its data; seconds until the cluster is whole again."""
    started = time.monotonic()
    cluster.nodes[index].start()
    cluster.wait_ready()
    return time.monotonic() - started


def device_topic(channel: str) -> str:
    return f"edgefleet/v1/devices/dev-{uuid.uuid4().hex[:12]}/{channel}"


# -- (a) retained ------------------------------------------------------------------------


def test_a_retained_desired_state_across_nodes_and_after_its_node_dies(
    engine: Engine, healthy: BrokerCluster, peers: Peers
) -> None:
    n1, n2, n3 = healthy.nodes
    topic = device_topic("desired")
    peers(n1).publish(topic, b"desired-v1", retain=True)

    assert retained_on(peers, n1, topic) == [b"desired-v1"]
    expected = [b"desired-v1"] if engine.retained_across_nodes else []
    assert retained_on(peers, n3, topic) == expected

    n1.kill()
    killed_at = time.monotonic()
    # Until the cluster has moved what n1 led, a CONNECT or SUBSCRIBE may be refused.
    assert retained_on(peers, n2, topic, retrying=True) == expected
    print(f"{engine.name}: a subscriber on n2 served {time.monotonic() - killed_at:.1f} s after")
    print(f"{engine.name}: node 1 back in {restart(healthy, 0):.1f} s")
    kept = retained_on(peers, n1, topic, retrying=True)
    print(f"{engine.name}: after its restart, node 1 kept {kept}")
    if engine.retained_survives_kill:
        assert kept == [b"desired-v1"]
    else:
        assert kept in ([], [b"desired-v1"])


# -- (b) a persistent session ------------------------------------------------------------


def test_b_persistent_session_gets_what_was_sent_while_away_on_another_node(
    engine: Engine, healthy: BrokerCluster, peers: Peers
) -> None:
    n1, n2, n3 = healthy.nodes
    topic, count = device_topic("telemetry"), 50
    client_id = f"controller-{uuid.uuid4().hex[:8]}"

    away = peers(n2, client_id, clean=False)
    assert away.subscribe(topic) == [1]
    away.close()

    publisher = peers(n1)
    for i in range(count):
        publisher.publish(topic, str(i).encode())

    back = peers(n3, client_id, clean=False)
    assert back.session_present
    want = {str(i).encode() for i in range(count)}
    wait_until(lambda: want <= set(back.payloads()), "every message sent while away")
    got = back.payloads()
    print(
        f"{engine.name}: {len(got)} delivered for {count}, in order: {got == sorted(got, key=int)}"
    )
    assert Counter(got).most_common(1)[0][1] == 1, "no duplicates without a failure"


# -- (c) a node dies under load ----------------------------------------------------------


class FailoverPublisher(threading.Thread):
    """Sends ``0..count-1`` at QoS 1, ``window`` unacknowledged at most, from node to node.

    When its node goes it connects to the next one and sends again whatever was not
    acknowledged, as the agent does from its spool: at least once, never lost.
    """

    def __init__(self, nodes: list[BrokerNode], topic: str, count: int, window: int = 10) -> None:
        super().__init__(daemon=True)
        self.nodes, self.topic, self.count, self.window = nodes, topic, count, window
        self.done: set[int] = set()
        self.current: tuple[Peer, dict[int, int]] | None = None
        self.stints: list[tuple[str, float, int]] = []  # node, its first PUBACK at, acked
        self.error: BaseException | None = None

    def acked(self) -> int:
        current = self.current
        if current is None:
            return len(self.done)
        peer, sent = current
        with peer.lock:
            return len(self.done | {sent[mid] for mid in peer.acked if mid in sent})

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.error = exc

    def _run(self) -> None:
        deadline = time.monotonic() + WITHIN_S
        for node in itertools.cycle(self.nodes):
            todo = [i for i in range(self.count) if i not in self.done]
            if not todo:
                return
            assert time.monotonic() < deadline, f"still {len(todo)} unacknowledged"
            if not node.running:
                continue
            peer = Peer(node)
            try:
                code = peer.connect()
            except OSError:
                continue  # refused: the node is still down
            if code != 0:
                peer.close()
                continue
            sent: dict[int, int] = {}
            self.current = (peer, sent)
            for i in todo:
                while len(sent) - len(peer.acked) >= self.window and not peer.lost.is_set():
                    time.sleep(0.001)  # waiting for the broker's PUBACKs
                if peer.lost.is_set():
                    break
                sent[peer.client.publish(self.topic, str(i).encode(), qos=1).mid] = i
            while len(peer.acked & sent.keys()) < len(sent) and not peer.lost.is_set():
                time.sleep(0.001)
            acked = {sent[mid] for mid in peer.acked if mid in sent}
            self.done |= acked
            self.current = None
            first = peer.first_ack_at if acked and peer.first_ack_at else float("nan")
            self.stints.append((node.name, first, len(acked)))
            peer.close()


def test_c_a_node_killed_under_qos1_load_loses_nothing(
    engine: Engine, healthy: BrokerCluster, peers: Peers
) -> None:
    peers(healthy.nodes[0]).close()  # the MQTT streams exist before we look for their leader
    victim = engine.victim(healthy)
    order = [healthy.nodes[(victim + k) % 3] for k in range(3)]
    topic, count = device_topic("telemetry"), 600
    client_id = f"controller-{uuid.uuid4().hex[:8]}"

    # The subscriber's session is born on the victim, then lives on a survivor.
    first = peers(order[0], client_id, clean=False)
    assert first.subscribe(topic) == [1]
    first.close()
    subscriber = peers(order[1], client_id, clean=False)
    assert subscriber.session_present

    publisher = FailoverPublisher([order[0], order[2], order[1]], topic, count)
    publisher.start()
    wait_until(lambda: publisher.acked() >= count // 3 or publisher.error, "a third acknowledged")
    killed_at = time.monotonic()
    order[0].kill()
    publisher.join(WITHIN_S)
    assert publisher.error is None, publisher.error
    assert not publisher.is_alive()

    want = {str(i).encode() for i in range(count)}
    wait_until(
        lambda: want <= set(subscriber.payloads()),
        "every acknowledged message at the subscriber",
        detail=lambda: f"missing {sorted(int(p) for p in want - set(subscriber.payloads()))}",
    )
    complete_at = time.monotonic()
    got = Counter(subscriber.payloads())
    resumed = [at - killed_at for _, at, n in publisher.stints[1:] if n]
    rejoin_s = restart(healthy, healthy.nodes.index(order[0]))
    print(
        f"{engine.name}: killed {order[0].name}; "
        f"stints {[(s[0], s[2]) for s in publisher.stints]}; "
        f"publisher acked again {resumed[0] if resumed else float('nan'):.2f} s after the kill; "
        f"all at the subscriber {complete_at - killed_at:.2f} s after; "
        f"{sum(got.values()) - count} duplicates; node back in {rejoin_s:.1f} s"
    )
    assert set(got) == want
    # Back in the cluster: it carries traffic again.
    assert retained_on(peers, order[0], topic, retrying=True) == []


# -- (d) MQTT 5 and $share ---------------------------------------------------------------


def test_d_mqtt5_and_shared_subscriptions(
    engine: Engine, healthy: BrokerCluster, peers: Peers
) -> None:
    n1, n2, _ = healthy.nodes
    assert mqtt5_connack(n1) == engine.mqtt5_connack

    topic = device_topic("telemetry")
    shared = f"$share/ingest/{topic}"
    subscriber = peers(n2)
    assert subscriber.subscribe(shared) == engine.share_suback
    publisher = peers(n1)
    publisher.publish(topic, b"to-the-group")
    publisher.publish(shared, b"literal")  # a topic named "$share/...": plain, not a group
    wait_until(lambda: subscriber.payloads(), "a message on the $share filter")
    assert subscriber.payloads() == [b"literal"]


# -- per-device authorization (NATS) ---------------------------------------------------------


def nats_connect(port: int, user: str, password: str) -> bytes:
    """What the NATS client port answers a login: "+OK"/"PONG" or "-ERR ..."."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.recv(4096)  # INFO
        login = f'{{"user":"{user}","pass":"{password}","verbose":false}}'
        s.sendall(f"CONNECT {login}\r\nPING\r\n".encode())
        return s.recv(4096)


@pytest.mark.skipif(not os.access(NATS_SERVER, os.X_OK), reason="nats-server is not installed")
def test_nats_per_device_permissions(tmp_path: Path, peers: Peers) -> None:
    controller, dev_a, dev_b = (
        ("edgefleet-controller", "c-pw"),
        ("dev-a", "a-pw"),
        ("dev-b", "b-pw"),
    )
    users = edgefleet_nats_users(controller, [dev_a, dev_b])
    # Without "$MQTT.sub.>" a device may subscribe at QoS 0 only.
    own_only = "edgefleet.v1.devices.dev-c"
    users.append(NatsUser("dev-c", "c-pw", (f"{own_only}.events",), (f"{own_only}.desired",)))
    desired = "edgefleet/v1/devices/{}/desired"
    with nats_cluster(tmp_path, users=users) as cluster:
        n1, n2, n3 = cluster.nodes
        ctl = peers(n1, "controller-1", clean=False, login=controller)
        assert ctl.subscribe("edgefleet/v1/devices/+/events") == [1]
        for device in ("dev-a", "dev-b", "dev-c"):
            ctl.publish(desired.format(device), f"signed-{device}".encode(), retain=True)

        # A device reads its own desired state, and nobody else's, by name or wildcard.
        b = peers(n3, "dev-b", login=dev_b)
        refused = [desired.format("dev-a"), desired.format("+"), "edgefleet/v1/#", "$MQTT/sub/#"]
        assert b.subscribe(desired.format("dev-b"), *refused) == [1, 128, 128, 128, 128]
        wait_until(lambda: b.payloads() == [b"signed-dev-b"], "dev-b's own desired state")

        # A forged desired state is acknowledged and dropped; its own events go through.
        b.publish(desired.format("dev-a"), b"forged", retain=True)
        b.publish("edgefleet/v1/devices/dev-b/events", b"online")
        wait_until(lambda: b"online" in ctl.payloads(), "dev-b's event at the controller")
        a = peers(n2, "dev-a", login=dev_a)
        assert a.subscribe(desired.format("dev-a")) == [1]
        wait_until(lambda: a.payloads(), "dev-a's desired state")
        assert a.payloads() == [b"signed-dev-a"]

        # A wrong password: CONNACK 5 "not authorized" (paho: 135).
        intruder = Peer(n1, "dev-a", login=("dev-a", "wrong"))
        peers.opened.append(intruder)
        assert intruder.connect() == 135

        # QoS 1 needs "$MQTT.sub.>", where JetStream delivers; QoS 0 does not.
        c = peers(n1, "dev-c", login=("dev-c", "c-pw"))
        assert c.subscribe(desired.format("dev-c"), qos=1) == [128]
        assert c.subscribe(desired.format("dev-c"), qos=0) == [0]
        wait_until(lambda: c.payloads() == [b"signed-dev-c"], "dev-c's desired state at QoS 0")

        # Devices' logins are for MQTT only; the controller's for MQTT and NATS alike.
        assert isinstance(n1, NatsNode)
        assert nats_connect(n1.client_port, *dev_a).startswith(b"-ERR 'Authorization Violation'")
        assert nats_connect(n1.client_port, *controller).startswith(b"PONG")


# -- shared ingest without MQTT 5: a JetStream work queue (NATS) -----------------------------


@pytest.mark.skipif(not os.access(NATS_SERVER, os.X_OK), reason="nats-server is not installed")
def test_nats_replicas_share_ingest_through_a_jetstream_work_queue(
    tmp_path: Path, peers: Peers
) -> None:
    """Devices publish QoS 1 over MQTT; controller replicas pull from one durable consumer.

    The gateway stores every QoS 1 message in the ``$MQTT_msgs`` stream (interest
    retention, R3) before its PUBACK. A durable pull consumer on it, filtered to the
    devices' subjects, hands each message to one of the replicas that pull from it, and
    again to another one when the first does not acknowledge within ``ack_wait``: what
    ``$share/`` does on MQTT 5, at least once, here on MQTT 3.1.1 devices.
    """
    nats = pytest.importorskip("nats", reason="nats-py is not installed")
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    count, durable = 200, "edgefleet-ingest"
    with nats_cluster(tmp_path) as cluster:
        n1, n2, n3 = cluster.nodes
        assert isinstance(n2, NatsNode)
        assert isinstance(n3, NatsNode)
        device = peers(n1, "dev-a")  # the first MQTT client creates the gateway's streams

        async def replicas() -> tuple[list[bytes], list[bytes], list[bytes]]:
            a, b = await nats.connect(n2.nats_url), await nats.connect(n3.nats_url)
            a_again = await nats.connect(n2.nats_url)  # replica a, restarted
            try:
                await a.jetstream().add_consumer(
                    "$MQTT_msgs",
                    ConsumerConfig(
                        durable_name=durable,
                        filter_subject="$MQTT.msgs.edgefleet.v1.devices.*.telemetry",
                        ack_policy=AckPolicy.EXPLICIT,
                        deliver_policy=DeliverPolicy.ALL,
                        ack_wait=2.0,  # s: then an unacknowledged message goes to another
                    ),
                )

                def publish_all() -> None:  # each acknowledged, so each stored R3
                    for i in range(count):
                        device.publish("edgefleet/v1/devices/dev-a/telemetry", str(i).encode())

                await asyncio.to_thread(publish_all)
                got: dict[str, list[bytes]] = {"a": [], "b": [], "dropped": []}
                sub_a = await a.jetstream().pull_subscribe_bind(durable, stream="$MQTT_msgs")
                sub_b = await b.jetstream().pull_subscribe_bind(durable, stream="$MQTT_msgs")
                # Replica a takes a batch and dies with it unacknowledged.
                for m in await sub_a.fetch(10, timeout=10):
                    got["dropped"].append(m.data)
                await a.close()

                async def pull(name: str, sub: Any) -> None:
                    while len(set(got["a"] + got["b"])) < count:
                        try:
                            batch = await sub.fetch(20, timeout=0.5)
                        except TimeoutError:  # nats-py raises its own and asyncio's
                            continue
                        for m in batch:
                            got[name].append(m.data)
                            await m.ack()

                sub_a = await a_again.jetstream().pull_subscribe_bind(durable, stream="$MQTT_msgs")
                await asyncio.wait_for(
                    asyncio.gather(pull("a", sub_a), pull("b", sub_b)), timeout=WITHIN_S
                )
                return got["a"], got["b"], got["dropped"]
            finally:
                for conn in (a, b, a_again):
                    if not conn.is_closed:
                        await conn.close()

        got_a, got_b, dropped = asyncio.run(replicas())
        print(f"nats work queue: a {len(got_a)}, b {len(got_b)}, redelivered {len(dropped)}")
        everything = {str(i).encode() for i in range(count)}
        assert set(got_a) | set(got_b) == everything
        assert len(got_a) + len(got_b) == count, "each message to one replica"
        assert got_a, "both replicas got a share"
        assert got_b, "both replicas got a share"
        assert len(dropped) == 10
        assert set(dropped) <= set(got_a) | set(got_b), "what a dead replica held, another got"
