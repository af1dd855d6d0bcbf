"""The controller's REST API: one router per resource, shared dependencies, one error shape."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.types import Scope

from fleet.api import (
    alerts,
    artifacts,
    desired,
    devices,
    enroll,
    groups,
    models,
    policies,
    rollouts,
    status,
    telemetry,
    tokens,
    tuf,
    users,
)

__all__ = ["ROUTERS", "streams_body"]

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
    tuf.router,
    rollouts.router,
    policies.router,
    alerts.router,
    users.router,
    users.tokens_router,
)


def streams_body(scope: Scope) -> bool:
    """Routes that stream their body under a cap of their own instead of the 1 MiB limit."""
    return models.is_upload(scope) or tuf.is_metadata_import(scope)
