"""Drift: how far a device's reported state is from its desired state. Pure.

The controller never drives a device step by step; it only compares what it asked
for with what the device says it runs. This module is that comparison, with no
database and no clock, so the API, the CLI, the dashboard and the rollout gates all
read one answer, and the tests can enumerate every case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from models.wire import (
    DesiredModel,
    DesiredState,
    ModelState,
    ReportedModel,
    ReportedState,
    runs_wanted,
)

__all__ = ["Drift", "DriftItem", "DriftKind", "compute_drift"]


class DriftKind(StrEnum):
    """The ways a device can differ from what it should run."""

    NO_REPORT = "no_report"  # a desired state exists, but the device never reported
    NOT_APPLIED = "not_applied"  # the device has not yet acted on the latest desired version
    MISSING = "missing"  # a desired model the device does not run (or lacks in its store)
    VERSION_MISMATCH = "version_mismatch"  # runs the model, but not the desired version
    LOADING = "loading"  # the desired model is still loading
    FAILED = "failed"  # the desired model failed to load
    EXTRA = "extra"  # the device runs a model that is not desired


@dataclass(frozen=True)
class DriftItem:
    """One difference, with a sentence an operator can act on."""

    kind: DriftKind
    message: str
    model: str | None = None
    desired: str | None = None  # the desired version (or desired_version, as text)
    actual: str | None = None  # what the device reports instead


@dataclass(frozen=True)
class Drift:
    """``managed`` is False when no desired state was ever set: nothing to drift from."""

    managed: bool
    items: list[DriftItem] = field(default_factory=list)

    @property
    def in_sync(self) -> bool:
        return not self.items


def _model_drift(want: DesiredModel, got: ReportedModel) -> DriftItem | None:
    wanted_version, name = want.version, want.name
    if got.state is ModelState.MISSING:
        return DriftItem(
            DriftKind.MISSING, f"{name} is not in the device's model store", name, wanted_version
        )
    if not runs_wanted(want, got):
        return DriftItem(
            DriftKind.VERSION_MISMATCH,
            f"{name} runs version {got.version or 'unknown'}, {wanted_version} is desired",
            name,
            wanted_version,
            got.version,
        )
    if got.state is ModelState.FAILED:
        reason = f": {got.error}" if got.error else ""
        return DriftItem(
            DriftKind.FAILED, f"{name} failed to load{reason}", name, wanted_version, got.version
        )
    if got.state is ModelState.LOADING:
        return DriftItem(
            DriftKind.LOADING, f"{name} is still loading", name, wanted_version, got.version
        )
    return None


def compute_drift(desired: DesiredState | None, reported: ReportedState | None) -> Drift:
    """Every way ``reported`` differs from ``desired``; empty items mean in sync."""
    if desired is None:
        return Drift(managed=False)
    if reported is None:
        return Drift(
            True,
            [
                DriftItem(
                    DriftKind.NO_REPORT,
                    "the device has not reported its state yet",
                    desired=str(desired.version),
                )
            ],
        )
    items: list[DriftItem] = []
    applied = reported.desired_version
    if applied is None or applied < desired.version:
        items.append(
            DriftItem(
                DriftKind.NOT_APPLIED,
                f"the device runs desired version {applied or 'none'}, "
                f"{desired.version} is the latest",
                desired=str(desired.version),
                actual=None if applied is None else str(applied),
            )
        )
    running = {m.name: m for m in reported.models}
    for want in desired.models:
        got = running.get(want.name)
        if got is None:
            items.append(
                DriftItem(
                    DriftKind.MISSING,
                    f"{want.name} is desired but not running",
                    want.name,
                    want.version,
                )
            )
            continue
        item = _model_drift(want, got)
        if item is not None:
            items.append(item)
    wanted = {m.name for m in desired.models}
    for got in reported.models:
        if got.name not in wanted:
            items.append(
                DriftItem(
                    DriftKind.EXTRA,
                    f"{got.name} runs but is not desired",
                    got.name,
                    actual=got.version,
                )
            )
    return Drift(True, items)
