"""Rows for device events."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from fleet.simulate.seed.plan import _Fleet


def _event_rows(fleet: _Fleet) -> list[tuple[Any, ...]]:
    rng = random.Random(f"{fleet.config.seed}:event-ids")  # noqa: S311
    found = [(min(e[0], fleet.now), d.id, e) for d in fleet.devices for e in d.events]
    found.sort(key=lambda x: (x[0], x[1], x[2][1].value))
    return [
        (
            device_id,
            f"{rng.getrandbits(128):032x}",
            at,
            kind.value,
            severity.value,
            message,
            data,
            at + timedelta(seconds=0.05 + rng.random()),
        )
        for at, device_id, (_, kind, severity, message, data) in found
    ]


EVENT_COLUMNS = ("device_id", "event_id", "ts", "kind", "severity", "message", "data", "stored_at")
