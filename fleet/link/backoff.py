"""How long to wait before trying the broker (or the database) again."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["ReconnectPolicy"]


@dataclass(frozen=True)
class ReconnectPolicy:
    """Backoff between connection attempts: ``initial_s`` doubling up to ``max_s``, jittered."""

    initial_s: float = 0.5  # seconds
    max_s: float = 15.0  # seconds

    def delay(self, attempt: int) -> float:
        """Equal jitter: half the exponential step fixed, half random."""
        step = min(self.max_s, self.initial_s * 2.0 ** min(attempt, 30))
        return step / 2 + random.uniform(0, step / 2)  # noqa: S311 - jitter, not crypto
