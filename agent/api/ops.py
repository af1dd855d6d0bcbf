"""Liveness, readiness, metrics, what the device probe found and the fleet link's status."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from agent.api.deps import Authorized, StateDep
from models.policy import FailureKind

__all__ = ["router"]

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Alive: the process answers. Says nothing about models."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: StateDep) -> JSONResponse:
    """Ready once every configured model is loaded; 503 with the reason until then.

    "degraded" (200) means the agent answers, but some model's answers come from its
    fallback chain: its breaker is open, or it failed to load and has a chain.
    """
    loading, failed = state.registry.waiting()
    body: dict[str, Any] = {"models": state.registry.names()}
    covered = {name: why for name, why in failed.items() if state.degraded.chain(name)}
    uncovered = {name: why for name, why in failed.items() if name not in covered}
    if loading or uncovered:
        body.update(
            status="failed" if failed and not loading else "loading", loading=loading, failed=failed
        )
        return JSONResponse(body, status_code=503)
    degraded = [
        {"model": d.name, "breaker": d.breaker.value, "kind": d.kind.value, "reason": d.reason}
        for d in state.degraded.degraded()
        if d.name not in covered
    ]
    degraded += [
        {
            "model": name,
            "breaker": "open",
            "kind": (state.registry.failure(name) or FailureKind.LOAD_FAILED).value,
            "reason": why,
        }
        for name, why in sorted(covered.items())
    ]
    if degraded:
        body.update(status="degraded", degraded=degraded)
        return JSONResponse(body)
    body["status"] = "ready"
    return JSONResponse(body)


@router.get("/metrics", dependencies=[Authorized])
def metrics(state: StateDep) -> Response:
    data, content_type = state.metrics.render()
    return Response(content=data, media_type=content_type)


@router.get("/v1/device", dependencies=[Authorized])
def device(state: StateDep) -> dict[str, Any]:
    """The capability probe, plus where each loaded model actually runs."""
    models = [
        {
            "name": m.manifest.name,
            "version": m.manifest.version,
            "format": m.manifest.format.value,
            "runtime": m.info.runtime,
            "runtime_version": m.info.runtime_version,
            "device": m.info.device,
            "provider": m.info.provider,
            "gpu_layers": m.info.gpu_layers,
            "load_seconds": round(m.info.load_seconds, 3),
            "memory_bytes": m.info.memory_bytes,
            "details": dict(m.info.details),
        }
        for m in state.registry.models()
    ]
    return {"device": state.device.model_dump(mode="json"), "models": models}


@router.get("/v1/fleet", dependencies=[Authorized])
def fleet(state: StateDep) -> dict[str, Any]:
    """The fleet link: enrolled, connected, the spool's backlog, the desired state acted on."""
    if state.fleet is None:
        return {"enabled": False, "state": "disabled", "enrolled": False, "connected": False}
    return state.fleet.status()
