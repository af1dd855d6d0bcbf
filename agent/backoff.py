"""Exponential backoff with full jitter, as a pure value plus a tiny counter.

``delay(n) = uniform(0, min(cap, initial * multiplier**n))`` (AWS's "full jitter"):
devices that lost the broker together do not all come back in the same second.
The randomness is passed in, so tests pin it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Backoff", "Retry", "seconds"]


@dataclass(frozen=True)
class Backoff:
    """The schedule: how long to wait before attempt ``n + 1`` after ``n`` failures."""

    initial_s: float = 1.0  # seconds; the ceiling of the first delay
    cap_s: float = 60.0  # seconds; no delay is longer
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.cap_s < self.initial_s or self.multiplier < 1:
            raise ValueError("need 0 < initial_s <= cap_s and multiplier >= 1")

    def ceiling(self, failures: int) -> float:
        """The largest delay after ``failures`` consecutive failures (0-based)."""
        exponent = min(max(failures, 0), 64)  # beyond this the cap has long won
        return min(self.cap_s, self.initial_s * self.multiplier**exponent)

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """A jittered delay in ``[0, ceiling(failures)]``; ``rand`` returns ``[0, 1)``."""
        return rand() * self.ceiling(failures)


@dataclass
class Retry:
    """Counts consecutive failures against a :class:`Backoff`; reset after a healthy run."""

    backoff: Backoff
    rand: Callable[[], float] = field(default=random.random)
    failures: int = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        delay = self.backoff.delay(self.failures, self.rand)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


def seconds(delay: float) -> str:
    """A delay as people read it in a message: ``0.4 s``, ``12 s``."""
    return f"{delay:.1f} s" if delay < 10 else f"{delay:.0f} s"
