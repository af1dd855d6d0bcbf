"""First-boot progress: which step the agent is on, and why it is stuck, in ``boot.json``.

A device flashed with a provisioned image walks these steps, in order::

    provisioned ─► device_key ─► enrolled ─► desired_state ─► models ─► serving

Each step is *pending*, *active*, *done*, *failed* or *skipped* (no fleet configured:
the fleet steps do not apply), with what it is doing or did, the error of its last try
and when it last changed. ``models`` also carries one model's progress (loading,
downloading with bytes, verifying, installing, health check). Steps move independently:
a device whose controller is unreachable still loads and serves its baked-in models, so
``serving`` can be done while ``enrolled`` is still retrying. The *current* step is the
first one not done; ``edgefleet-agent status`` shows it with its reason.

The decisions are pure: :class:`BootStatus` is frozen and every transition
(:func:`start`, :func:`finish`, :func:`trouble`, :func:`skip`, :func:`settle_models`,
:func:`model_event`) returns a new one. :class:`BootRecorder` is the thin shell: it
keeps the latest status, rewrites ``<state_dir>/boot.json`` atomically on each change
(not fsynced: it is a progress report, rewritten often) and tells its listeners (the
systemd ``STATUS=`` line). Without a path it only keeps the status in memory.

Nothing secret goes in: no token, no password; only URLs, names and error messages.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from agent.files import atomic_write

__all__ = [
    "BOOT_FILE",
    "LABELS",
    "BootRecorder",
    "BootStatus",
    "ModelProgress",
    "Phase",
    "Step",
    "StepState",
    "StepStatus",
    "current_step",
    "finish",
    "fresh",
    "load_status",
    "model_event",
    "settle_models",
    "skip",
    "start",
    "stuck_reason",
    "summary",
    "trouble",
]

log = logging.getLogger(__name__)

BOOT_FILE: Final = "boot.json"
_MAX_TEXT: Final = 1000  # characters of a reason kept; the log has the rest


class Step(StrEnum):
    """The first-boot steps, in the order a device goes through them."""

    PROVISIONED = "provisioned"  # a fleet URL and token (or an identity) are configured
    DEVICE_KEY = "device_key"  # the device's Ed25519 key exists
    ENROLLED = "enrolled"  # the controller gave this device an identity
    DESIRED_STATE = "desired_state"  # a verified desired state arrived (or was saved)
    MODELS = "models"  # the models to serve are installed and loaded
    SERVING = "serving"  # the local API answers


LABELS: Final[Mapping[Step, str]] = {
    Step.PROVISIONED: "provisioned",
    Step.DEVICE_KEY: "device key",
    Step.ENROLLED: "enrolled",
    Step.DESIRED_STATE: "desired state",
    Step.MODELS: "models",
    Step.SERVING: "serving",
}


class StepState(StrEnum):
    """Where one step stands."""

    PENDING = "pending"
    ACTIVE = "active"
    DONE = "done"
    FAILED = "failed"  # stopped: an operator must act (the reason says what)
    SKIPPED = "skipped"  # does not apply (no fleet configured)


Phase = Literal["loading", "downloading", "verifying", "installing", "health_check"]


class ModelProgress(BaseModel):
    """What one model is going through during the ``models`` step."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    model: str
    phase: Phase
    version: str | None = None
    done_bytes: int | None = Field(default=None, ge=0)  # downloaded so far
    total_bytes: int | None = Field(default=None, ge=0)  # the signed length

    @property
    def percent(self) -> int | None:
        if self.done_bytes is None or not self.total_bytes:
            return None
        return min(100, 100 * self.done_bytes // self.total_bytes)


class StepStatus(BaseModel):
    """One step: its state, what it is doing or did, the last try's error, when it moved."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state: StepState = StepState.PENDING
    detail: str | None = None  # what it is doing, or what it did
    error: str | None = None  # why the last try failed (active: retrying; failed: stopped)
    at: AwareDatetime | None = None  # when the step last changed
    progress: ModelProgress | None = None  # models only


class BootStatus(BaseModel):
    """The whole first-boot picture, as ``boot.json`` holds it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: Literal[1] = 1
    started_at: AwareDatetime  # when this run of the agent started
    pid: int | None = None  # the agent process that writes the file
    steps: dict[Step, StepStatus] = Field(default_factory=dict)
    last_error: str | None = None
    last_error_at: AwareDatetime | None = None
    updated_at: AwareDatetime | None = None

    def step(self, step: Step) -> StepStatus:
        return self.steps.get(step, StepStatus())


# --- pure transitions -----------------------------------------------------------------------


def _clip(text: str | None) -> str | None:
    if text is None:
        return None
    text = " ".join(text.split())  # one line: the STATUS= line and the table need that
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def fresh(now: datetime, pid: int | None = None) -> BootStatus:
    """A new run: every step pending."""
    return BootStatus(
        started_at=now, pid=pid, steps={s: StepStatus() for s in Step}, updated_at=now
    )


def _put(status: BootStatus, step: Step, value: StepStatus, now: datetime) -> BootStatus:
    return status.model_copy(update={"steps": {**status.steps, step: value}, "updated_at": now})


def start(
    status: BootStatus,
    step: Step,
    now: datetime,
    detail: str | None = None,
    progress: ModelProgress | None = None,
) -> BootStatus:
    """``step`` is under way (again): its last error is kept until it ends."""
    old = status.step(step)
    value = StepStatus(
        state=StepState.ACTIVE,
        detail=_clip(detail),
        error=old.error if old.state is StepState.ACTIVE else None,
        at=now,
        progress=progress,
    )
    return _put(status, step, value, now)


def finish(status: BootStatus, step: Step, now: datetime, detail: str | None = None) -> BootStatus:
    """``step`` is done; its error and progress are cleared."""
    return _put(status, step, StepStatus(state=StepState.DONE, detail=_clip(detail), at=now), now)


def skip(status: BootStatus, step: Step, now: datetime, detail: str) -> BootStatus:
    return _put(
        status, step, StepStatus(state=StepState.SKIPPED, detail=_clip(detail), at=now), now
    )


def trouble(
    status: BootStatus, step: Step, error: str, now: datetime, *, final: bool
) -> BootStatus:
    """Something went wrong with ``step``: it becomes the last error.

    ``final``: nothing will try again until an operator acts (a refused token), so the
    step fails; otherwise it stays active with the error (retrying). A step already done
    stays done (a broker lost after the desired state arrived): only ``last_error`` says so.
    """
    error = _clip(error) or "unknown error"
    updated = status.model_copy(update={"last_error": error, "last_error_at": now})
    old = status.step(step)
    if old.state is StepState.DONE:
        return updated.model_copy(update={"updated_at": now})
    value = StepStatus(
        state=StepState.FAILED if final else StepState.ACTIVE,
        detail=old.detail,
        error=error,
        at=now,
        progress=None if final else old.progress,
    )
    return _put(updated, step, value, now)


def settle_models(
    status: BootStatus,
    now: datetime,
    *,
    serving: Sequence[str],
    failed: Mapping[str, str],
    retrying: Mapping[str, str],
    waiting: Mapping[str, str],
) -> BootStatus:
    """The ``models`` step after a reconcile: failed, retrying, waiting, or done.

    ``failed``: models that will not serve until an operator acts (a load failure, a
    refused update); ``retrying``: updates that failed for a passing reason; ``waiting``:
    models the desired state names that are not installed yet.
    """
    if failed:
        problems = "; ".join(f"{name}: {why}" for name, why in sorted(failed.items()))
        return trouble(
            _reopen(status, now), Step.MODELS, f"not serving {problems}", now, final=True
        )
    if retrying:
        problems = "; ".join(f"{name}: {why}" for name, why in sorted(retrying.items()))
        return trouble(_reopen(status, now), Step.MODELS, f"retrying {problems}", now, final=False)
    if waiting:
        names = ", ".join(sorted(waiting))
        why = "; ".join(f"{name}: {reason}" for name, reason in sorted(waiting.items()))
        return start(status, Step.MODELS, now, f"waiting for {names} ({why})")
    detail = f"serving {', '.join(sorted(serving))}" if serving else "no models to serve"
    return finish(status, Step.MODELS, now, detail)


def _reopen(status: BootStatus, now: datetime) -> BootStatus:
    """Make ``models`` not-done, so that :func:`trouble` marks it (models can regress)."""
    if status.step(Step.MODELS).state is StepState.DONE:
        return start(status, Step.MODELS, now, status.step(Step.MODELS).detail)
    return status


# the update events (models.wire.EventKind values) that move the models step
_EVENT_PHASES: Final[Mapping[str, Phase]] = {
    "update_verified": "installing",
    "update_installed": "health_check",
}
_EVENT_TROUBLE: Final = frozenset({"update_failed", "update_rolled_back"})


def model_event(
    status: BootStatus, kind: str, message: str, data: Mapping[str, Any], now: datetime
) -> BootStatus:
    """Follow an update event (:mod:`agent.update.updater`) in the ``models`` step.

    Progress says downloading, then verifying at the last byte (the hash is checked as
    the file ends); verified means installing; installed means the health check runs. A
    failure is kept as the step's error; the reconcile's end decides whether it is final.
    """
    model = str(data.get("model") or "?")
    version = str(data["version"]) if data.get("version") is not None else None
    if kind == "update_progress":
        done, total = _int(data.get("bytes")), _int(data.get("total"))
        at_end = bool(total) and done is not None and total is not None and done >= total
        phase: Phase = "verifying" if at_end else "downloading"
        progress = ModelProgress(
            model=model, phase=phase, version=version, done_bytes=done, total_bytes=total
        )
        return start(status, Step.MODELS, now, f"{phase} {model} {version or ''}".strip(), progress)
    if kind in _EVENT_PHASES:
        phase = _EVENT_PHASES[kind]
        progress = ModelProgress(model=model, phase=phase, version=version)
        what = "health check of" if phase == "health_check" else phase
        return start(status, Step.MODELS, now, f"{what} {model} {version or ''}".strip(), progress)
    if kind in _EVENT_TROUBLE:
        return trouble(_reopen(status, now), Step.MODELS, message, now, final=False)
    return status


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and value >= 0 else None


# --- pure readings --------------------------------------------------------------------------


def current_step(status: BootStatus) -> Step | None:
    """The first step not done or skipped; None when every step is."""
    for step in Step:
        if status.step(step).state not in (StepState.DONE, StepState.SKIPPED):
            return step
    return None


def stuck_reason(status: BootStatus) -> str | None:
    """Why the current step has not finished: its error, or what it waits for."""
    step = current_step(status)
    if step is None:
        return None
    value = status.step(step)
    if value.error is not None:
        return value.error
    if value.state is StepState.PENDING:
        return "not started yet"
    return value.detail


def summary(status: BootStatus) -> str:
    """One line for systemd's ``STATUS=``: the current step and its reason, or serving."""
    step = current_step(status)
    if step is None:
        return status.step(Step.MODELS).detail or "serving"
    value = status.step(step)
    text = f"{LABELS[step]}: {value.state.value}"
    reason = stuck_reason(status)
    if reason:
        text += f": {reason}"
    progress = value.progress
    if progress is not None and progress.percent is not None:
        text += f" ({progress.percent}%)"
    if step is not Step.SERVING and status.step(Step.SERVING).state is StepState.DONE:
        text = "serving; " + text
    return text


def load_status(data: bytes) -> BootStatus | None:
    """``boot.json``'s contents, or None if they are not a boot status."""
    try:
        return BootStatus.model_validate_json(data)
    except ValidationError:
        return None


# --- the shell ------------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


class BootRecorder:
    """Keeps the current :class:`BootStatus` and writes each change to ``path``.

    Thread-safe (the CLI, the event loop and worker threads all report steps). A failed
    write is logged once and never raised: reporting progress must not stop progress.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        clock: Callable[[], datetime] = _utc_now,
        pid: int | None = None,
    ) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.RLock()  # a listener may read .status
        self._status = fresh(clock(), pid if pid is not None else os.getpid())
        self._write_failed = False
        self.listeners: list[Callable[[BootStatus], None]] = []

    @classmethod
    def in_dir(cls, state_dir: Path) -> BootRecorder:
        return cls(state_dir.expanduser() / BOOT_FILE)

    @property
    def status(self) -> BootStatus:
        with self._lock:
            return self._status

    def apply(self, change: Callable[[BootStatus, datetime], BootStatus]) -> BootStatus:
        """Apply one pure transition, then persist and announce the result."""
        with self._lock:  # listeners too: they hear the changes in the order they happened
            before = self._status
            after = change(before, self._clock())
            if after is before:
                return after
            self._status = after
            self._write(after)
            for listener in list(self.listeners):
                try:
                    listener(after)
                except Exception:  # a listener's bug must not stop the step it reports
                    log.exception("boot status listener failed")
        return after

    # conveniences for the call sites, each one pure transition

    def start(
        self, step: Step, detail: str | None = None, progress: ModelProgress | None = None
    ) -> None:
        self.apply(lambda s, now: start(s, step, now, detail, progress))

    def finish(self, step: Step, detail: str | None = None) -> None:
        self.apply(lambda s, now: finish(s, step, now, detail))

    def skip(self, step: Step, detail: str) -> None:
        self.apply(lambda s, now: skip(s, step, now, detail))

    def trouble(self, step: Step, error: str, *, final: bool) -> None:
        self.apply(lambda s, now: trouble(s, step, error, now, final=final))

    def is_done(self, step: Step) -> bool:
        return self.status.step(step).state is StepState.DONE

    def _write(self, status: BootStatus) -> None:
        if self.path is None:
            return
        try:
            data = status.model_dump_json(indent=2, exclude_none=True).encode()
            atomic_write(self.path, data + b"\n", mode=0o644, durable=False)
        except OSError as exc:
            if not self._write_failed:
                log.warning("cannot write the boot status %s: %s", self.path, exc)
            self._write_failed = True
        else:
            self._write_failed = False
