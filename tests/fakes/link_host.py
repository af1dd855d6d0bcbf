"""Fakes of what the link needs from the rest of the agent (:mod:`agent.link.fleet`).

:class:`FakeHost` stands for ``LinkHost`` (the model executor and its report: the
real one is :class:`agent.state.apply.ModelController`, tested in test_apply.py);
:class:`FakeTelemetry` for ``TelemetryReader`` (the request window and gauges).
"""

from __future__ import annotations

from typing import Any

from agent.link.telemetry import Gauges
from agent.metrics import WindowStats
from models.wire import DesiredState, ReportedState

__all__ = ["FakeHost", "FakeTelemetry"]


class FakeHost:
    """Records what the link asks of the executor; reports what it was told."""

    def __init__(self) -> None:
        self.desired: DesiredState | None = None
        self.applied: list[int] = []
        self.reconciles = 0

    @property
    def desired_version(self) -> int | None:
        return self.desired.version if self.desired else None

    async def apply_desired(self, desired: DesiredState) -> list[Any]:
        self.applied.append(desired.version)
        self.desired = desired
        return []

    async def reconcile(self) -> list[Any]:
        self.reconciles += 1
        return []

    def attach_updates(self, source: Any, emit: Any) -> None:
        self.source = source

    def report(self, device_id: str) -> ReportedState:
        return ReportedState(
            device_id=device_id,
            desired_version=self.desired_version,
            converged=True,
            agent_version="test",
        )


class FakeTelemetry:
    """Each window reports one more request than the last, so samples are tellable apart."""

    def __init__(self) -> None:
        self.windows = 0

    def read(self) -> tuple[WindowStats, Gauges]:
        self.windows += 1
        return WindowStats(1.0, self.windows, 0, 0, 0, (0.01,), ()), Gauges(queue_depth=1)
