"""A simulated device's updates, as the agent does them, against a fake MQTT client.

The device's handlers take the client they publish with; a fake one records what
would have gone to the broker, so each case runs on one event loop in milliseconds.
The same paths run against Mosquitto and the controller in
``test_simulate_integration.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fleet.simulate.device import DeviceCounters, DeviceTiming, SimulatedDevice
from fleet.simulate.identity import SimulatedIdentity, new_private_key
from fleet.simulate.regress import Effects, ModelRef, RegressionRules
from fleet.simulate.telemetry import profile_for
from fleet.simulate.update import (
    ServedModel,
    initial_sha256,
    install,
    reported_models,
    updates_needed,
    with_untargeted,
)
from models.topics import Channel, DeviceTopic
from models.wire import (
    BrokerCredentials,
    Command,
    CommandKind,
    DesiredModel,
    DesiredState,
    Event,
    EventKind,
    ModelState,
    ReportedState,
    Severity,
    TargetRef,
    decode,
    runs_wanted,
)
from tests.polling import in_time

DEVICE = "dev-0123456789abcdef"
OLD = ServedModel.initial(ModelRef.parse("gemma3-270m@1.0"))
SHA_2 = "2" * 64
SHA_3 = "3" * 64


def target(version: str, sha: str, variant: str = "Q4_K_M") -> TargetRef:
    return TargetRef(path=f"gemma3-270m/{version}/{variant}.gguf", length=1000, sha256=sha)


def desired(version: int, *models: DesiredModel) -> DesiredState:
    return DesiredState(device_id=DEVICE, version=version, models=list(models))


def wants(version: str, sha: str, variant: str = "Q4_K_M") -> DesiredModel:
    return DesiredModel(name="gemma3-270m", version=version, target=target(version, sha, variant))


class FakeClient:
    """What a device publishes, in order; the seam is ``publish`` of ``aiomqtt.Client``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []

    async def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, **_: Any
    ) -> None:
        self.sent.append((topic, payload, retain))

    def events(self) -> list[Event]:
        topic = str(DeviceTopic(DEVICE, Channel.EVENTS))
        return [decode(Event, p) for t, p, _ in self.sent if t == topic]

    def kinds(self) -> list[EventKind]:
        return [event.kind for event in self.events()]

    def reports(self) -> list[ReportedState]:
        topic = str(DeviceTopic(DEVICE, Channel.REPORTED))
        return [decode(ReportedState, p) for t, p, retain in self.sent if t == topic and retain]


def make_device(
    *, rules: tuple[str, ...] = (), update_s: float = 0.0, models: tuple[ServedModel, ...] = (OLD,)
) -> SimulatedDevice:
    identity = SimulatedIdentity(
        index=1,
        device_id=DEVICE,
        private_key=new_private_key(),
        broker=BrokerCredentials(
            url="mqtt://127.0.0.1:1", username=DEVICE, password="pw", client_id=DEVICE
        ),
        fleet_url="http://fleet.test",
    )
    return SimulatedDevice(
        identity,
        profile_for(1, gpu_share=0.0),
        timing=DeviceTiming(base=0.0, offset=0.0, interval=5.0, update_s=update_s),
        counters=DeviceCounters(),
        connect_gate=asyncio.Semaphore(1),
        agent_version="0.1.0-sim",
        models=models,
        rules=RegressionRules.parse(rules),
    )


def envelope(state: DesiredState) -> bytes:
    payload = base64.b64encode(state.model_dump_json().encode()).decode()
    return json.dumps({"payloadType": "application/json", "payload": payload}).encode()


def scenario(body: Callable[[FakeClient], Awaitable[None]]) -> None:
    asyncio.run(in_time(body(FakeClient()), "the scenario"))


async def send(device: SimulatedDevice, client: FakeClient, state: DesiredState) -> None:
    await device._on_desired(client, envelope(state))  # type: ignore[arg-type]


# --- pure parts ------------------------------------------------------------------------------


