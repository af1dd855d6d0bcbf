"""The alert rules, purely: parameters, conditions, offline devices, TUF, spools, rollouts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from fleet.alerts import offline, rollouts, spool, tuf
from fleet.alerts.conditions import Finding, reconcile
from fleet.alerts.offline import DevicePresence
from fleet.alerts.params import (
    DeviceOfflineParams,
    GroupDegradedParams,
    RolloutFailedParams,
    RuleKind,
    SpoolDroppedParams,
    TufExpiryParams,
    defaults_of,
    effective,
    kind_of,
)
from fleet.alerts.rollouts import Abort, GateFailure, RolloutTrouble
from fleet.alerts.spool import DropReport
from fleet.config import FleetSettings
from fleet.degraded.rules import Clear, OpenAlert, Raise, Update
from fleet.errors import InvalidInput, NotFound
from models.wire import Severity

NOW = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)


def opened(*actions: Raise, first_id: int = 1) -> list[OpenAlert]:
    """The alerts ``actions`` would have written, as the next round reads them."""
    return [OpenAlert(first_id + i, a.subject, a.message, a.data) for i, a in enumerate(actions)]


def raises(actions: Sequence[object]) -> list[Raise]:
    assert all(isinstance(a, Raise) for a in actions), actions
    return [a for a in actions if isinstance(a, Raise)]


# --- parameters -----------------------------------------------------------------------------


def test_group_degraded_defaults_come_from_the_settings() -> None:
    settings = FleetSettings(
        degraded_alert_share=0.5, degraded_alert_min_devices=3, degraded_alert_seen_within_s=60
    )
    defaults = defaults_of(settings)
    assert defaults[RuleKind.GROUP_DEGRADED] == GroupDegradedParams(
        share=0.5, min_devices=3, seen_within_s=60.0
    )
    assert defaults[RuleKind.DEVICE_OFFLINE] == DeviceOfflineParams(minutes=15.0)
    assert defaults[RuleKind.TUF_EXPIRY] == TufExpiryParams(
        root_days=30, targets_days=30, snapshot_days=2, timestamp_days=0.25
    )
    assert set(defaults) == set(RuleKind)


def test_overrides_are_validated_over_the_defaults_and_name_the_field() -> None:
    default = GroupDegradedParams()
    assert effective(RuleKind.GROUP_DEGRADED, default, {"share": 0.5}) == GroupDegradedParams(
        share=0.5, min_devices=2, seen_within_s=300.0
    )
    assert effective(RuleKind.DEVICE_OFFLINE, DeviceOfflineParams(), {"minutes": "30"}) == (
        DeviceOfflineParams(minutes=30.0)
    )
    with pytest.raises(InvalidInput, match=r"invalid params\.share: .*less than or equal to 1"):
        effective(RuleKind.GROUP_DEGRADED, default, {"share": 1.5})
    with pytest.raises(InvalidInput) as caught:
        effective(RuleKind.GROUP_DEGRADED, default, {"shares": 0.5})
    assert (caught.value.field, str(caught.value)) == (
        "params.shares",
        "invalid params.shares: not a parameter of this rule",
    )
    with pytest.raises(InvalidInput) as caught:
        effective(RuleKind.DEVICE_OFFLINE, DeviceOfflineParams(), {"minutes": "soon"})
    assert caught.value.field == "params.minutes"
    with pytest.raises(InvalidInput) as caught:
        effective(RuleKind.SPOOL_DROPPED, SpoolDroppedParams(), {"min_samples": 0})
    assert caught.value.field == "params.min_samples"


def test_an_unknown_kind_is_not_found_and_lists_the_known_ones() -> None:
    assert kind_of("tuf_expiry") is RuleKind.TUF_EXPIRY
    with pytest.raises(
        NotFound, match=r"no alert rule 'disk_full'.*device_offline, group_degraded"
    ):
        kind_of("disk_full")


# --- conditions -----------------------------------------------------------------------------


def test_reconcile_raises_updates_and_clears_one_alert_per_subject() -> None:
    a, b = Finding("x:a", "a is bad", {"n": 1}), Finding("x:b", "b is bad", {"n": 2})
    first = reconcile([b, a], [], Severity.WARNING, lambda s: f"{s} is fine")
    assert first == [
        Raise("x:a", Severity.WARNING, "a is bad", {"n": 1}),
        Raise("x:b", Severity.WARNING, "b is bad", {"n": 2}),
    ]
    alerts = opened(*raises(first))
    assert reconcile([a, b], alerts, Severity.WARNING, lambda s: "") == []
    worse = Finding("x:a", "a is worse", {"n": 3})
    duplicate = OpenAlert(9, "x:b", "b is bad", {"n": 2})
    assert reconcile([worse], [*alerts, duplicate], Severity.WARNING, lambda s: f"{s} ok") == [
        Update(1, "x:a", "a is worse", {"n": 3}),
        Clear(2, "x:b", "x:b ok"),
        Clear(9, "x:b", "a duplicate of an older open alert"),
    ]


# --- device_offline -------------------------------------------------------------------------


def device(
    device_id: str = "dev-1",
    *,
    online: bool = False,
    seen_ago_min: float | None = 20,
    enrolled_ago_min: float = 600,
) -> DevicePresence:
    seen = NOW - timedelta(minutes=seen_ago_min) if seen_ago_min is not None else None
    return DevicePresence(
        device_id, "edge-1", "lab", online, seen, NOW - timedelta(minutes=enrolled_ago_min)
    )


def test_a_device_offline_longer_than_the_limit_raises_a_warning() -> None:
    params = DeviceOfflineParams(minutes=15)
    (alert,) = raises(offline.decide([device()], [], params, NOW))
    assert (alert.subject, alert.severity) == ("device:dev-1", Severity.WARNING)
    assert alert.message == (
        "edge-1 (dev-1) in group lab has been offline since 2031-05-06 06:48 UTC (more than 15 min)"
    )
    assert alert.data == {
        "device": "dev-1",
        "name": "edge-1",
        "group": "lab",
        "last_seen": (NOW - timedelta(minutes=20)).isoformat(),
        "minutes": 15.0,
    }
    assert offline.decide([device(seen_ago_min=14.9)], [], params, NOW) == []
    assert offline.decide([device(seen_ago_min=15)], [], params, NOW) == []  # more than 15
    assert offline.decide([device(online=True, seen_ago_min=60)], [], params, NOW) == []


def test_a_device_never_seen_counts_from_its_enrollment() -> None:
    params = DeviceOfflineParams(minutes=15)
    assert offline.decide([device(seen_ago_min=None, enrolled_ago_min=10)], [], params, NOW) == []
    (alert,) = raises(
        offline.decide([device(seen_ago_min=None, enrolled_ago_min=16)], [], params, NOW)
    )
    assert alert.data["last_seen"] is None
    assert "offline since 2031-05-06 06:52 UTC" in alert.message


def test_an_offline_alert_stays_put_as_time_passes_and_clears_when_the_device_is_back() -> None:
    params = DeviceOfflineParams(minutes=15)
    alerts = opened(*raises(offline.decide([device()], [], params, NOW)))
    later = NOW + timedelta(hours=3)
    assert offline.decide([device()], alerts, params, later) == []  # last seen as before
    assert offline.decide([device(online=True)], alerts, params, later) == [
        Clear(1, "device:dev-1", "edge-1 (dev-1) is online again")
    ]
    assert offline.decide([], alerts, params, later) == [
        Clear(1, "device:dev-1", "dev-1 is revoked or gone")
    ]
    longer = DeviceOfflineParams(minutes=60)  # the admin tolerates more: the alert goes
    assert offline.decide([device()], alerts, longer, NOW) == [
        Clear(1, "device:dev-1", "edge-1 (dev-1) was seen at 2031-05-06 06:48 UTC")
    ]


# --- tuf_expiry -----------------------------------------------------------------------------


def expiring(**hours: float) -> dict[str, datetime]:
    return {role: NOW + timedelta(hours=h) for role, h in hours.items()}


def test_each_role_has_its_own_threshold() -> None:
    params = TufExpiryParams()  # root 30 d, targets 30 d, snapshot 2 d, timestamp 6 h
    fine = expiring(root=31 * 24, targets=31 * 24, snapshot=49, timestamp=7)
    assert tuf.decide(fine, [], params, NOW) == []
    near = expiring(root=29 * 24, targets=31 * 24, snapshot=47, timestamp=5)
    found = raises(tuf.decide(near, [], params, NOW))
    assert [(a.subject, a.severity) for a in found] == [
        ("tuf:root", Severity.ERROR),
        ("tuf:snapshot", Severity.ERROR),
        ("tuf:timestamp", Severity.ERROR),
    ]
    assert found[2].message == (
        "TUF timestamp metadata expires at 2031-05-06 12:08 UTC, within 6 h; "
        "the controller re-signs it on its own: see why its renewal fails in its log"
    )
    assert found[0].message.startswith(
        "TUF root metadata expires at 2031-06-04 07:08 UTC, within 30 days; re-sign it"
    )
    assert found[2].data == {
        "role": "timestamp",
        "expires": (NOW + timedelta(hours=5)).isoformat(),
        "days": 0.25,
        "expired": False,
    }
    assert tuf.decide({"director": NOW}, [], params, NOW) == []  # not a metadata role


def test_expired_metadata_updates_the_alert_and_renewal_clears_it() -> None:
    params = TufExpiryParams(timestamp_days=0)  # 0: only once it has expired
    assert tuf.decide(expiring(timestamp=1), [], params, NOW) == []
    alerts = opened(*raises(tuf.decide(expiring(timestamp=-1), [], params, NOW)))
    assert alerts[0].message.startswith(
        "TUF timestamp metadata expired at 2031-05-06 06:08 UTC: devices refuse updates"
    )
    params = TufExpiryParams()
    (update,) = tuf.decide(expiring(timestamp=1), alerts, params, NOW)
    assert isinstance(update, Update)
    assert update.data["expired"] is False
    assert tuf.decide(expiring(timestamp=24), alerts, params, NOW) == [
        Clear(
            1,
            "tuf:timestamp",
            "TUF timestamp metadata was renewed: it expires at 2031-05-07 07:08 UTC",
        )
    ]


# --- spool_dropped --------------------------------------------------------------------------


def drops(
    minutes_ago: float, samples: int, events: int = 0, device_id: str = "dev-1"
) -> DropReport:
    return DropReport(device_id, NOW - timedelta(minutes=minutes_ago), samples, events)


def test_drops_in_the_window_raise_and_clear_once_they_stop() -> None:
    params = SpoolDroppedParams(window_minutes=60, min_samples=10)
    names, totals = {"dev-1": "edge-1"}, {"dev-1": 500}
    reports = [drops(90, 400), drops(30, 6, 2), drops(5, 4)]
    (alert,) = raises(spool.decide(reports, names, totals, [], params, NOW))
    assert (alert.subject, alert.severity) == ("device:dev-1", Severity.WARNING)
    assert alert.message == (
        "edge-1 (dev-1)'s telemetry spool dropped 10 samples and 2 events in the last 1 h "
        "(the latest reported at 2031-05-06 07:03 UTC); 500 samples since it enrolled"
    )
    assert (alert.data["samples"], alert.data["events"], alert.data["total"]) == (10, 2, 500)
    assert spool.decide(reports[:2], names, totals, [], params, NOW) == []  # 6 < 10 in the window

    alerts = opened(alert)
    assert spool.decide(reports, names, totals, alerts, params, NOW) == []
    (update,) = spool.decide([*reports, drops(0, 3)], names, totals, alerts, params, NOW)
    assert isinstance(update, Update)
    assert update.data["samples"] == 13
    later = NOW + timedelta(minutes=40)  # the report 30 min ago left the window: 4 now
    assert spool.decide(reports, names, totals, alerts, params, later) == [
        Clear(1, "device:dev-1", "edge-1 (dev-1)'s spool dropped no samples in the last 1 h")
    ]
    assert spool.decide(reports, {}, {}, alerts, params, NOW) == [
        Clear(1, "device:dev-1", "dev-1 is revoked or gone")
    ]


def test_reports_of_unknown_devices_and_event_only_drops_raise_nothing() -> None:
    params = SpoolDroppedParams()
    names = {"dev-1": "dev-1"}
    assert spool.decide([drops(1, 0, 9)], names, {}, [], params, NOW) == []
    assert spool.decide([drops(1, 9, device_id="dev-2")], names, {}, [], params, NOW) == []
    (alert,) = raises(spool.decide([drops(1, 1)], names, {}, [], params, NOW))
    assert alert.message.startswith("dev-1's telemetry spool dropped 1 samples in the last 1 h")


# --- rollout_failed -------------------------------------------------------------------------


def trouble(
    *,
    aborted_ago_h: float | None = None,
    by: str = "controller",
    failures_ago_h: tuple[float, ...] = (),
) -> RolloutTrouble:
    abort = (
        Abort(NOW - timedelta(hours=aborted_ago_h), by, "gate 0 (error_rate) failed 3 checks")
        if aborted_ago_h is not None
        else None
    )
    failures = tuple(
        GateFailure(NOW - timedelta(hours=h), 1, 0, ("error rate 0.2 > 0.05",))
        for h in sorted(failures_ago_h, reverse=True)
    )
    return RolloutTrouble("r-1", "gemma 2.0", "model:gemma3", abort, failures)


def decide_rollouts(
    troubles: list[RolloutTrouble],
    alerts: list[OpenAlert] | None = None,
    covered: dict[str, datetime] | None = None,
    params: RolloutFailedParams | None = None,
    now: datetime = NOW,
) -> list[Raise | Update | Clear]:
    p = params or RolloutFailedParams()
    return rollouts.decide(
        troubles,
        alerts or [],
        covered or {},
        gate_failures=p.gate_failures,
        lookback_hours=p.lookback_hours,
        now=now,
    )


def test_a_failed_gate_check_raises_an_error_and_the_abort_updates_it() -> None:
    (alert,) = raises(decide_rollouts([trouble(failures_ago_h=(2, 1))]))
    assert (alert.subject, alert.severity) == ("rollout:r-1", Severity.ERROR)
    assert alert.message == (
        "rollout 'gemma 2.0' (r-1, model:gemma3): 2 failed gate check(s) in the last 24 h; "
        "the latest, stage 1, gate 0: error rate 0.2 > 0.05"
    )
    assert alert.data["last_at"] == (NOW - timedelta(hours=1)).isoformat()
    alerts = opened(alert)
    assert decide_rollouts([trouble(failures_ago_h=(2, 1))], alerts) == []

    (update,) = decide_rollouts([trouble(aborted_ago_h=0.5, failures_ago_h=(2, 1))], alerts)
    assert isinstance(update, Update)
    assert update.message == (
        "rollout 'gemma 2.0' (r-1, model:gemma3) aborted by controller: "
        "gate 0 (error_rate) failed 3 checks"
    )
    assert (update.data["aborted_by"], update.data["gate_failures"]) == ("controller", 2)
    assert decide_rollouts([], alerts) == []  # an event is never cleared by a round


def test_an_admins_abort_raises_unless_gate_failures_are_off() -> None:
    (alert,) = raises(decide_rollouts([trouble(aborted_ago_h=1, by="admin:alice")]))
    assert "aborted by admin:alice" in alert.message
    only_aborts = RolloutFailedParams(gate_failures=False)
    assert decide_rollouts([trouble(failures_ago_h=(1,))], params=only_aborts) == []
    (abort,) = raises(
        decide_rollouts([trouble(aborted_ago_h=1, failures_ago_h=(2,))], params=only_aborts)
    )
    assert abort.data["gate_failures"] == 0


def test_events_older_than_the_lookback_raise_nothing() -> None:
    assert decide_rollouts([trouble(aborted_ago_h=25, failures_ago_h=(30,))]) == []
    short = RolloutFailedParams(lookback_hours=0.5)
    assert decide_rollouts([trouble(aborted_ago_h=1)], params=short) == []


def test_after_an_acknowledgement_only_newer_events_raise_again() -> None:
    seen = trouble(failures_ago_h=(2, 1))
    covered = {"rollout:r-1": NOW - timedelta(hours=1)}
    assert decide_rollouts([seen], covered=covered) == []
    (again,) = raises(decide_rollouts([trouble(failures_ago_h=(2, 1, 0.1))], covered=covered))
    assert again.data["gate_failures"] == 3


def test_two_open_alerts_for_one_rollout_keep_the_older() -> None:
    (alert,) = raises(decide_rollouts([trouble(aborted_ago_h=1)]))
    alerts = [OpenAlert(i, alert.subject, alert.message, alert.data) for i in (7, 4)]
    assert decide_rollouts([trouble(aborted_ago_h=1)], alerts) == [
        Clear(7, "rollout:r-1", "a duplicate of an older open alert")
    ]
