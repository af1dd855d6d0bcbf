"""Progress while seeding: rows per second, and a line when a table is done."""

from __future__ import annotations

import time
from typing import TextIO


class _Progress:
    """Rows per second on ``out``: a line every ``every_s`` and one when a table is done."""

    def __init__(self, out: TextIO | None, every_s: float = 2.0) -> None:
        self._out = out
        self._every_s = every_s
        self._what = ""
        self._total: int | None = None
        self._done = 0
        self._started = 0.0
        self._last = 0.0

    def start(self, what: str, total: int | None) -> None:
        self._what, self._total, self._done = what, total, 0
        self._started = self._last = time.monotonic()

    def add(self, rows: int) -> None:
        self._done += rows
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            self._say(now, final=False)

    def finish(self) -> float:
        now = time.monotonic()
        self._say(now, final=True)
        return now - self._started

    def note(self, message: str) -> None:
        if self._out is not None:
            print(f"seed: {message}", file=self._out, flush=True)

    def _say(self, now: float, *, final: bool) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = self._done / elapsed
        if final:
            self.note(f"{self._what}: {self._done:,} rows in {elapsed:.1f} s ({rate:,.0f} rows/s)")
            return
        of = f" of {self._total:,}" if self._total else ""
        left = ""
        if self._total and rate > 0:
            left = f", {max(0.0, (self._total - self._done) / rate):.0f} s left"
        self.note(f"{self._what}: {self._done:,}{of} rows ({rate:,.0f} rows/s{left})")
