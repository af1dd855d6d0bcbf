"""A deterministic embedder whose cosines a test can work out by hand.

:class:`~tests.fakes.models.FakeEmbedder` answers one constant vector, so every text
means the same; a semantic cache needs texts that differ. This one is a bag of
words: each distinct lowercase word gets its own axis (the next free one, so no two
words ever collide), and a text's vector counts its words, L2-normalised. Two texts
of distinct words sharing ``k`` of them have cosine ``k / sqrt(n * m)``.
A text with no words embeds as the zero vector, which no real embedder returns.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from models.manifest import ModelFormat, ModelManifest
from tests.fakes.models import FakeEmbedder

__all__ = ["WordEmbedder", "embedder_manifest"]

_WORD = re.compile(r"\w+")


def embedder_manifest(name: str = "words", sha256: str = "0" * 64) -> ModelManifest:
    """A manifest for a fake embedder; change ``sha256`` to stand for another model file."""
    return ModelManifest(
        name=name,
        version="1",
        format=ModelFormat.ONNX,
        file=f"{name}.onnx",
        sha256=sha256,
        size_bytes=0,
    )


class WordEmbedder(FakeEmbedder):
    """Bag-of-words vectors of ``dim`` axes; it counts texts embedded in ``embedded``."""

    def __init__(self, manifest: ModelManifest | None = None, *, dim: int = 256) -> None:
        super().__init__(manifest or embedder_manifest(), dim=dim)
        self.embedded = 0
        self._axes: dict[str, int] = {}
        self._lock = threading.Lock()  # the cache embeds from many threads at once

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        rows = np.zeros((len(texts), self.dim), dtype=np.float32)
        with self._lock:
            self.embedded += len(texts)
            for i, text in enumerate(texts):
                for word in _WORD.findall(text.lower()):
                    rows[i, self._axis(word)] += 1.0
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        unit: npt.NDArray[np.float32] = (rows / np.maximum(norms, 1e-12)).astype(np.float32)
        return unit

    def _axis(self, word: str) -> int:
        axis = self._axes.setdefault(word, len(self._axes))
        if axis >= self.dim:
            raise AssertionError(f"more than {self.dim} distinct words: build it with a larger dim")
        return axis