def test_a_target_becomes_what_the_store_serves() -> None:
    served = ServedModel.from_target(wants("2.0", SHA_2, "Q8_0"))
    assert served == ServedModel("gemma3-270m", "2.0", "Q8_0", SHA_2, "gemma3-270m/2.0/Q8_0.gguf")
    unnamed = DesiredModel(name="m", target=TargetRef(path="odd.bin", length=1, sha256=SHA_3))
    assert ServedModel.from_target(unnamed).version == SHA_3[:12]  # as the agent names it
    assert OLD.sha256 == initial_sha256(ModelRef("gemma3-270m", "1.0"))
    assert OLD.sha256 != ServedModel.initial(ModelRef.parse("gemma3-270m@1.1")).sha256


def test_only_a_target_other_than_the_stored_file_is_an_update() -> None:
    store = {OLD.name: OLD}
    same = DesiredModel(
        name=OLD.name,
        target=TargetRef(path="gemma3-270m/1.0/x.gguf", length=1, sha256=str(OLD.sha256)),
    )
    plain = DesiredModel(name="minilm", version="7")
    state = desired(1, same, plain)
    assert updates_needed(state, store) == []
    assert updates_needed(desired(2, wants("2.0", SHA_2)), store) == [wants("2.0", SHA_2)]
    # a model with no target that the store lacks is taken as stored, at the desired version
    assert with_untargeted(state, store)["minilm"] == ServedModel("minilm", "7")


def test_reports_say_ready_old_version_until_the_update_lands() -> None:
    state = desired(3, wants("2.0", SHA_2))
    models, converged = reported_models(state, {OLD.name: OLD}, {}, device="cpu", memory_bytes=300)
    assert [(m.name, m.version, m.sha256, m.state) for m in models] == [
        ("gemma3-270m", "1.0", OLD.sha256, ModelState.READY)
    ]
    assert not converged
    new = ServedModel.from_target(state.models[0])
    models, converged = reported_models(state, {new.name: new}, {}, device="cpu", memory_bytes=300)
    assert converged
    assert runs_wanted(state.models[0], models[0])
    models, converged = reported_models(state, {}, {}, device="cpu", memory_bytes=300)
    assert (models[0].state, converged) == (ModelState.LOADING, False)
    models, _ = reported_models(state, {}, {"gemma3-270m": "bad"}, device="cpu", memory_bytes=1)
    assert (models[0].state, models[0].error) == (ModelState.FAILED, "bad")
    models, converged = reported_models(None, {OLD.name: OLD}, {}, device="cpu", memory_bytes=1)
    assert (len(models), converged) == (1, True)


def test_install_lists_the_agents_events() -> None:
    model = ServedModel.from_target(wants("2.0", SHA_2))
    kinds = [e.kind for e in install(model, Effects()).events]
    assert kinds == [
        EventKind.UPDATE_VERIFIED,
        EventKind.UPDATE_INSTALLED,
        EventKind.UPDATE_HEALTHY,
    ]
    restart = install(model, Effects(restart=True))
    assert [e.kind for e in restart.events][2:] == [EventKind.ONLINE, EventKind.UPDATE_HEALTHY]
    for event in install(model, Effects(golden_fail=True, restart=True)).events:
        assert event.data["model"] == "gemma3-270m"
        assert event.data["version"] == "2.0"
        assert event.data["sha256"] == SHA_2
        assert event.data["target"] == "gemma3-270m/2.0/Q4_K_M.gguf"


# --- the device ------------------------------------------------------------------------------


