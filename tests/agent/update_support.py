"""What the updater's tests share: a recorder of events, a fake loader, an executor.

A real model store and the real downloader run on a temporary folder; only the
controller (:class:`tests.fakes.update_source.FakeUpdateSource`) and model loading are
faked. :class:`Events` records what the updater emits and, through the link's own
mapping (:func:`agent.link.outcomes.outcome_events`), what a reconcile's outcomes add,
so a test sees every event the fleet would get. :class:`SlowSource` puts the fake
behind a link that stalls mid-artifact until the test lets it flow.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

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


class SlowSource:
    """The fake update source behind a slow link: every artifact stalls after ``head`` bytes.

    Each response sends its first ``head`` bytes, then waits until ``flowing`` is set
    before sending the rest; ``stalled`` counts the responses waiting now and ``sent``
    the body bytes each response sent. Build it inside the test's event loop.
    """

    def __init__(self, fake: FakeUpdateSource, head: int) -> None:
        self.fake = fake
        self.head = head
        self.flowing = asyncio.Event()
        self.stalled = 0
        self.sent: list[int] = []
        self._http = httpx.AsyncClient(transport=httpx.MockTransport(self._answer))

    def verified_targets(self, paths: list[str]) -> Mapping[str, Any]:
        return self.fake.verified_targets(paths)

    def artifact_url(self, sha256: str) -> str:
        return self.fake.artifact_url(sha256)

    @property
    def http(self) -> httpx.AsyncClient:
        return self._http

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _answer(self, request: httpx.Request) -> httpx.Response:
        answer = await self.fake.http.send(request)  # the fake's status, headers and body
        self.sent.append(0)
        return httpx.Response(
            answer.status_code,
            headers=answer.headers,
            stream=_Trickle(self, answer.content, len(self.sent) - 1),
        )


class _Trickle(httpx.AsyncByteStream):
    def __init__(self, source: SlowSource, body: bytes, index: int) -> None:
        self._source, self._body, self._index = source, body, index

    async def __aiter__(self) -> AsyncIterator[bytes]:
        source = self._source
        for part, last in ((self._body[: source.head], False), (self._body[source.head :], True)):
            if last and part and not source.flowing.is_set():
                source.stalled += 1
                try:
                    await source.flowing.wait()
                finally:
                    source.stalled -= 1
            if part:
                source.sent[self._index] += len(part)
                yield part
