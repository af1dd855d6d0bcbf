"""The updater shell: every outcome of :meth:`Updater.ensure`, against a fake update source.

A real model store and the real downloader run on a temporary folder; only the
controller (:class:`tests.fakes.update_source.FakeUpdateSource`) and model loading are
faked, so each case takes milliseconds. Whether a failure is retried is the error's
branch: transient failures are retried, rejected ones are reported once.
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import ModelSpec
from agent.store import ModelStore
from agent.store.slots import Phase
from agent.update import updater as updater_module
from agent.update.tuf_client import TufRejected, TufUnavailable
from agent.update.updater import UpdateOutcome, Updater
from models.wire import DesiredModel, DesiredState, EventKind, Severity, TargetRef
from tests.agent.update_support import (
    NAME,
    NEW,
    OLD,
    QUICK,
    Events,
    Loader,
    executor,
    make_store,
    publish,
)
from tests.fakes.update_source import FakeUpdateSource


@pytest.fixture
def source() -> Iterator[FakeUpdateSource]:
    fake = FakeUpdateSource()
    yield fake
    asyncio.run(fake.aclose())


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return make_store(tmp_path / "store")


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def updater(store: ModelStore, source: FakeUpdateSource, events: Events) -> Updater:
    return Updater(store, source, events, QUICK, ram_total_bytes=8 << 30)


def ensure(updater: Updater, target: TargetRef, loader: Loader, version: int = 1) -> UpdateOutcome:
    wanted = DesiredModel(name=NAME, target=target)
    return asyncio.run(updater.ensure(version, wanted, loader))


def active(store: ModelStore) -> bytes:
    manifest, path = store.resolve(NAME)
    assert manifest.name == NAME
    return path.read_bytes()


# -- updates that work ---------------------------------------------------------------------


def test_a_target_is_downloaded_installed_checked_and_handed_back_to_serve(
    updater: Updater, source: FakeUpdateSource, store: ModelStore, events: Events
) -> None:
    target = publish(source)
    outcome = ensure(updater, target, Loader())
    assert (outcome.result, outcome.version, outcome.error) == ("updated", "2", None)
    assert outcome.model is not None
    assert outcome.model.manifest.sha256 == target.sha256
    assert active(store) == NEW
    assert events.kinds() == [
        EventKind.UPDATE_VERIFIED,
        EventKind.UPDATE_INSTALLED,
        EventKind.UPDATE_HEALTHY,
    ]
    progress = [data for kind, _, data in events.seen if kind is EventKind.UPDATE_PROGRESS]
    assert progress[-1]["bytes"] == progress[-1]["total"] == len(NEW)

    requests = len(source.requests)
    again = ensure(updater, target, Loader())
    assert again.result == "current"
    assert len(source.requests) == requests  # nothing downloaded twice


def test_a_baked_in_model_with_the_targets_hash_is_verified_once_not_downloaded(
    updater: Updater, source: FakeUpdateSource, store: ModelStore, events: Events
) -> None:
    target = publish(source, data=OLD, version="1")  # the bytes the image baked in
    outcome = ensure(updater, target, Loader())
    assert outcome.result == "current"
    assert source.requests == []  # nothing downloaded
    marker = store.slots.folder(NAME) / updater_module.VERIFIED
    assert marker.read_text().strip() == target.sha256
    assert ensure(updater, target, Loader()).result == "current"


def test_a_baked_in_model_whose_file_changed_is_replaced_by_the_target(
    updater: Updater, source: FakeUpdateSource, store: ModelStore, events: Events
) -> None:
    target = publish(source, data=OLD, version="1")
    baked = store.slots.active_path(NAME)
    baked.write_bytes(OLD.replace(b"ONNX", b"XNNO"))  # same size: only its hash tells
    outcome = ensure(updater, target, Loader())
    assert outcome.result == "updated"
    assert active(store) == OLD
    assert EventKind.UPDATE_HEALTHY in events.kinds()


def test_an_unhealthy_update_is_rolled_back_and_not_tried_again_for_that_desired_state(
    updater: Updater, source: FakeUpdateSource, store: ModelStore, events: Events
) -> None:
    target = publish(source)
    sick = Loader()
    sick.healthy = False
    outcome = ensure(updater, target, sick)
    assert outcome.result == "rolled_back"
    assert outcome.error is not None
    assert "NaN" in outcome.error
    assert active(store) == OLD
    assert events.kinds()[-1] is EventKind.UPDATE_ROLLED_BACK

    requests, reported = len(source.requests), len(events.seen)
    assert ensure(updater, target, Loader()).result == "given_up"
    assert (len(source.requests), len(events.seen)) == (requests, reported)
    assert ensure(updater, target, Loader(), version=2).result == "updated"  # a new desired state


# -- transient failures: retried ------------------------------------------------------------


def test_a_server_that_is_down_is_a_transient_failure_and_the_retry_succeeds(
    updater: Updater, source: FakeUpdateSource, store: ModelStore, events: Events
) -> None:
    target = publish(source)
    source.down = True
    outcome = ensure(updater, target, Loader())
    assert (outcome.result, outcome.retry) == ("failed", True)
    assert events.failures()[-1]["phase"] == "download"
    assert events.failures()[-1]["rejected"] is False
    assert active(store) == OLD

    source.down = False
    assert ensure(updater, target, Loader()).result == "updated"
    assert active(store) == NEW


def test_metadata_that_cannot_be_fetched_is_retried(
    updater: Updater, source: FakeUpdateSource, events: Events
) -> None:
    target = publish(source)
    source.verify_error = TufUnavailable("the controller did not answer")
    first = ensure(updater, target, Loader())
    assert (first.result, first.retry) == ("failed", True)
    second = ensure(updater, target, Loader())
    assert (second.result, second.retry) == ("failed", True)  # tried, and said, again
    assert len(source.verified) == 2
    assert len(events.failures()) == 2


def test_a_full_disk_while_recording_the_attempt_is_transient(
    updater: Updater, source: FakeUpdateSource, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(path: Path, data: bytes, **_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    target = publish(source)
    monkeypatch.setattr(updater_module, "atomic_write", full)
    outcome = ensure(updater, target, Loader())
    assert (outcome.result, outcome.retry) == ("failed", True)
    assert outcome.error is not None
    assert "No space left" in outcome.error
    assert active(store) == OLD


# -- rejected failures: reported once --------------------------------------------------------


def refused_once(
    updater: Updater, target: TargetRef, source: FakeUpdateSource, events: Events
) -> dict[str, Any]:
    """Ensure twice: one failure reported, not retried, and the second call does nothing."""
    first = ensure(updater, target, Loader())
    assert (first.result, first.retry) == ("failed", False)
    calls = (len(source.verified), len(source.requests), len(events.seen))
    second = ensure(updater, target, Loader())
    assert (second.result, second.error) == ("given_up", first.error)
    assert (len(source.verified), len(source.requests), len(events.seen)) == calls
    [failure] = events.failures()
    assert failure["rejected"] is True
    assert failure["retry"] is False
    return failure


def test_an_unreadable_slot_state_is_reported_once_not_retried_for_ever(
    updater: Updater, source: FakeUpdateSource, store: ModelStore, events: Events
) -> None:
    target = publish(source)
    (store.root / NAME / "state.json").write_text("{ not json")
    failure = refused_once(updater, target, source, events)
    assert failure["phase"] == "read the slots"
    assert "state.json" in failure["reason"]
    assert source.requests == []


def test_metadata_that_does_not_verify_is_rejected(
    updater: Updater, source: FakeUpdateSource, store: ModelStore, events: Events
) -> None:
    target = publish(source)
    source.verify_error = TufRejected("signature", "timestamp signed by an unknown key")
    failure = refused_once(updater, target, source, events)
    assert failure["phase"] == "verify"
    assert active(store) == OLD


def test_a_target_missing_from_the_signed_metadata_is_rejected(
    updater: Updater, source: FakeUpdateSource, events: Events
) -> None:
    target = TargetRef(path=f"{NAME}/9/emb.onnx", length=3, sha256="ab" * 32)
    failure = refused_once(updater, target, source, events)
    assert "not in the TUF targets metadata" in failure["reason"]


def test_an_artifact_swapped_after_signing_is_refused_and_the_old_version_serves(
    updater: Updater, source: FakeUpdateSource, store: ModelStore, events: Events
) -> None:
    target = publish(source)
    source.serve(target.sha256, NEW.replace(b"little", b"LITTLE"))  # same length, other bytes
    failure = refused_once(updater, target, source, events)
    assert failure["phase"] == "download"
    assert active(store) == OLD
    pending = store.slots.state(NAME).pending
    assert pending is not None
    assert pending.phase is Phase.FAILED


@pytest.mark.parametrize(
    ("custom", "why"),
    [
        ({"runtime": {"context_length": "lots"}}, "metadata is unusable"),
        ({"format": "safetensors"}, "metadata is unusable"),
        ({"ram_bytes": 64 << 30}, "needs 64.0 GiB of RAM"),
    ],
)
def test_a_target_this_device_cannot_use_is_rejected_before_downloading(
    updater: Updater, source: FakeUpdateSource, events: Events, custom: dict[str, Any], why: str
) -> None:
    target = publish(source, **custom)
    failure = refused_once(updater, target, source, events)
    assert why in failure["reason"]
    assert source.requests == []


def test_a_new_desired_state_tries_a_refused_target_again(
    updater: Updater, source: FakeUpdateSource, events: Events
) -> None:
    target = publish(source)
    source.verify_error = TufRejected("expired", "timestamp expired")
    assert ensure(updater, target, Loader()).result == "failed"
    source.verify_error = None
    assert ensure(updater, target, Loader(), version=2).result == "updated"


# -- the executor around it: the agent keeps serving -------------------------------------------


def test_a_corrupt_slot_state_fails_the_update_once_and_the_served_model_keeps_serving(
    store: ModelStore, source: FakeUpdateSource, events: Events
) -> None:
    controller = executor(store, Loader(), [ModelSpec(name=NAME)])
    registry = controller.context.registry
    target = publish(source)
    desired = DesiredState(
        device_id="dev-updater-1", version=1, models=[DesiredModel(name=NAME, target=target)]
    )

    async def scenario() -> None:
        await controller.reconcile()  # the configured model serves
        [served] = registry.models()
        controller.attach_updates(source, events)
        (store.root / NAME / "state.json").write_bytes(b"\x00garbage")
        outcomes = await controller.apply_desired(desired)
        assert [(o.action, o.retry) for o in outcomes if o.error] == [("update", False)]
        assert registry.models() == [served]
        await controller.reconcile()  # a later reconcile (a RECONCILE command, a restart
        await controller.reconcile()  # of the link's loop) reports nothing more
        assert registry.models() == [served]

    asyncio.run(scenario())
    assert len(events.failures()) == 1
    assert source.requests == []


# -- what each event carries ---------------------------------------------------------------


def test_every_update_event_names_the_model_the_version_and_the_target(
    updater: Updater, source: FakeUpdateSource, events: Events
) -> None:
    target = publish(source)
    assert ensure(updater, target, Loader()).result == "updated"
    sick = Loader()
    sick.healthy = False
    other = publish(source, NEW + b"!", version="3")
    assert ensure(updater, other, sick).result == "rolled_back"
    versions = {target.sha256: ("2", target.path), other.sha256: ("3", other.path)}
    assert len(events.seen) > 4
    for _, _, data in events.seen:
        assert data["model"] == NAME
        assert (data["version"], data["target"]) == versions[data["sha256"]]
    [(severity, rolled)] = events.of(EventKind.UPDATE_ROLLED_BACK)
    assert (severity, rolled["phase"]) == (Severity.ERROR, "health")


def test_a_failure_before_the_signed_metadata_names_the_desired_version(
    updater: Updater, source: FakeUpdateSource, events: Events
) -> None:
    target = publish(source)
    source.verify_error = TufUnavailable("the controller did not answer")
    wanted = DesiredModel(name=NAME, version="2", target=target)
    assert asyncio.run(updater.ensure(1, wanted, Loader())).result == "failed"
    [failure] = events.failures()
    assert failure["phase"] == "verify"
    assert (failure["model"], failure["version"], failure["sha256"]) == (NAME, "2", target.sha256)


def test_an_update_that_kept_killing_the_agent_is_reported_once_as_rolled_back(
    updater: Updater, source: FakeUpdateSource, store: ModelStore, events: Events
) -> None:
    target = publish(source)
    # Three activations under desired state 1, each ended by the agent dying (start-up
    # recovery rolled the last one back): update.json is all that is left of them.
    attempts = {"desired_version": 1, "sha256": target.sha256, "activations": 3}
    (store.slots.folder(NAME) / "update.json").write_text(json.dumps(attempts))
    first = ensure(updater, target, Loader())
    assert first.result == "rolled_back"
    assert first.error is not None
    assert "stopped 3 times" in first.error
    assert events.kinds() == [EventKind.UPDATE_ROLLED_BACK]
    [(_, data)] = events.of(EventKind.UPDATE_ROLLED_BACK)
    assert (data["phase"], data["sha256"]) == ("health", target.sha256)

    restarted = Updater(store, source, events, QUICK)  # what it decided survives a restart
    assert ensure(restarted, target, Loader()).result == "given_up"
    assert events.kinds() == [EventKind.UPDATE_ROLLED_BACK]
    assert source.requests == []
    assert active(store) == OLD
