"""The reported state: what the device actually runs, built by a pure function.

:func:`build_report` takes plain values (the served models, what is loading, failed
or missing, the desired state acted on) and returns the wire message; the link
publishes it only when it differs from the last one the broker acknowledged
(:func:`report_key`), so a quiet device sends nothing.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from agent.runtime.base import ServedModel
from models.device import DeviceReport
from models.policy import PolicyRef
from models.wire import (
    DegradedModel,
    DesiredState,
    ModelState,
    ReportedModel,
    ReportedState,
    runs_wanted,
)

__all__ = ["agent_version", "build_report", "report_key"]

_MAX_MODELS = 64  # ReportedState.models' cap on the wire
_MAX_ERROR = 2000


@functools.cache
def agent_version() -> str:
    try:
        return importlib.metadata.version("edgefleet")[:64]
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _error(text: str) -> str:
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 1] + "…"


def build_report(
    *,
    device_id: str,
    desired: DesiredState | None,
    served: Sequence[ServedModel],
    loading: Sequence[str],
    failed: Mapping[str, str],
    missing: Mapping[str, str],
    agent_version: str,
    device: DeviceReport | None,
    now: datetime,
    policy: PolicyRef | None = None,
    degraded: Sequence[DegradedModel] = (),
) -> ReportedState:
    """One entry per model that is served, loading, failed or missing, sorted by name.

    A desired model missing from the store is MISSING even when an older copy of it
    still serves (the error says so); a served model is READY; a failed one FAILED.
    ``converged`` holds when every desired model (or, without a desired state, every
    configured one) is ready at the wanted version and nothing else is served.
    """
    by_name = {m.manifest.name: m for m in served}
    names = sorted(set(by_name) | set(loading) | set(failed) | set(missing))
    models: list[ReportedModel] = []
    for name in names:
        model = by_name.get(name)
        fields: dict[str, Any] = {"name": name}
        if model is not None:
            fields.update(
                version=model.manifest.version,
                sha256=model.manifest.sha256,
                runtime=model.info.runtime,
                device=model.info.device,
                memory_bytes=model.info.memory_bytes,
            )
        if name in missing:
            fields.update(state=ModelState.MISSING, error=_error(missing[name]))
        elif model is not None:
            fields["state"] = ModelState.READY
        elif name in failed:
            fields.update(state=ModelState.FAILED, error=_error(failed[name]))
        else:
            fields["state"] = ModelState.LOADING
        models.append(ReportedModel(**fields))
    ready = {m.name: m for m in models if m.state is ModelState.READY}
    if desired is None:
        converged = all(m.state is ModelState.READY for m in models)
    else:
        converged = set(ready) == {d.name for d in desired.models} and all(
            runs_wanted(d, ready[d.name]) for d in desired.models
        )
    return ReportedState(
        device_id=device_id,
        desired_version=desired.version if desired is not None else None,
        converged=converged,
        models=models[:_MAX_MODELS],
        agent_version=agent_version,
        device=device,
        policy=policy,
        degraded=list(degraded)[:_MAX_MODELS],
        reported_at=now,
    )


def report_key(report: ReportedState) -> str:
    """What makes two reports different: everything but the time they were made."""
    return report.model_dump_json(exclude={"reported_at"})
