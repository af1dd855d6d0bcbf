"""Warnings that a flood of bad messages or an outage cannot turn into a flood of log lines."""

from __future__ import annotations

import logging
import time
from collections import Counter

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most one line per key every ``every_s`` seconds, saying how many were held back."""

    def __init__(self, logger: logging.Logger, every_s: float) -> None:
        self._logger = logger
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._every_s:
            self._held[key] += 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg += " (and %d more like it since the last report)"
            args = (*args, held)
        self._logger.warning(msg, *args)
