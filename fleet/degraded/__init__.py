"""Degraded devices on the controller: who is degraded, and alerts when a group is.

:mod:`fleet.degraded.rules` decides (pure); :mod:`fleet.degraded.alerts` reads the
devices, writes the alerts and runs the round in the app's lifespan.
"""

from __future__ import annotations

from fleet.degraded.alerts import (
    AlertState,
    Evaluation,
    evaluate,
    is_degraded,
    list_alerts,
    thresholds_of,
    watch,
)
from fleet.degraded.rules import GROUP_DEGRADED, Thresholds, degraded_of

__all__ = [
    "GROUP_DEGRADED",
    "AlertState",
    "Evaluation",
    "Thresholds",
    "degraded_of",
    "evaluate",
    "is_degraded",
    "list_alerts",
    "thresholds_of",
    "watch",
]
