"""Which devices are degraded, as SQL: the device views filter on it, the alerts read it.

The alert round that lived here is :mod:`fleet.alerts` now (every alert rule, not only
``group_degraded``); this module keeps the one query both share.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlmodel import SQLModel

from fleet.tables import Device

__all__ = ["is_degraded"]

_devices: sa.Table = SQLModel.metadata.tables[str(Device.__tablename__)]


def is_degraded() -> sa.ColumnElement[bool]:
    """SQL: the device's last report lists at least one degraded model (SQLite, PostgreSQL)."""
    listed = _devices.c.reported["degraded"].as_json()
    return sa.func.coalesce(sa.func.json_array_length(listed), 0) > 0
