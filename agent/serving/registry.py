"""The models the agent serves right now, with hot swap and a memory budget.

A request *leases* a model for its whole life. Swapping a model publishes the new
one atomically; the old one closes when its last lease ends, so in-flight
requests finish on the model they started on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from agent.errors import InvalidRequest, MemoryBudgetExceeded, ModelNotFound, ModelNotReady
from agent.runtime.base import ServedModel
from models.policy import FailureKind

__all__ = ["ModelRegistry", "ServingLoop"]

M = TypeVar("M", bound=ServedModel)
COPY_MARK = "@"  # in a registry name: a private copy, e.g. a model's CPU copy "gemma3-270m@cpu"


@runtime_checkable
class ServingLoop(Protocol):
    """A model served by a thread of its own (the GGUF scheduler), which beats as it runs."""

    @property
    def last_beat(self) -> float:
        """``time.monotonic()`` of the loop's last iteration."""


@dataclass
class _Entry:
    model: ServedModel
    leases: int = 0
    retired: bool = False


@dataclass
class ModelRegistry:
    """Name to model; thread-safe, because runtimes load in worker threads."""

    memory_budget_bytes: int | None = None  # None: no limit
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _loading: set[str] = field(default_factory=set)
    _failed: dict[str, str] = field(default_factory=dict)
    _failure: dict[str, FailureKind] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def names(self) -> list[str]:
        """Names apps can ask for; a fallback's private CPU copy ("x@cpu") is not one."""
        with self._lock:
            return sorted(n for n in self._entries if COPY_MARK not in n)

    def models(self) -> list[ServedModel]:
        """The models apps can ask for (copies are only the fallback walker's)."""
        with self._lock:
            return [e.model for n, e in sorted(self._entries.items()) if COPY_MARK not in n]

    def heartbeats(self) -> dict[str, float]:
        """Each served loop's last beat, private copies included (they hang just the same)."""
        with self._lock:
            entries = list(self._entries.items())
        return {n: e.model.last_beat for n, e in entries if isinstance(e.model, ServingLoop)}

    def expect(self, name: str) -> None:
        """Mark a model as configured but not loaded yet, so requests get 503, not 404."""
        with self._lock:
            self._loading.add(name)

    def fail(self, name: str, reason: str, kind: FailureKind = FailureKind.LOAD_FAILED) -> None:
        """Record that a configured model could not be loaded; /readyz reports the reason."""
        with self._lock:
            self._loading.discard(name)
            self._failed[name] = reason
            self._failure[name] = kind

    def ready(self) -> bool:
        with self._lock:
            return not self._loading and not self._failed

    def failure(self, name: str) -> FailureKind | None:
        """Why ``name`` failed to load (None: it did not)."""
        with self._lock:
            return self._failure.get(name) if name in self._failed else None

    def waiting(self) -> tuple[list[str], dict[str, str]]:
        """Models still loading, and models that failed with their reasons."""
        with self._lock:
            return sorted(self._loading), dict(self._failed)

    def check_budget(self, extra_bytes: int, replacing: str | None = None) -> None:
        """Refuse a load that would push the served models past the memory budget."""
        if self.memory_budget_bytes is None:
            return
        with self._lock:
            used = sum(
                e.model.info.memory_bytes for n, e in self._entries.items() if n != replacing
            )
        if used + extra_bytes > self.memory_budget_bytes:
            raise MemoryBudgetExceeded(
                f"loading {extra_bytes / 2**20:.0f} MiB would exceed the memory budget "
                f"({used / 2**20:.0f} of {self.memory_budget_bytes / 2**20:.0f} MiB in use); "
                "raise memory_budget_mb or serve fewer models"
            )

    def publish(self, name: str, model: ServedModel) -> None:
        """Serve ``model`` under ``name`` from now on; retire whatever served it before."""
        with self._lock:
            old = self._entries.get(name)
            self._entries[name] = _Entry(model)
            self._loading.discard(name)
            self._failed.pop(name, None)
            self._failure.pop(name, None)
            close_now = old is not None and self._retire(old)
        if close_now and old is not None:
            old.model.close()

    def remove(self, name: str) -> None:
        with self._lock:
            old = self._entries.pop(name, None)
            self._loading.discard(name)
            self._failed.pop(name, None)
            self._failure.pop(name, None)
            close_now = old is not None and self._retire(old)
        if close_now and old is not None:
            old.model.close()

    def close(self) -> None:
        for name in self.names():
            self.remove(name)

    @contextmanager
    def lease(self, name: str, kind: type[M]) -> Iterator[M]:
        """Hold ``name`` for the duration of a request; it is not closed until released."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                if name in self._loading:
                    raise ModelNotReady(f"model {name!r} is still loading; retry shortly")
                if name in self._failed:
                    raise ModelNotReady(
                        f"model {name!r} failed to load: {self._failed[name]}",
                        failure=self._failure.get(name, FailureKind.LOAD_FAILED),
                    )
                raise ModelNotFound(f"The model {name!r} does not exist", param="model")
            if not isinstance(entry.model, kind):
                raise InvalidRequest(
                    f"model {name!r} does not support this endpoint", param="model"
                )
            entry.leases += 1
        try:
            yield entry.model
        finally:
            with self._lock:
                entry.leases -= 1
                close_now = entry.retired and entry.leases == 0
            if close_now:
                entry.model.close()

    @staticmethod
    def _retire(entry: _Entry) -> bool:
        entry.retired = True
        return entry.leases == 0
