"""Dependencies every route shares: the agent's state and the API-key check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from agent.config import AgentSettings
from agent.errors import Unauthorized
from agent.interaction_log import InteractionLog
from agent.metrics import AgentMetrics
from agent.serving.cache import ResponseCache
from agent.serving.degraded import DegradedMode
from agent.serving.registry import ModelRegistry
from models.device import DeviceReport

if TYPE_CHECKING:
    from agent.link.fleet import FleetLink
    from agent.serving.faults import FaultInjector

__all__ = ["AgentState", "Authorized", "StateDep", "get_state", "require_api_key"]


@dataclass
class AgentState:
    """What the lifespan builds and the routes use; one per app, never global."""

    settings: AgentSettings
    registry: ModelRegistry
    metrics: AgentMetrics
    interactions: InteractionLog
    device: DeviceReport
    cache: ResponseCache
    started_at: int  # unix seconds, the "created" of /v1/models
    degraded: DegradedMode  # the fallback policy, breakers and answer cache
    fleet: FleetLink | None = None  # the link to the fleet controller, when enrolled
    faults: FaultInjector | None = None  # /v1/faults, when settings.fault_injection


def get_state(request: Request) -> AgentState:
    state: AgentState = request.app.state.agent
    return state


StateDep = Annotated[AgentState, Depends(get_state)]


def require_api_key(request: Request, state: StateDep) -> None:
    """Accept the request if no keys are configured or it carries one of them."""
    keys = state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
    presented = token.strip().encode()
    if not any(hmac.compare_digest(presented, k.get_secret_value().encode()) for k in keys):
        raise Unauthorized("Incorrect API key provided")


Authorized = Depends(require_api_key)
