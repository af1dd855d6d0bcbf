"""A bounded LRU of finished deterministic generations.

Only greedy requests are cached: with temperature 0 the same model, prompt and
parameters always give the same text, so replaying it is exact and saves a
whole generation. Keys hold the model version, so a hot swap never serves the
old model's answers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from agent.serving.scheduler import GenerationRequest, GenerationResult

__all__ = ["ResponseCache", "cache_key"]


def cache_key(model: str, version: str, request: GenerationRequest) -> Hashable | None:
    """The key for ``request``, or None when its output is not deterministic."""
    if not request.sampling.greedy:
        return None
    return (
        model,
        version,
        tuple(request.prompt),
        request.max_tokens,
        request.stop,
        request.ignore_eos,
        request.sampling,
        request.logprobs,
    )


class ResponseCache:
    """At most ``max_entries`` results, least recently used evicted first."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._items: OrderedDict[Hashable, GenerationResult] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable | None) -> GenerationResult | None:
        if key is None or self._max == 0:
            return None
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: Hashable | None, result: GenerationResult) -> None:
        if key is None or self._max == 0:
            return
        self._items[key] = result
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)