def test_an_update_reports_the_old_version_then_the_new_with_the_agents_events() -> None:
    async def body(client: FakeClient) -> None:
        device = make_device(update_s=0.0)
        await send(device, client, desired(1, wants("2.0", SHA_2)))
        first = client.reports()[-1]
        assert (first.desired_version, first.converged) == (1, False)
        assert [(m.version, m.state) for m in first.models] == [("1.0", ModelState.READY)]
        assert device.updating == {"gemma3-270m": ServedModel.from_target(wants("2.0", SHA_2))}
        await device.wait_updates()
        assert client.kinds() == [
            EventKind.UPDATE_VERIFIED,
            EventKind.UPDATE_INSTALLED,
            EventKind.UPDATE_HEALTHY,
        ]
        for event in client.events():
            assert event.device_id == DEVICE
            assert {k: event.data[k] for k in ("model", "version", "sha256")} == {
                "model": "gemma3-270m",
                "version": "2.0",
                "sha256": SHA_2,
            }
        last = client.reports()[-1]
        assert (last.desired_version, last.converged) == (1, True)
        assert [(m.version, m.sha256, m.state) for m in last.models] == [
            ("2.0", SHA_2, ModelState.READY)
        ]
        assert device.counters.updated == 1
        assert device.counters.updates_started == 1
        # the same target again (a renewed desired state) is no update
        await send(device, client, desired(2, wants("2.0", SHA_2)))
        await device.wait_updates()
        assert len(client.events()) == 3
        assert client.reports()[-1].desired_version == 2
        assert client.reports()[-1].converged

    scenario(body)


def test_a_newer_desired_state_supersedes_a_download_once() -> None:
    async def body(client: FakeClient) -> None:
        device = make_device(update_s=3600.0)  # the download never ends by itself
        await send(device, client, desired(1, wants("2.0", SHA_2)))
        await send(device, client, desired(2, wants("3.0", SHA_3)))
        [event] = client.events()
        assert event.kind is EventKind.UPDATE_FAILED
        assert event.severity is Severity.INFO
        assert event.data["phase"] == "download"
        assert event.data["superseded"] is True
        assert (event.data["version"], event.data["sha256"]) == ("2.0", SHA_2)
        assert device.updating["gemma3-270m"].sha256 == SHA_3
        # a newer state that wants the same target lets the download go on
        await send(device, client, desired(3, wants("3.0", SHA_3)))
        assert len(client.events()) == 1
        # one that wants no target keeps what is served and ends the download
        await send(device, client, desired(4, DesiredModel(name="gemma3-270m")))
        assert [e.data["sha256"] for e in client.events()] == [SHA_2, SHA_3]
        assert device.updating == {}
        await device.wait_updates()
        last = client.reports()[-1]
        assert (last.desired_version, last.converged) == (4, True)
        assert [m.version for m in last.models] == ["1.0"]
        assert device.counters.superseded == 2
        # a replayed older state changes nothing
        await send(device, client, desired(2, wants("3.0", SHA_3)))
        assert device.desired_version == 4
        assert device.counters.desired == 4

    scenario(body)


def test_a_failed_health_check_rolls_back_and_the_old_version_serves() -> None:
    async def body(client: FakeClient) -> None:
        device = make_device(rules=("gemma3-270m@2.0:golden=fail",))
        await send(device, client, desired(1, wants("2.0", SHA_2)))
        await device.wait_updates()
        assert client.kinds() == [
            EventKind.UPDATE_VERIFIED,
            EventKind.UPDATE_INSTALLED,
            EventKind.UPDATE_ROLLED_BACK,
        ]
        rolled = client.events()[-1]
        assert rolled.severity is Severity.ERROR
        assert str(rolled.data["reason"]).startswith("health check failed: golden prompt 1")
        assert rolled.data["sha256"] == SHA_2
        last = client.reports()[-1]
        assert not last.converged
        assert [(m.version, m.sha256, m.state) for m in last.models] == [
            ("1.0", OLD.sha256, ModelState.READY)
        ]
        # not tried again for the same desired state (a reconnect reconciles again)
        device._reconcile(client)  # type: ignore[arg-type]
        assert device.updating == {}
        # a newer desired state tries again, as the agent does
        await send(device, client, desired(2, wants("2.0", SHA_2)))
        await device.wait_updates()
        assert client.kinds().count(EventKind.UPDATE_ROLLED_BACK) == 2
        assert device.counters.rolled_back == 2
        # another variant of 2.0 passes: the rule named no variant, so it fails too
        await send(device, client, desired(3, wants("2.0", SHA_3, "Q8_0")))
        await device.wait_updates()
        assert device.counters.rolled_back == 3

    scenario(body)


