"""The link against a real Mosquitto: delivery through outages, desired state, commands, auth.

A fake host stands in for the model executor (its tests are in test_apply.py), so
these tests exercise exactly the MQTT side: the broker, the ACL and aiomqtt are real.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.config import LinkSettings
from agent.link.fleet import FleetLink
from models.device import DeviceReport
from models.wire import (
    Command,
    CommandKind,
    DesiredState,
    EventKind,
    encode,
    utc_now,
)
from scripts.broker_cluster import (
    NATS_SERVER,
    BrokerCluster,
    NatsUser,
    nats_cluster,
    set_nats_users,
)
from scripts.servers import MosquittoBroker
from tests.agent.link_support import (
    WITHIN_S,
    Watcher,
    authorize,
    controller_client,
    make_director,
    shared_director,
    write_identity,
)
from tests.fakes.link_host import FakeHost, FakeTelemetry
from tests.polling import eventually

pytestmark = pytest.mark.integration  # a real Mosquitto

DEVICE = "dev-link-1"
PASSWORD = "device-secret-1"
DEVICE_REPORT = DeviceReport(
    hostname="edge-1",
    os="linux",
    kernel="6",
    arch="aarch64",
    cpu_physical_cores=4,
    cpu_logical_cores=4,
    ram_total_bytes=8 * 2**30,
    ram_available_bytes=4 * 2**30,
)


def settings(state_dir: Path, **overrides: object) -> LinkSettings:
    values: dict[str, object] = {
        "state_dir": state_dir,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.3,
        "healthy_after_s": 0.0,
        "publish_timeout_s": 5.0,
        "trust_root": shared_director().root_file,
    }
    values.update(overrides)
    return LinkSettings.model_validate(values)


@pytest.fixture
def device(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Path]:
    """A state folder holding an identity the broker accepts."""
    authorize(broker, {DEVICE: PASSWORD})
    state_dir = tmp_path / "state"
    write_identity(state_dir, broker, DEVICE, PASSWORD)
    return state_dir


def samples(watcher: Watcher) -> list[dict[str, object]]:
    return [s for m in watcher.on("telemetry") for s in m.json()["samples"]]


def test_spooled_telemetry_arrives_in_order_after_the_broker_comes_back(
    broker: MosquittoBroker, device: Path
) -> None:
    async def scenario() -> None:
        watcher = Watcher(broker, client_id="watch-order", persistent=True)
        await watcher.start()
        link = FleetLink(
            settings(device, telemetry_interval_s=0.05), FakeHost(), FakeTelemetry(), DEVICE_REPORT
        )
        async with link:
            await watcher.wait_for(lambda w: samples(w), "the first sample")
            assert link.status()["connected"]
            await asyncio.to_thread(broker.stop)
            assert link.spool is not None
            spool = link.spool
            await eventually(
                lambda: spool.stats().entries >= 20, "a backlog in the spool", within_s=WITHIN_S
            )
            status = link.status()
            assert not status["connected"]
            assert status["state"] in {"backoff", "connecting"}
            target = await link.sample_now()
            assert target is not None
            await asyncio.to_thread(broker.start)
            await watcher.wait_for(
                lambda w: any(s["seq"] == target for s in samples(w)),
                f"sample {target} after the outage",
            )
        await watcher.stop()
        first_seen: dict[str, int] = {}
        order = []
        for sample in samples(watcher):
            if sample["id"] not in first_seen:  # at-least-once: a resend may repeat one
                first_seen[str(sample["id"])] = int(str(sample["seq"]))
                order.append(int(str(sample["seq"])))
        assert order == sorted(order), "samples arrived out of order"
        assert order == list(range(order[0], order[-1] + 1)), "a sample went missing"
        assert order[0] == 0
        assert order[-1] >= target
        batches = [m.json() for m in watcher.on("telemetry")]
        assert all(b["device_id"] == DEVICE and b["dropped"] == 0 for b in batches)
        assert max(len(b["samples"]) for b in batches) > 1  # the backlog went out batched

    asyncio.run(scenario())


def rejections(watcher: Watcher) -> list[str]:
    return [
        event.json()["data"]["reason"]
        for event in watcher.on("events")
        if event.json()["kind"] == EventKind.DESIRED_REJECTED
    ]


def test_desired_state_commands_and_the_retained_report(
    broker: MosquittoBroker, device: Path
) -> None:
    host = FakeHost()
    desired_topic = f"edgefleet/v1/devices/{DEVICE}/desired"
    cmd_topic = f"edgefleet/v1/devices/{DEVICE}/cmd"

    def desired(version: int, device_id: str = DEVICE, **fields: Any) -> bytes:
        return shared_director().sign(DesiredState(device_id=device_id, version=version, **fields))

    impostor = make_director(device.parent / "impostor")

    def command(kind: CommandKind) -> bytes:
        return encode(Command(device_id=DEVICE, id=f"cmd-{kind.value}-0001", kind=kind))

    async def scenario() -> None:
        watcher = Watcher(broker)
        await watcher.start()
        async with controller_client(broker, "test-publisher") as ctl:
            await ctl.publish(desired_topic, desired(2), qos=1, retain=True)
            link = FleetLink(settings(device), host, FakeTelemetry(), DEVICE_REPORT)
            async with link:
                online = await watcher.wait_for(lambda w: w.on("events"), "ONLINE")
                assert online[0].json()["kind"] == EventKind.ONLINE
                await eventually(
                    lambda: host.applied == [2], "desired 2 applied", within_s=WITHIN_S
                )
                await watcher.wait_for(
                    lambda w: any(r.json().get("desired_version") == 2 for r in w.on("reported")),
                    "a report of desired 2",
                )
                # Replays, strangers, forgeries and garbage are refused; the link stays up.
                hostile = {
                    b"{nope": "MalformedEnvelope",
                    encode(DesiredState(device_id=DEVICE, version=8)): "MalformedEnvelope",
                    desired(1): "ReplayedState",
                    desired(9, "dev-other-1"): "WrongDevice",
                    impostor.sign(DesiredState(device_id=DEVICE, version=9)): "SignatureRejected",
                    desired(9, expires=utc_now() - timedelta(seconds=1)): "ExpiredState",
                }
                for payload in (desired(2), *hostile):
                    await ctl.publish(desired_topic, payload, qos=1)
                refused = await watcher.wait_for(
                    lambda w: len(rejections(w)) == len(hostile) and rejections(w),
                    "every hostile desired state reported",
                )
                assert sorted(refused) == sorted(hostile.values())
                await ctl.publish(cmd_topic, b"not json", qos=1)
                await ctl.publish(desired_topic, desired(3), qos=1, retain=True)
                await eventually(
                    lambda: host.applied == [2, 3], "desired 3 applied", within_s=WITHIN_S
                )
                assert link.status()["last_desired_version"] == 3
                await watcher.wait_for(
                    lambda w: any(r.json().get("desired_version") == 3 for r in w.on("reported")),
                    "a report of desired 3",
                )
                # REPORT publishes again even though nothing changed.
                reports = len(watcher.on("reported"))
                await ctl.publish(cmd_topic, command(CommandKind.REPORT), qos=1)
                await watcher.wait_for(lambda w: len(w.on("reported")) > reports, "one more report")
                # FLUSH sends a sample now (the interval here is an hour).
                assert samples(watcher) == []
                await ctl.publish(cmd_topic, command(CommandKind.FLUSH), qos=1)
                await watcher.wait_for(lambda w: samples(w), "a flushed sample")
                reconciles = host.reconciles  # one at start, to resume interrupted updates
                await ctl.publish(cmd_topic, command(CommandKind.RECONCILE), qos=1)
                await eventually(
                    lambda: host.reconciles == reconciles + 1, "a reconcile", within_s=WITHIN_S
                )
                assert link.status()["connected"]
            offline = await watcher.wait_for(
                lambda w: [m for m in w.on("events") if m.json()["kind"] == EventKind.OFFLINE],
                "the OFFLINE event",
            )
            assert offline[-1].json()["message"] == "agent shutting down"
        await watcher.stop()
        # The report is retained: a controller that starts now learns the state at once.
        late = Watcher(broker, client_id="late-watcher")
        await late.start()
        retained = await late.wait_for(
            lambda w: [r for r in w.on("reported") if r.retain], "the retained report"
        )
        assert retained[-1].json()["desired_version"] == 3
        await late.stop()

    asyncio.run(scenario())


def test_revoked_credentials_back_off_long_and_never_break_serving(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    authorize(broker, {DEVICE: PASSWORD})
    state_dir = tmp_path / "state"
    write_identity(state_dir, broker, DEVICE, "not-the-password")

    async def scenario() -> None:
        link = FleetLink(
            settings(state_dir, auth_backoff_s=3600), FakeHost(), FakeTelemetry(), DEVICE_REPORT
        )
        async with link:
            await eventually(
                lambda: (link.status()["next_attempt_in_s"] or 0) >= 1800,
                "the long backoff after three refusals",
                within_s=WITHIN_S,
            )
            status = link.status()
            assert status["state"] == "auth_failed"
            assert not status["connected"]
            assert "authori" in status["last_error"].lower()
            assert await link.sample_now() is not None  # telemetry still spools meanwhile

    asyncio.run(scenario())


def test_a_full_spool_reports_what_it_dropped(broker: MosquittoBroker, device: Path) -> None:
    async def scenario() -> None:
        watcher = Watcher(broker, client_id="drop-watcher", persistent=True)
        await watcher.start()  # its session queues what arrives before it reconnects
        await asyncio.to_thread(broker.stop)
        link = FleetLink(
            settings(device, spool_max_bytes=64 * 1024), FakeHost(), FakeTelemetry(), DEVICE_REPORT
        )
        async with link:
            assert link.spool is not None
            spool = link.spool

            async def evicted() -> bool:  # offline: the spool fills, then evicts
                await link.sample_now()
                return spool.drops().samples >= 50

            await eventually(evicted, "the full spool to evict 50 samples", every_s=0)
            dropped = spool.drops().samples
            assert spool.stats().bytes <= 64 * 1024
            assert link.status()["dropped"] == {"samples": dropped, "events": 0}
            await asyncio.to_thread(broker.start)
            notice = await watcher.wait_for(
                lambda w: [m for m in w.on("events") if m.json()["kind"] == "spool_dropped"],
                "the SPOOL_DROPPED event",
            )
            assert notice[0].json()["data"]["samples"] >= dropped
            batches = [m.json() for m in watcher.on("telemetry")]
            assert batches[0]["dropped"] >= dropped  # the first batch after the outage says so
            assert batches[0]["samples"][0]["seq"] >= dropped  # the oldest went first
            await eventually(
                lambda: spool.drops().samples == 0, "the drops settled", within_s=WITHIN_S
            )
            await watcher.stop()

    asyncio.run(scenario())


@pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="nats-server is not installed")
def test_a_refused_subscription_reconnects_until_the_broker_grants_it(tmp_path: Path) -> None:
    """NATS refuses a QoS 1 SUBSCRIBE (SUBACK 0x80) the login may not make, as a cluster
    re-electing after losing a node does for a while; Mosquitto would grant it silently.
    Without its subscriptions the device would never see a desired state, so the link
    reconnects and asks again until the broker grants them.
    """
    own = f"edgefleet.v1.devices.{DEVICE}"
    refused = NatsUser(DEVICE, PASSWORD, publish=(f"{own}.>",), subscribe=(f"{own}.>",))
    granted = NatsUser(
        DEVICE, PASSWORD, publish=(f"{own}.>",), subscribe=(f"{own}.>", "$MQTT.sub.>")
    )
    state_dir = tmp_path / "state"

    async def scenario(cluster: BrokerCluster) -> None:
        write_identity(state_dir, cluster.nodes[0], DEVICE, PASSWORD)  # type: ignore[arg-type]
        link = FleetLink(settings(state_dir), FakeHost(), FakeTelemetry(), DEVICE_REPORT)
        async with link:
            await eventually(
                lambda: "subscriptions refused" in (link.status()["last_error"] or ""),
                "the refusal seen",
                within_s=WITHIN_S,
            )
            assert not link.status()["connected"]
            await asyncio.to_thread(set_nats_users, cluster, [granted])
            await eventually(lambda: link.status()["connected"], "connected", within_s=WITHIN_S)

    with nats_cluster(tmp_path / "nats", [refused]) as cluster:
        asyncio.run(scenario(cluster))
