"""What the updater's tests share: a recorder of events, a fake loader, an executor.

A real model store and the real downloader run on a temporary folder; only the
controller (:class:`tests.fakes.update_source.FakeUpdateSource`) and model loading are
faked. :class:`Events` records what the updater emits and, through the link's own
mapping (:func:`agent.link.outcomes.outcome_events`), what a reconcile's outcomes add,
so a test sees every event the fleet would get.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import AgentSettings, ModelSpec
from agent.errors import ModelLoadError
from agent.link.outcomes import ReconcileOutcome, outcome_events
from agent.metrics import AgentMetrics
from agent.runtime.base import ServedModel
from agent.serving.registry import ModelRegistry
from agent.state.apply import ExecutorContext, ModelController
from agent.store import ModelStore
from agent.update.download import DownloadConfig
from agent.update.updater import UpdateConfig
from models.manifest import ModelManifest, RuntimeParams
from models.wire import EventKind, Severity, TargetRef
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
    """What the fleet would be told, in order."""

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

    def outcomes(self, outcomes: Sequence[ReconcileOutcome]) -> None:
        """What the link sends for a reconcile's outcomes (``FleetLink.model_outcomes``)."""
        for event in outcome_events(outcomes):
            self(event.kind, event.message, severity=event.severity, data=event.data)

    def kinds(self) -> list[EventKind]:
        return [kind for kind, _, _ in self.seen if kind is not EventKind.UPDATE_PROGRESS]

    def of(self, kind: EventKind) -> list[tuple[Severity, dict[str, Any]]]:
        return [(severity, data) for k, severity, data in self.seen if k is kind]

    def failures(self) -> list[dict[str, Any]]:
        return [data for _, data in self.of(EventKind.UPDATE_FAILED)]


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


def make_store(root: Path, data: bytes = OLD, version: str = "1") -> ModelStore:
    """A store holding ``NAME`` at ``version``."""
    store = ModelStore(root)
    source = root.parent / f"{NAME}-{version}.onnx"
    source.write_bytes(data)
    store.install(source, name=NAME, version=version, runtime=RuntimeParams())
    return store


def publish(
    source: FakeUpdateSource, data: bytes = NEW, version: str = "2", **custom: Any
) -> TargetRef:
    fields: dict[str, Any] = {"version": version, "format": "onnx"}
    fields.update(custom)
    return source.publish(f"{NAME}/{version}/emb.onnx", data, **fields)


def executor(
    store: ModelStore, loader: Loader, configured: Sequence[ModelSpec] = ()
) -> ModelController:
    """The real executor on ``store``, loading through ``loader``."""
    registry = ModelRegistry()
    context = ExecutorContext(
        AgentSettings(store_dir=store.root), registry, AgentMetrics(registry.models)
    )
    return ModelController(
        context,
        configured,
        load=lambda manifest, path, _settings, _registry: loader(manifest, path),
    )
