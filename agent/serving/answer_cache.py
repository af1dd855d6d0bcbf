"""A semantic cache of past good answers, found by meaning when a model cannot answer.

In degraded mode an answer the model once gave to a question that *means* the same
is better than a 503. Each served model (``key``) has its own shelf: a float32
matrix of prompt embeddings beside the prompts and answers, so a lookup is one
matrix-vector product (rows are L2-normalised, so the product is the cosine).

Decisions, and why:

- **Bounded by least recently used, over all keys together.** The memory is the
  device's, not one model's; an answer that keeps being served is worth more than
  one merely remembered recently, so a hit refreshes an entry as a ``remember`` does.
- **One embedder per shelf.** Vectors from two embedders live in different spaces
  and their dot product means nothing. A shelf is stamped with its embedder's
  identity (manifest name, version and sha256); a lookup with another embedder
  misses, and remembering with another embedder empties the key's shelf first, so
  an embedder update never leaves stale vectors behind.
- **Prompts are only stripped.** Anything more (case, punctuation) is the
  embedder's job, and the exact remembered prompt is returned with each hit.
  An exactly remembered prompt is a hit of similarity 1 without embedding at all.
- **A cache never makes things worse.** Empty prompts or answers are not
  remembered, and a vector that is not one finite, non-zero row (an unhealthy
  embedder) is a miss or is not stored. Errors the embedder raises
  (:mod:`agent.errors`) propagate: the fallback chain decides what a failed tier means.

``lookup`` and ``remember`` embed, which blocks: call them from a worker thread.
Embedding happens outside the lock, so threads only wait for each other over the
matrix product.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from agent.runtime.base import Embedder

__all__ = ["CacheHit", "SemanticCache", "embedder_identity"]

_TOLERANCE: Final = 1e-6  # float32 rounding: a prompt's vector against itself may give 0.99999994
_MIN_ROWS: Final = 16  # a shelf's smallest matrix, in rows

EmbedderId = tuple[str, str, str]
Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class CacheHit:
    """A remembered answer whose prompt means nearly the same as the one asked."""

    answer: str
    similarity: float  # cosine of the two prompts' embeddings, clipped to 0..1
    prompt: str  # the remembered prompt it matched (stripped)


def embedder_identity(embedder: Embedder) -> EmbedderId:
    """What makes two embedders' vectors comparable: the same model file, by name and digest."""
    manifest = embedder.manifest
    return (manifest.name, manifest.version, manifest.sha256)


