"""Fault injection for drills and tests: set, list and clear faults on served models.

Mounted only when the operator sets ``fault_injection``; never in production. Every
change is logged as a warning. See :mod:`agent.serving.faults` for what a fault does.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from starlette.exceptions import HTTPException

from agent.api.deps import Authorized, StateDep
from agent.errors import ModelNotFound
from agent.serving.faults import Fault, FaultInjector

__all__ = ["router"]

router = APIRouter(prefix="/v1/faults", tags=["faults"], dependencies=[Authorized])


def get_injector(state: StateDep) -> FaultInjector:
    """The app's injector; 404 when fault injection is off."""
    faults = state.faults
    if faults is None:
        raise HTTPException(status_code=404, detail="fault injection is disabled")
    return faults


InjectorDep = Annotated[FaultInjector, Depends(get_injector)]


@router.get("")
def list_faults(faults: InjectorDep) -> dict[str, Fault]:
    """Every fault set, by model name."""
    return faults.all()


@router.put("/{model}")
def set_fault(model: str, fault: Fault, faults: InjectorDep, state: StateDep) -> Fault:
    """Set (or replace) the fault on a served, loading or failed model."""
    loading, failed = state.registry.waiting()
    if model not in state.registry.names() and model not in loading and model not in failed:
        raise ModelNotFound(f"The model {model!r} does not exist", param="model")
    faults.set(model, fault)
    return fault


@router.delete("/{model}", status_code=204)
def clear_fault(model: str, faults: InjectorDep) -> Response:
    """Clear a model's fault; 404 if it has none."""
    if not faults.clear(model):
        raise HTTPException(status_code=404, detail=f"no fault is set on model {model!r}")
    return Response(status_code=204)
