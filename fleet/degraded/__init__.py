"""Degraded devices on the controller: who is degraded, and when a group is.

:mod:`fleet.degraded.rules` decides (pure) when a group's degraded share raises a
``group_degraded`` alert; :mod:`fleet.degraded.alerts` holds the SQL that finds
degraded devices. The alert round itself, for every rule, is :mod:`fleet.alerts`.
"""

from __future__ import annotations

from fleet.degraded.alerts import is_degraded
from fleet.degraded.rules import GROUP_DEGRADED, Thresholds, degraded_of

__all__ = ["GROUP_DEGRADED", "Thresholds", "degraded_of", "is_degraded"]