class _Shelf:
    """One key's entries, all embedded by one embedder: rows ``0..count`` of ``vectors``."""

    def __init__(self, embedder: EmbedderId, dim: int) -> None:
        self.embedder = embedder
        self.dim = dim
        self.vectors: Vector = np.empty((_MIN_ROWS, dim), dtype=np.float32)
        self.prompts: list[str] = []
        self.answers: list[str] = []
        self.rows: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def put(self, prompt: str, vector: Vector, answer: str) -> None:
        row = self.rows.get(prompt)
        if row is None:
            row = len(self.prompts)
            if row == len(self.vectors):
                grown = np.empty((2 * row, self.dim), dtype=np.float32)
                grown[:row] = self.vectors
                self.vectors = grown
            self.prompts.append(prompt)
            self.answers.append(answer)
            self.rows[prompt] = row
        else:
            self.answers[row] = answer
        self.vectors[row] = vector

    def drop(self, prompt: str) -> None:
        """Move the last row into the dropped one, so rows stay contiguous."""
        row = self.rows.pop(prompt)
        last = len(self.prompts) - 1
        if row != last:
            moved = self.prompts[last]
            self.vectors[row] = self.vectors[last]
            self.prompts[row] = moved
            self.answers[row] = self.answers[last]
            self.rows[moved] = row
        self.prompts.pop()
        self.answers.pop()
        if len(self.vectors) > _MIN_ROWS and len(self.prompts) <= len(self.vectors) // 4:
            self.vectors = self.vectors[: len(self.vectors) // 2].copy()

    def nearest(self, query: Vector) -> tuple[int, float]:
        scores = self.vectors[: len(self.prompts)] @ query
        row = int(np.argmax(scores))
        return row, float(scores[row])


class SemanticCache:
    """At most ``max_entries`` answers over all keys, least recently used evicted first."""

    def __init__(self, max_entries: int = 1000) -> None:
        _check_size(max_entries)
        self._max = max_entries
        self._lock = threading.Lock()
        self._shelves: dict[str, _Shelf] = {}
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()  # LRU first

    def __len__(self) -> int:
        with self._lock:
            return len(self._order)

    def lookup(
        self, key: str, embedder: Embedder, prompt: str, threshold: float
    ) -> CacheHit | None:
        """The remembered answer of ``key`` nearest in meaning, if its cosine reaches ``threshold``.

        Blocking (embeds the prompt): call from a worker thread.
        """
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        text = prompt.strip()
        if not text:
            return None
        identity = embedder_identity(embedder)
        with self._lock:
            shelf = self._shelf(key, identity)
            if shelf is None:
                return None
            row = shelf.rows.get(text)
            if row is not None:
                return self._hit(key, shelf, row, 1.0)
        query = _vector(embedder, text)
        if query is None:
            return None
        with self._lock:
            shelf = self._shelf(key, identity)  # again: it may have changed while we embedded
            if shelf is None or shelf.dim != len(query):
                return None
            row, similarity = shelf.nearest(query)
            if similarity + _TOLERANCE < threshold:
                return None
            return self._hit(key, shelf, row, similarity)

    def remember(self, key: str, embedder: Embedder, prompt: str, answer: str) -> None:
        """Keep ``answer`` for ``prompt`` under ``key``, replacing what that prompt had.

        Blocking (embeds the prompt): call from a worker thread.
        """
        text = prompt.strip()
        if not text or not answer.strip():
            return
        vector = _vector(embedder, text)
        if vector is None:
            return
        identity = embedder_identity(embedder)
        with self._lock:
            shelf = self._shelves.get(key)
            if shelf is None or shelf.embedder != identity or shelf.dim != len(vector):
                if shelf is not None:
                    for prompt_of_old in shelf.prompts:
                        del self._order[(key, prompt_of_old)]
                shelf = self._shelves[key] = _Shelf(identity, len(vector))
            shelf.put(text, vector, answer)
            self._order[(key, text)] = None
            self._order.move_to_end((key, text))
            self._evict()

    def resize(self, max_entries: int) -> None:
        """Change the bound; shrinking evicts the least recently used at once."""
        _check_size(max_entries)
        with self._lock:
            self._max = max_entries
            self._evict()

    # -- under the lock ---------------------------------------------------------------------

    def _shelf(self, key: str, identity: EmbedderId) -> _Shelf | None:
        shelf = self._shelves.get(key)
        if shelf is None or shelf.embedder != identity or not len(shelf):
            return None
        return shelf

    def _hit(self, key: str, shelf: _Shelf, row: int, similarity: float) -> CacheHit:
        prompt = shelf.prompts[row]
        self._order.move_to_end((key, prompt))
        return CacheHit(
            answer=shelf.answers[row],
            similarity=min(1.0, max(0.0, similarity)),
            prompt=prompt,
        )

    def _evict(self) -> None:
        while len(self._order) > self._max:
            (key, prompt), _ = self._order.popitem(last=False)
            shelf = self._shelves[key]
            shelf.drop(prompt)
            if not len(shelf):
                del self._shelves[key]


def _check_size(max_entries: int) -> None:
    if max_entries < 1:
        raise ValueError(f"max_entries must be at least 1, got {max_entries}")


def _vector(embedder: Embedder, text: str) -> Vector | None:
    """The text's unit vector, or None when the embedder gave no usable one.

    Re-normalised although the protocol promises unit rows: an int8 model's rounding
    must not push a cosine past 1 or let a long vector win every comparison.
    """
    rows = np.asarray(embedder.embed([text]), dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] != 1 or rows.shape[1] == 0:
        return None
    vector = rows[0]
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-12:
        return None
    unit: Vector = (vector / norm).astype(np.float32)
    return unit
