"""What a reconcile's outcomes tell the fleet: one event for each thing that happened.

The controller's rollout gates and abort rules count events, so an event that says a
model failed while it still serves would count a healthy device as failed. Each step
of a reconcile (:class:`agent.state.apply.Outcome`) is therefore reported at most once,
by whoever knows what it meant:

- ``update``: a signed target. The updater has already sent its one event
  (``update_healthy``, ``update_failed`` or ``update_rolled_back``, with the model,
  the version it was installing and the target's sha256); nothing is added here.
- ``load``: a model that was not served. Done, ``model_ready``; failed, ``model_failed``:
  the one case where a model really does not serve (nothing to fall back to).
- ``swap``: a served model replaced by another version or runtime. Done,
  ``model_ready``; failed, the previous model still serves, so it is the update of the
  served model that failed: ``update_failed`` (phase ``load``), never ``model_failed``.
- ``unload``: nothing; the report says what is served.

:func:`outcome_events` is pure; the link sends what it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from models.wire import EventKind, Severity

__all__ = ["OutcomeEvent", "ReconcileOutcome", "outcome_events"]


class ReconcileOutcome(Protocol):
    """One step of a reconcile, as :class:`agent.state.apply.Outcome` describes it."""

    @property
    def name(self) -> str: ...

    @property
    def action(self) -> str: ...  # "load", "swap", "unload", "update"

    @property
    def error(self) -> str | None: ...

    @property
    def retry(self) -> bool: ...

    @property
    def version(self) -> str | None: ...  # what the step served, or tried to

    @property
    def sha256(self) -> str | None: ...


@dataclass(frozen=True)
class OutcomeEvent:
    """An event to send, as :meth:`agent.link.fleet.FleetLink.emit` takes it."""

    kind: EventKind
    message: str
    severity: Severity = Severity.INFO
    data: dict[str, Any] = field(default_factory=dict)


def outcome_events(outcomes: Sequence[ReconcileOutcome]) -> list[OutcomeEvent]:
    """The events a reconcile's outcomes call for, in order; see the module docstring."""
    events: list[OutcomeEvent] = []
    for outcome in outcomes:
        if outcome.action in ("update", "unload"):
            continue
        data: dict[str, Any] = {"model": outcome.name, "action": outcome.action}
        if outcome.version is not None:
            data["version"] = outcome.version
        if outcome.sha256 is not None:
            data["sha256"] = outcome.sha256
        if outcome.error is None:
            events.append(
                OutcomeEvent(
                    EventKind.MODEL_READY, f"{outcome.name} ready ({outcome.action})", data=data
                )
            )
        elif outcome.action == "swap":
            events.append(
                OutcomeEvent(
                    EventKind.UPDATE_FAILED,
                    f"{outcome.name}: the new version does not load: {outcome.error}; "
                    "the previous one serves",
                    Severity.ERROR,
                    {**data, "phase": "load", "reason": outcome.error, "retry": outcome.retry},
                )
            )
        else:
            events.append(
                OutcomeEvent(
                    EventKind.MODEL_FAILED,
                    f"{outcome.name}: {outcome.error}",
                    Severity.ERROR,
                    {**data, "reason": outcome.error},
                )
            )
    return events
