"""The alert rules' kinds and their parameters, validated: what an admin can tune.

Each kind has one frozen pydantic model of parameters with a default for every field,
so a rule without an admin's row in ``alert_rules`` runs on its defaults, and a row
holds only the fields the admin set (:func:`effective`): a default changed later (in
the settings, for ``group_degraded``) still reaches every field nobody overrode.
A value out of range is refused with :class:`fleet.errors.InvalidInput` naming
``params.<field>``.

``group_degraded``'s defaults are the ``degraded_alert_*`` settings
(:func:`defaults_of`); every other default is a constant here.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.config import FleetSettings
from fleet.errors import InvalidInput, NotFound

__all__ = [
    "EVENT_KINDS",
    "DeviceOfflineParams",
    "GroupDegradedParams",
    "Params",
    "RolloutFailedParams",
    "RuleKind",
    "SpoolDroppedParams",
    "TufExpiryParams",
    "defaults_of",
    "effective",
    "kind_of",
]


class RuleKind(StrEnum):
    """The alert rules; each is also the ``kind`` of the alerts it raises."""

    DEVICE_OFFLINE = "device_offline"
    GROUP_DEGRADED = "group_degraded"
    ROLLOUT_FAILED = "rollout_failed"
    TUF_EXPIRY = "tuf_expiry"
    SPOOL_DROPPED = "spool_dropped"


# Events stay open until an admin acknowledges them; every other kind is a condition,
# open while it holds (an acknowledgement is recorded, the alert stays open).
EVENT_KINDS = frozenset({RuleKind.ROLLOUT_FAILED})


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeviceOfflineParams(_Params):
    """A device not revoked, offline and not seen for more than ``minutes``."""

    minutes: float = Field(default=15.0, gt=0, le=525_600)  # minutes since last seen


class GroupDegradedParams(_Params):
    """A group's degraded share (``fleet.degraded.rules``); defaults: the settings."""

    share: float = Field(default=0.2, gt=0, le=1)  # degraded devices over devices that count
    min_devices: int = Field(default=2, ge=1)  # at least this many degraded
    seen_within_s: float = Field(default=300.0, gt=0)  # an offline device counts this long


class RolloutFailedParams(_Params):
    """A rollout aborted (by its rules or an admin), or a stage's gate check failing."""

    gate_failures: bool = True  # False: only aborts raise
    lookback_hours: float = Field(default=24.0, gt=0, le=720)  # events older are not raised


class TufExpiryParams(_Params):
    """A TUF role's metadata expiring within so many days (fractions allowed).

    The controller re-signs online roles at half their lifetime (365, 90, 7 and 1 days
    by default), so an expiry nearer than these means renewals are failing, or the
    keys of root or targets are offline and an admin must sign.
    """

    root_days: float = Field(default=30.0, ge=0, le=3650)
    targets_days: float = Field(default=30.0, ge=0, le=3650)
    snapshot_days: float = Field(default=2.0, ge=0, le=3650)
    timestamp_days: float = Field(default=0.25, ge=0, le=3650)  # six hours

    def days(self, role: str) -> float | None:
        """The threshold of a top-level role, None for any other name."""
        value = getattr(self, f"{role}_days", None)
        return value if isinstance(value, float) else None


class SpoolDroppedParams(_Params):
    """A device's agent reporting telemetry samples its spool dropped, recently."""

    window_minutes: float = Field(default=60.0, gt=0, le=10_080)  # drops this recent count
    min_samples: int = Field(default=1, ge=1)  # dropped in the window, at least


Params = (
    DeviceOfflineParams
    | GroupDegradedParams
    | RolloutFailedParams
    | TufExpiryParams
    | SpoolDroppedParams
)

_MODELS: dict[RuleKind, type[_Params]] = {
    RuleKind.DEVICE_OFFLINE: DeviceOfflineParams,
    RuleKind.GROUP_DEGRADED: GroupDegradedParams,
    RuleKind.ROLLOUT_FAILED: RolloutFailedParams,
    RuleKind.TUF_EXPIRY: TufExpiryParams,
    RuleKind.SPOOL_DROPPED: SpoolDroppedParams,
}


def kind_of(name: str) -> RuleKind:
    """The rule kind called ``name``; ``NotFound`` naming the known kinds otherwise."""
    try:
        return RuleKind(name)
    except ValueError:
        known = ", ".join(k.value for k in RuleKind)
        raise NotFound(f"no alert rule {name!r} (the rules: {known})") from None


def defaults_of(settings: FleetSettings) -> dict[RuleKind, Params]:
    """Every kind's default parameters under these settings."""
    return {
        RuleKind.DEVICE_OFFLINE: DeviceOfflineParams(),
        RuleKind.GROUP_DEGRADED: GroupDegradedParams(
            share=settings.degraded_alert_share,
            min_devices=settings.degraded_alert_min_devices,
            seen_within_s=settings.degraded_alert_seen_within_s,
        ),
        RuleKind.ROLLOUT_FAILED: RolloutFailedParams(),
        RuleKind.TUF_EXPIRY: TufExpiryParams(),
        RuleKind.SPOOL_DROPPED: SpoolDroppedParams(),
    }


def effective(kind: RuleKind, default: Params, overrides: Mapping[str, Any]) -> Params:
    """``default`` with an admin's ``overrides``, validated.

    Raises ``InvalidInput`` naming ``params.<field>``: an unknown field, or a value of
    the wrong type or out of range.
    """
    model = _MODELS[kind]
    try:
        params = model.model_validate({**default.model_dump(), **overrides})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = "not a parameter of this rule" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidInput(msg, field=f"params.{where}" if where else "params") from None
    return cast(Params, params)
