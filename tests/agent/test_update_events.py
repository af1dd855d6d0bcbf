"""One event for each thing that happens: the executor, the updater and the link's mapping.

The controller's rollout gates count events, so a refused or rolled-back update whose
old model keeps serving must not also say ``model_failed``, and an update must not also
say ``model_ready``. Each test runs the real executor and updater against a real store
and records every event the fleet would get (:class:`tests.agent.update_support.Events`,
which maps outcomes as the link does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.link.outcomes import outcome_events
from agent.state.apply import ModelController, Outcome
from agent.store import ModelStore
from models.manifest import RuntimeParams
from models.wire import DesiredModel, DesiredState, EventKind, ModelState, Severity, TargetRef
from tests.agent.update_support import (
    NAME,
    NEW,
    QUICK,
    Events,
    Loader,
    executor,
    make_store,
    publish,
)
from tests.fakes.update_source import FakeUpdateSource

DEVICE = "dev-events-1"
UPDATE_ENDS = {EventKind.UPDATE_HEALTHY, EventKind.UPDATE_FAILED, EventKind.UPDATE_ROLLED_BACK}


@pytest.fixture
def source() -> Iterator[FakeUpdateSource]:
    fake = FakeUpdateSource()
    yield fake
    asyncio.run(fake.aclose())


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return make_store(tmp_path / "store")


def desired(
    version: int, target: TargetRef | None = None, model: str | None = None
) -> DesiredState:
    return DesiredState(
        device_id=DEVICE,
        version=version,
        models=[DesiredModel(name=NAME, version=model, target=target)],
    )


class Device:
    """The executor with the updater attached, and everything it told the fleet."""

    def __init__(self, store: ModelStore, source: FakeUpdateSource) -> None:
        self.loader = Loader()
        self.events = Events()
        self.controller: ModelController = executor(store, self.loader)
        self.controller.on_outcomes = self.events.outcomes
        self.controller.attach_updates(source, self.events, QUICK)

    def apply(self, state: DesiredState) -> list[Outcome]:
        return asyncio.run(self.controller.apply_desired(state))

    def serving(self) -> tuple[ModelState, str | None]:
        [model] = self.controller.report(DEVICE).models
        return model.state, model.version


def test_a_refused_update_is_one_update_failed_and_the_old_model_still_serves(
    store: ModelStore, source: FakeUpdateSource
) -> None:
    device = Device(store, source)
    target = publish(source)
    source.serve(target.sha256, NEW.replace(b"little", b"LITTLE"))  # tampered after signing
    device.apply(desired(1, target))
    # The updater speaks as it goes; the reconcile's own outcomes are sent when it ends.
    assert device.events.kinds() == [EventKind.UPDATE_FAILED, EventKind.MODEL_READY]
    [(_, ready)] = device.events.of(EventKind.MODEL_READY)
    assert (ready["action"], ready["version"]) == ("load", "1")  # the old model, loaded once
    [(severity, failed)] = device.events.of(EventKind.UPDATE_FAILED)
    assert severity is Severity.ERROR
    assert failed["phase"] == "download"
    assert (failed["model"], failed["version"], failed["sha256"]) == (NAME, "2", target.sha256)
    assert device.serving() == (ModelState.READY, "1")


def test_a_rolled_back_update_is_one_update_rolled_back_and_the_old_model_still_serves(
    store: ModelStore, source: FakeUpdateSource
) -> None:
    device = Device(store, source)
    target = publish(source)
    device.loader.healthy = False
    device.apply(desired(1, target))
    assert device.events.kinds() == [
        EventKind.UPDATE_VERIFIED,
        EventKind.UPDATE_INSTALLED,
        EventKind.UPDATE_ROLLED_BACK,
        EventKind.MODEL_READY,  # the old model, loaded before the update began
    ]
    [(_, rolled)] = device.events.of(EventKind.UPDATE_ROLLED_BACK)
    assert (rolled["phase"], rolled["version"], rolled["sha256"]) == ("health", "2", target.sha256)
    assert device.serving() == (ModelState.READY, "1")


def test_a_healthy_update_is_one_update_healthy_and_nothing_repeats_it(
    store: ModelStore, source: FakeUpdateSource
) -> None:
    device = Device(store, source)
    device.apply(desired(1))
    assert device.events.kinds() == [EventKind.MODEL_READY]
    target = publish(source)
    device.apply(desired(2, target))
    asyncio.run(device.controller.reconcile())  # nothing changed: nothing to say
    ends = [kind for kind in device.events.kinds() if kind in UPDATE_ENDS]
    assert ends == [EventKind.UPDATE_HEALTHY]
    assert device.events.kinds().count(EventKind.MODEL_READY) == 1  # only the first load
    assert device.serving() == (ModelState.READY, "2")


def test_a_model_that_fails_to_load_with_nothing_to_fall_back_on_is_model_failed(
    source: FakeUpdateSource, tmp_path: Path
) -> None:
    device = Device(make_store(tmp_path / "broken", b"not a model at all"), source)
    device.apply(desired(1))
    assert device.events.kinds() == [EventKind.MODEL_FAILED]
    [(severity, failed)] = device.events.of(EventKind.MODEL_FAILED)
    assert (severity, failed["model"], failed["action"]) == (Severity.ERROR, NAME, "load")
    assert "not an ONNX model" in failed["reason"]
    assert device.serving()[0] is ModelState.FAILED


def test_a_replacement_that_fails_to_load_is_an_update_failure_not_a_model_failure(
    store: ModelStore, source: FakeUpdateSource, tmp_path: Path
) -> None:
    device = Device(store, source)
    device.apply(desired(1, model="1"))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"a broken version 2")
    store.install(broken, name=NAME, version="2", runtime=RuntimeParams())  # by hand
    device.apply(desired(2, model="2"))
    assert device.events.kinds() == [EventKind.MODEL_READY, EventKind.UPDATE_FAILED]
    [(_, failed)] = device.events.of(EventKind.UPDATE_FAILED)
    assert (failed["action"], failed["phase"], failed["version"]) == ("swap", "load", "2")
    [model] = device.controller.context.registry.models()
    assert model.manifest.version == "1"  # the previous version still serves


def test_outcomes_map_to_events_by_what_they_mean_for_serving() -> None:
    outcomes = [
        Outcome("a", "load", version="1", sha256="a" * 64),
        Outcome("b", "load", "b is broken"),
        Outcome("c", "swap", version="2"),
        Outcome("d", "swap", "d 2 does not fit", version="2"),
        Outcome("e", "unload"),
        Outcome("f", "update", version="3"),
        Outcome("g", "update", "health check failed", version="3"),
        Outcome("h", "update", "superseded by desired version 7", version="3"),
    ]
    events = [(e.kind, e.severity, e.data["model"]) for e in outcome_events(outcomes)]
    assert events == [
        (EventKind.MODEL_READY, Severity.INFO, "a"),
        (EventKind.MODEL_FAILED, Severity.ERROR, "b"),
        (EventKind.MODEL_READY, Severity.INFO, "c"),
        (EventKind.UPDATE_FAILED, Severity.ERROR, "d"),
    ]
