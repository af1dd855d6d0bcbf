"""The controller's REST API: one router per resource, shared dependencies, one error shape."""

from __future__ import annotations

from fastapi import APIRouter

from fleet.api import (
    artifacts,
    desired,
    devices,
    enroll,
    groups,
    models,
    status,
    telemetry,
    tokens,
)

__all__ = ["ROUTERS"]

ROUTERS: tuple[APIRouter, ...] = (
    status.router,
    enroll.router,
    tokens.router,
    devices.router,
    desired.router,
    groups.router,
    telemetry.router,
    models.router,
    artifacts.router,
)
