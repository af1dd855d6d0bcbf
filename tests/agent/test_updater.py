"""The updater shell: every outcome of :meth:`Updater.ensure`, against a fake update source.

A real model store and the real downloader run on a temporary folder; only the
controller (:class:`tests.fakes.update_source.FakeUpdateSource`) and model loading are
faked, so each case takes milliseconds. Whether a failure is retried is the error's
branch: transient failures are retried, rejected ones are reported once.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentSettings, ModelSpec
from agent.errors import ModelLoadError
from agent.metrics import AgentMetrics
from agent.runtime.base import ServedModel
from agent.serving.registry import ModelRegistry
from agent.state.apply import ExecutorContext, ModelController
from agent.store import ModelStore
from agent.store.slots import Phase
from agent.update import updater as updater_module
from agent.update.download import DownloadConfig
from agent.update.tuf_client import TufRejected, TufUnavailable
from agent.update.updater import UpdateConfig, UpdateOutcome, Updater
from models.manifest import ModelManifest, RuntimeParams
from models.wire import DesiredModel, DesiredState, EventKind, Severity, TargetRef
from tests.fakes.models import FakeEmbedder
from tests.fakes.update_source import FakeUpdateSource

NAME = "emb"
OLD = b"ONNX weights, version 1"
NEW = b"ONNX weights, version 2, a little longer"
QUICK = UpdateConfig(
    download=DownloadConfig(max_attempts=1, min_free_bytes=0), progress_every_s=0.0
)


@dataclass
class Events:
    """What the updater reported, in order."""

    seen: list[tuple[EventKind, Severity, dict[str, Any]]] = field(default_factory=list)

    def __call__(
        self,
        kind: EventKind,
        message: str = "",
        *,
        severity: Severity = Severity.INFO,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.seen.append((kind, severity, data or {}))

    def kinds(self) -> list[EventKind]:
        return [kind for kind, _, _ in self.seen if kind is not EventKind.UPDATE_PROGRESS]

    def failures(self) -> list[dict[str, Any]]:
        return [data for kind, _, data in self.seen if kind is EventKind.UPDATE_FAILED]


class Loader:
    """Loads every file as an embedder, healthy unless told otherwise."""

    def __init__(self) -> None:
        self.healthy = True
        self.loaded: list[Path] = []

    def __call__(self, manifest: ModelManifest, path: Path) -> ServedModel:
        self.loaded.append(path)
        if path.read_bytes()[:4] != b"ONNX":
            raise ModelLoadError(f"{path} is not an ONNX model")
        return FakeEmbedder(manifest, healthy=self.healthy)


@pytest.fixture
def source() -> Iterator[FakeUpdateSource]:
    fake = FakeUpdateSource()
    yield fake
    asyncio.run(fake.aclose())


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    old = tmp_path / "emb.onnx"
    old.write_bytes(OLD)
    store.install(old, name=NAME, version="1", runtime=RuntimeParams())
    return store


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def updater(store: ModelStore, source: FakeUpdateSource, events: Events) -> Updater:
    return Updater(store, source, events, QUICK, ram_total_bytes=8 << 30)


def publish(source: FakeUpdateSource, data: bytes = NEW, **custom: Any) -> TargetRef:
    fields: dict[str, Any] = {"version": "2", "format": "onnx"}
    fields.update(custom)
    return source.publish(f"{NAME}/2/emb.onnx", data, **fields)


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
    registry = ModelRegistry()
    metrics = AgentMetrics(registry.models)
    context = ExecutorContext(AgentSettings(store_dir=store.root), registry, metrics)
    loader = Loader()
    controller = ModelController(
        context,
        [ModelSpec(name=NAME)],
        load=lambda manifest, path, _settings, _registry: loader(manifest, path),
    )
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
