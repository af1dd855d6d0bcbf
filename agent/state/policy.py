"""Which fallback policy the device enforces: the fleet's, else the local config's.

A policy arrives inside a desired state the link has already verified (signed by the
director key, for this device, newer than the last one), so what is left to check
here is its content. A malformed one is refused with a ``policy_rejected`` event and
the last good policy stays; an accepted one is saved (``<state_dir>/policy.json``)
so a restart without the broker enforces it again. A desired state with no policy
(the fleet unassigned it) returns the device to its configured policy, if any.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.files import atomic_write, ensure_private_dir
from agent.serving.degraded import DegradedMode, PolicyRejected, parse_policy
from models.policy import FallbackPolicy
from models.wire import DesiredState, EventKind, Severity

__all__ = ["PolicyKeeper"]

log = logging.getLogger(__name__)

Emit = Callable[[EventKind, str, Severity, dict[str, Any]], None]


class PolicyKeeper:
    """Chooses, saves and announces the policy :class:`DegradedMode` enforces."""

    def __init__(
        self, mode: DegradedMode, local: FallbackPolicy | None, saved: Path | None = None
    ) -> None:
        self.mode = mode
        self.local = local
        self.saved = saved
        self.emit: Emit | None = None  # the fleet link sets it

    def start(self, desired: DesiredState | None) -> None:
        """At start-up: the saved fleet policy if the saved desired state has one, else local."""
        fleet = self._load_saved() if desired is not None and desired.fallback else None
        if fleet is None and desired is not None:
            try:  # policy.json lost: the saved desired state was verified when it came
                fleet = parse_policy(desired.fallback)
            except PolicyRejected:
                fleet = None
        if fleet is not None:
            self.mode.set_policy(fleet, "the saved state")
        else:
            self.mode.set_policy(self.local, "the configuration")

    def apply(self, desired: DesiredState) -> None:
        """Enforce the policy of a verified desired state, or refuse it and keep the last."""
        source = f"desired state {desired.version}"
        try:
            policy = parse_policy(desired.fallback)
        except PolicyRejected as exc:
            current = self.mode.ref()
            kept = f"{current.name} v{current.version}" if current else "no policy"
            log.error("%s: %s; keeping %s", source, exc.message, kept)
            self._emit(
                EventKind.POLICY_REJECTED,
                f"{exc.message}; keeping {kept}",
                Severity.ERROR,
                {"reason": exc.message, "desired_version": desired.version},
            )
            return
        before = self.mode.ref()
        if policy is None:
            self.mode.set_policy(self.local, f"the configuration ({source} has none)")
            self._forget()
        else:
            self.mode.set_policy(policy, source)
            self._save(policy)
        after = self.mode.ref()
        if after is not None and after != before:
            self._emit(
                EventKind.POLICY_APPLIED,
                f"enforcing fallback policy {after.name} v{after.version}",
                Severity.INFO,
                after.model_dump(mode="json"),
            )

    def _emit(
        self, kind: EventKind, message: str, severity: Severity, data: dict[str, Any]
    ) -> None:
        if self.emit is not None:
            self.emit(kind, message, severity, data)

    def _load_saved(self) -> FallbackPolicy | None:
        if self.saved is None:
            return None
        try:
            return FallbackPolicy.model_validate_json(self.saved.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.error("ignoring %s: %s", self.saved, exc)
            return None

    def _save(self, policy: FallbackPolicy) -> None:
        if self.saved is None:
            return
        try:
            ensure_private_dir(self.saved.parent)
            atomic_write(self.saved, policy.model_dump_json(indent=2).encode())
        except OSError as exc:
            log.error("cannot save the fallback policy in %s: %s", self.saved, exc)

    def _forget(self) -> None:
        if self.saved is not None:
            self.saved.unlink(missing_ok=True)
