"""Fakes of a loaded model (:class:`agent.runtime.base.ServedModel` and ``Embedder``).

They remember being closed, so a test can tell a model that was let go from one that
still serves. The embedder answers a constant unit vector, or NaN when built unhealthy,
which is what the update health check judges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.runtime.base import RuntimeInfo, TensorSpec
from models.manifest import ModelManifest

__all__ = ["FakeEmbedder", "FakeModel"]


class FakeModel:
    """A served model that does nothing but exist."""

    def __init__(self, manifest: ModelManifest) -> None:
        self._manifest = manifest
        self.closed = False

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    @property
    def info(self) -> RuntimeInfo:
        return RuntimeInfo("fake", "0", "cpu", "fake", memory_bytes=1000)

    def close(self) -> None:
        self.closed = True


class FakeEmbedder(FakeModel):
    """An embedder of ``dim`` dimensions; ``healthy=False`` makes every vector NaN."""

    def __init__(self, manifest: ModelManifest, *, dim: int = 4, healthy: bool = True) -> None:
        super().__init__(manifest)
        self.dim = dim
        self.healthy = healthy

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return [TensorSpec("text", "BYTES", (-1,))]

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return [TensorSpec("embedding", "FP32", (-1, self.dim))]

    def count_tokens(self, texts: Sequence[str]) -> int:
        return sum(len(t.split()) for t in texts)

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        value = 1.0 / np.sqrt(self.dim) if self.healthy else np.nan
        return np.full((len(texts), self.dim), value, dtype=np.float32)

    def infer(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        raise NotImplementedError
