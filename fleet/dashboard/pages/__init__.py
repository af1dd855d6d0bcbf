"""One module per dashboard section, each with its own ``router``."""

from __future__ import annotations

from fastapi import APIRouter

from fleet.dashboard.pages import (
    alerts,
    audit,
    devices,
    models,
    overview,
    policies,
    rollouts,
    tokens,
    users,
)

__all__ = ["ROUTERS"]

ROUTERS: tuple[APIRouter, ...] = (
    overview.router,
    devices.router,
    models.router,
    rollouts.router,
    policies.router,
    tokens.router,
    users.router,
    audit.router,
    alerts.router,
)