def test_a_variant_rule_spares_other_variants() -> None:
    async def body(client: FakeClient) -> None:
        device = make_device(rules=("gemma3-270m@2.0/Q8_0:golden=fail",))
        await send(device, client, desired(1, wants("2.0", SHA_3, "Q8_0")))
        await device.wait_updates()
        assert client.kinds()[-1] is EventKind.UPDATE_ROLLED_BACK
        await send(device, client, desired(2, wants("2.0", SHA_2, "Q4_K_M")))
        await device.wait_updates()
        assert client.kinds()[-1] is EventKind.UPDATE_HEALTHY
        assert device.served["gemma3-270m"].variant == "Q4_K_M"

    scenario(body)


def test_an_install_failure_without_an_old_version_reports_failed() -> None:
    async def body(client: FakeClient) -> None:
        device = make_device(rules=("gemma3-270m@2.0:install=fail",), models=())
        await send(device, client, desired(1, wants("2.0", SHA_2)))
        assert client.reports()[-1].models[0].state is ModelState.LOADING
        await device.wait_updates()
        assert client.kinds() == [EventKind.UPDATE_VERIFIED, EventKind.UPDATE_FAILED]
        failed = client.events()[-1]
        assert (failed.data["phase"], failed.severity) == ("install", Severity.ERROR)
        assert "superseded" not in failed.data
        [model] = client.reports()[-1].models
        assert model.state is ModelState.FAILED
        assert model.error is not None
        assert device.counters.update_failed == 1

    scenario(body)


def test_a_restart_rule_announces_online_and_telemetry_follows_the_served_version() -> None:
    async def body(client: FakeClient) -> None:
        device = make_device(rules=("gemma3-270m@2.0:restart,latency=3,errors=0.1",))
        assert device.effects == Effects()
        await send(device, client, desired(1, wants("2.0", SHA_2)))
        assert device.effects == Effects()  # still the old version while it downloads
        await device.wait_updates()
        assert client.kinds() == [
            EventKind.UPDATE_VERIFIED,
            EventKind.UPDATE_INSTALLED,
            EventKind.ONLINE,
            EventKind.UPDATE_HEALTHY,
        ]
        assert device.effects == Effects(latency=3.0, error_rate=0.1, restart=True)
        # back to 1.0 (a rollback by the controller): the regression goes with it
        back = DesiredModel(
            name="gemma3-270m",
            version="1.0",
            target=TargetRef(path="gemma3-270m/1.0/Q4_K_M.gguf", length=1, sha256=SHA_3),
        )
        await send(device, client, desired(2, back))
        await device.wait_updates()
        assert device.effects == Effects()
        report = Command(device_id=DEVICE, id="command0001", kind=CommandKind.REPORT)
        await device._on_command(client, report.model_dump_json().encode())  # type: ignore[arg-type]
        assert client.reports()[-1].models[0].version == "1.0"

    scenario(body)


@pytest.mark.parametrize("update_s", [0.0, 0.01])
def test_several_models_update_independently(update_s: float) -> None:
    async def body(client: FakeClient) -> None:
        minilm = ServedModel.initial(ModelRef.parse("minilm@6"))
        device = make_device(models=(OLD, minilm), update_s=update_s)
        new_minilm = DesiredModel(
            name="minilm",
            version="7",
            target=TargetRef(path="minilm/7/int8.onnx", length=1, sha256=SHA_3),
        )
        await send(device, client, desired(1, wants("2.0", SHA_2), new_minilm))
        await device.wait_updates()
        last = client.reports()[-1]
        assert last.converged
        assert {(m.name, m.version, m.runtime) for m in last.models} == {
            ("gemma3-270m", "2.0", "llama.cpp"),
            ("minilm", "7", "onnxruntime"),
        }
        assert client.kinds().count(EventKind.UPDATE_HEALTHY) == 2

    scenario(body)
