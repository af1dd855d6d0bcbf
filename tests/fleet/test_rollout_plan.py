"""The rollout's pure decisions (fleet.rollout.plan): quotas, rates, devices, aborts, windows."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from fleet.rollout.plan import (
    DeviceState,
    Observation,
    abort_reason,
    allowed_released,
    device_rank,
    in_window,
    judge_device,
    stage_count,
    stage_names,
    stage_quotas,
)
from fleet.rollout.spec import AbortRule, FailureKind, MaintenanceWindow, RolloutSpec

T0 = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
WAVES = {"kind": "waves", "percents": [1, 10, 50, 100]}


def rollout(**fields: Any) -> RolloutSpec:
    return RolloutSpec.model_validate(
        {"change": {"model": "gemma3-270m", "version": "1.1"}, "target": {"groups": ["lab"]}}
        | fields
    )


def exponential(start: int, factor: float, cap: int, **fields: Any) -> RolloutSpec:
    stages = {"kind": "exponential", "start_per_minute": start, "factor": factor}
    return rollout(stages=stages | {"max_per_minute": cap}, **fields)


# --------------------------------------------------------------------------- stages


@pytest.mark.parametrize(
    ("fields", "count", "names"),
    [
        ({}, 1, ["100%"]),
        ({"stages": WAVES}, 4, ["1%", "10%", "50%", "100%"]),
        ({"canary": {"count": 2}, "stages": WAVES}, 5, ["canary", "1%", "10%", "50%", "100%"]),
        ({"stages": {"kind": "waves", "percents": [12.5, 100]}}, 2, ["12.5%", "100%"]),
        (
            {
                "canary": {"percent": 1},
                "stages": {
                    "kind": "exponential",
                    "start_per_minute": 1,
                    "factor": 2,
                    "max_per_minute": 8,
                },
            },
            2,
            ["canary", "exponential"],
        ),
    ],
)
def test_stage_names_and_count(fields: dict[str, Any], count: int, names: list[str]) -> None:
    spec = rollout(**fields)
    assert stage_count(spec) == count
    assert stage_names(spec) == names


QUOTAS = [
    # (canary, eligible, quotas per stage: canary, 1%, 10%, 50%, 100%)
    ({"count": 2}, 0, [0, 0, 0, 0, 0]),
    ({"count": 2}, 1, [1, 1, 1, 1, 1]),  # the canary never asks for more than there are
    ({"count": 2}, 3, [2, 2, 2, 2, 3]),  # 1% and 10% of 3 round up to 1, below the canary
    ({"count": 2}, 100, [2, 2, 10, 50, 100]),
    ({"count": 2}, 2000, [2, 20, 200, 1000, 2000]),
    ({"percent": 1}, 0, [0, 0, 0, 0, 0]),
    ({"percent": 1}, 1, [1, 1, 1, 1, 1]),  # at least one device per stage
    ({"percent": 1}, 3, [1, 1, 1, 2, 3]),  # 50% of 3 is 1.5: rounded up
    ({"percent": 1}, 100, [1, 1, 10, 50, 100]),
    ({"percent": 1}, 2000, [20, 20, 200, 1000, 2000]),
    ({"percent": 1}, 101, [2, 2, 11, 51, 101]),  # 1.01 -> 2, 10.1 -> 11, 50.5 -> 51
    ({"count": 500}, 100, [100, 100, 100, 100, 100]),
]


@pytest.mark.parametrize(("canary", "eligible", "expected"), QUOTAS)
def test_stage_quotas(canary: dict[str, Any], eligible: int, expected: list[int]) -> None:
    quotas = stage_quotas(rollout(canary=canary, stages=WAVES), eligible)
    assert quotas == expected


@pytest.mark.parametrize("eligible", [0, 1, 2, 3, 7, 99, 100, 101, 999, 2000])
@pytest.mark.parametrize(
    "fields",
    [
        {"canary": {"count": 5}, "stages": WAVES},
        {"canary": {"percent": 60}, "stages": {"kind": "waves", "percents": [10, 50, 100]}},
        {"stages": {"kind": "waves", "percents": [0.1, 0.2, 33.3, 66.7, 100]}},
        {
            "canary": {"count": 3},
            "stages": {
                "kind": "exponential",
                "start_per_minute": 1,
                "factor": 2,
                "max_per_minute": 4,
            },
        },
    ],
)
def test_quotas_are_cumulative_bounded_and_complete(fields: dict[str, Any], eligible: int) -> None:
    """Never decreasing, never above the eligible devices, and the last stage takes them all."""
    spec = rollout(**fields)
    quotas = stage_quotas(spec, eligible)
    assert len(quotas) == stage_count(spec)
    assert quotas == sorted(quotas)
    assert all(0 <= q <= eligible for q in quotas)
    assert quotas[-1] == eligible
    assert all(q >= 1 for q in quotas) or eligible == 0


def test_a_bigger_canary_lifts_the_waves_after_it() -> None:
    """A canary of 60% outgrows the 10% wave: the wave releases no one new, never fewer."""
    spec = rollout(canary={"percent": 60}, stages={"kind": "waves", "percents": [10, 50, 100]})
    assert stage_quotas(spec, 10) == [6, 6, 6, 10]


def test_exponential_quota_is_everyone() -> None:
    assert stage_quotas(exponential(1, 2, 4, canary={"count": 3}), 50) == [3, 50]
    assert stage_quotas(exponential(1, 2, 4), 50) == [50]


@pytest.mark.parametrize(
    ("percent", "eligible", "expected"),
    [(1.1, 3000, 33), (2.2, 1500, 33), (4.4, 750, 33), (5.4, 1500, 81)],
)
def test_decimal_percent_is_not_rounded_past_an_exact_count(
    percent: float, eligible: int, expected: int
) -> None:
    """1.1% of 3000 devices is exactly 33; a stage must not release a 34th."""
    spec = rollout(canary={"percent": percent})
    assert stage_quotas(spec, eligible)[0] == expected


# --------------------------------------------------------------------------- the rate

WAVE_SPEC = rollout(canary={"count": 2}, stages=WAVES)


@pytest.mark.parametrize("stage", range(5))
@pytest.mark.parametrize("elapsed", [0.0, 59.0, 3600.0])
def test_wave_stages_release_their_whole_quota_at_once(stage: int, elapsed: float) -> None:
    quotas = stage_quotas(WAVE_SPEC, 2000)
    assert allowed_released(WAVE_SPEC, stage, quotas, elapsed) == quotas[stage]


RATE = exponential(10, 2, 50, canary={"count": 3})
RATE_QUOTAS = stage_quotas(RATE, 1000)  # [3, 1000]


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [
        (-5.0, 3 + 10),  # a clock step back counts as the first minute
        (0.0, 3 + 10),  # the first minute's allowance is there at once
        (59.0, 3 + 10),
        (59.999, 3 + 10),
        (60.0, 3 + 10 + 20),
        (125.0, 3 + 10 + 20 + 40),
        (180.0, 3 + 10 + 20 + 40 + 50),  # 80 a minute is capped at 50
        (240.0, 3 + 10 + 20 + 40 + 50 + 50),
        (60.0 * 20, 3 + 10 + 20 + 40 + 50 * 18),  # minute 21: 973 released
        (60.0 * 21, 1000),  # minute 22 would pass the quota: the quota
        (86_400.0, 1000),
    ],
)
def test_exponential_allowance(elapsed: float, expected: int) -> None:
    """start_per_minute in the first minute, times factor each minute, capped, after the canary."""
    assert allowed_released(RATE, 1, RATE_QUOTAS, elapsed) == expected


def test_canary_of_an_exponential_rollout_is_its_quota() -> None:
    """The rate applies to the last stage only; the canary releases its count at once."""
    assert allowed_released(RATE, 0, RATE_QUOTAS, 0.0) == 3


def test_exponential_without_canary_starts_from_zero() -> None:
    spec = exponential(5, 1.5, 100)
    quotas = stage_quotas(spec, 40)
    assert [allowed_released(spec, 0, quotas, m * 60.0) for m in range(5)] == [5, 12, 23, 39, 40]


def test_fractional_rates_are_truncated_each_minute() -> None:
    """1, 1.5, 2.25, 3.375 a minute: whole devices only."""
    spec = exponential(1, 1.5, 1000)
    quotas = stage_quotas(spec, 100)
    assert [allowed_released(spec, 0, quotas, m * 60.0) for m in range(4)] == [1, 2, 4, 7]


@pytest.mark.parametrize("eligible", [0, 1, 5, 13, 200])
@pytest.mark.parametrize("minutes", [0, 1, 3, 10, 100])
def test_allowance_never_passes_the_quota(eligible: int, minutes: int) -> None:
    quotas = stage_quotas(RATE, eligible)
    allowed = allowed_released(RATE, 1, quotas, minutes * 60.0)
    assert quotas[0] <= allowed <= quotas[1]


def test_long_capped_exponential_stage_does_not_overflow() -> None:
    """10/min doubling, capped at 50/min, over 100k devices takes ~33 hours to release."""
    spec = exponential(10, 2, 50)
    quotas = stage_quotas(spec, 100_000)
    minutes = 1100
    expected = 10 + 20 + 40 + 50 * (minutes + 1 - 3)
    assert allowed_released(spec, 0, quotas, minutes * 60.0) == expected


# --------------------------------------------------------------------------- judging a device

TIMEOUT = 600.0
SINCE = T0
SERVES_HEALTHY = Observation(serves_target=True, healthy=True)
SERVES_ONLY = Observation(serves_target=True, healthy=False)
HEALTHY_ONLY = Observation(serves_target=False, healthy=True)
NOTHING = Observation(serves_target=False, healthy=False)
HEALTH_FAILED = Observation(serves_target=False, healthy=False, health_failed="golden 2/5 failed")
INSTALL_FAILED = Observation(serves_target=False, healthy=False, install_failed="sha256 mismatch")

JUDGE: dict[str, tuple[DeviceState, Observation, float, Any]] = {
    # id: (state, what was seen, seconds since issued, expected)
    "serves and healthy -> updated": (
        DeviceState.UPDATING,
        SERVES_HEALTHY,
        1,
        (DeviceState.UPDATED, None, "serves the new version and passed its health check"),
    ),
    "serves without a health check stays updating": (DeviceState.UPDATING, SERVES_ONLY, 1, None),
    "healthy without serving stays updating": (DeviceState.UPDATING, HEALTHY_ONLY, 1, None),
    "nothing yet": (DeviceState.UPDATING, NOTHING, 1, None),
    "health check failed": (
        DeviceState.UPDATING,
        HEALTH_FAILED,
        1,
        (DeviceState.FAILED, FailureKind.HEALTH_CHECK_FAILED, "golden 2/5 failed"),
    ),
    "install failed": (
        DeviceState.UPDATING,
        INSTALL_FAILED,
        1,
        (DeviceState.FAILED, FailureKind.INSTALL_FAILED, "sha256 mismatch"),
    ),
    "health failure wins over install failure": (
        DeviceState.UPDATING,
        Observation(False, False, install_failed="a", health_failed="b"),
        1,
        (DeviceState.FAILED, FailureKind.HEALTH_CHECK_FAILED, "b"),
    ),
    "a healthy report wins over an old failure": (
        DeviceState.UPDATING,
        Observation(True, True, install_failed="retried", health_failed="retried"),
        1,
        (DeviceState.UPDATED, None, "serves the new version and passed its health check"),
    ),
    "failure is judged before the timeout": (
        DeviceState.UPDATING,
        INSTALL_FAILED,
        TIMEOUT * 2,
        (DeviceState.FAILED, FailureKind.INSTALL_FAILED, "sha256 mismatch"),
    ),
    "just before the timeout": (DeviceState.UPDATING, NOTHING, TIMEOUT - 0.001, None),
    "exactly at the timeout": (
        DeviceState.UPDATING,
        NOTHING,
        TIMEOUT,
        (
            DeviceState.TIMED_OUT,
            FailureKind.TIMED_OUT,
            "no healthy report of the new version within 600 s",
        ),
    ),
    "serving without health check times out": (
        DeviceState.UPDATING,
        SERVES_ONLY,
        TIMEOUT + 1,
        (
            DeviceState.TIMED_OUT,
            FailureKind.TIMED_OUT,
            "no healthy report of the new version within 600 s",
        ),
    ),
    "timed out, then reports healthy": (
        DeviceState.TIMED_OUT,
        SERVES_HEALTHY,
        TIMEOUT * 10,
        (
            DeviceState.UPDATED,
            None,
            "serves the new version and passed its health check (after it had timed out)",
        ),
    ),
    "timed out stays timed out": (DeviceState.TIMED_OUT, NOTHING, TIMEOUT * 10, None),
    "timed out, a late failure changes nothing": (
        DeviceState.TIMED_OUT,
        HEALTH_FAILED,
        TIMEOUT * 10,
        None,
    ),
    "timed out, serving without health check": (
        DeviceState.TIMED_OUT,
        SERVES_ONLY,
        TIMEOUT * 10,
        None,
    ),
}


@pytest.mark.parametrize(("state", "seen", "after", "expected"), JUDGE.values(), ids=JUDGE.keys())
def test_judge_device(state: DeviceState, seen: Observation, after: float, expected: Any) -> None:
    """Updated only on a healthy report of the target; never on a download or a bare serve."""
    now = SINCE + timedelta(seconds=after)
    assert judge_device(state, seen, SINCE, now, TIMEOUT) == expected


@pytest.mark.parametrize(
    "state",
    [
        DeviceState.PENDING,
        DeviceState.QUEUED,
        DeviceState.UPDATED,
        DeviceState.FAILED,
        DeviceState.INELIGIBLE,
        DeviceState.ROLLED_BACK,
    ],
)
@pytest.mark.parametrize("seen", [SERVES_HEALTHY, HEALTH_FAILED, INSTALL_FAILED, NOTHING])
def test_judge_ignores_devices_not_updating(state: DeviceState, seen: Observation) -> None:
    """Only updating and timed-out devices move; a final state stays final."""
    assert judge_device(state, seen, SINCE, SINCE + timedelta(days=1), TIMEOUT) is None


def test_timeout_message_formats_the_seconds() -> None:
    moved = judge_device(DeviceState.UPDATING, NOTHING, SINCE, SINCE + timedelta(hours=2), 3600.0)
    assert moved == (
        DeviceState.TIMED_OUT,
        FailureKind.TIMED_OUT,
        "no healthy report of the new version within 3600 s",
    )


def test_timeout_across_time_zones() -> None:
    """Aware datetimes in different zones are compared as instants."""
    since = datetime(2025, 6, 2, 14, 0, tzinfo=UTC)
    now = datetime(2025, 6, 2, 18, 10, tzinfo=ZoneInfo("Europe/Berlin"))  # 16:10 UTC
    assert judge_device(DeviceState.UPDATING, NOTHING, since, now, 7200.0) is not None
    assert judge_device(DeviceState.UPDATING, NOTHING, since, now, 7801.0) is None


# --------------------------------------------------------------------------- abort rules


def rule(**fields: Any) -> AbortRule:
    return AbortRule.model_validate(fields)


HEALTH = FailureKind.HEALTH_CHECK_FAILED
INSTALL = FailureKind.INSTALL_FAILED
TIMED_OUT = FailureKind.TIMED_OUT
GATE = FailureKind.GATE_FAILED

ABORTS: dict[str, tuple[list[AbortRule], dict[FailureKind, int], int, str | None]] = {
    "no rules": ([], {HEALTH: 100}, 100, None),
    "min_devices not reached": (
        [rule(failure="health_check_failed", threshold_count=1, min_devices=5)],
        {HEALTH: 4},
        4,
        None,
    ),
    "min_devices reached": (
        [rule(failure="health_check_failed", threshold_count=1, min_devices=5)],
        {HEALTH: 4},
        5,
        "abort rule: 4 device(s) health_check_failed, threshold 1 (5 finished)",
    ),
    "count below": ([rule(failure="install_failed", threshold_count=3)], {INSTALL: 2}, 10, None),
    "count reached": (
        [rule(failure="install_failed", threshold_count=3)],
        {INSTALL: 3},
        10,
        "abort rule: 3 device(s) install_failed, threshold 3 (10 finished)",
    ),
    "percent just below": (
        [rule(failure="health_check_failed", threshold_percent=10)],
        {HEALTH: 1},
        11,  # 9.09%
        None,
    ),
    "percent exactly at the threshold": (
        [rule(failure="health_check_failed", threshold_percent=10)],
        {HEALTH: 2},
        20,
        "abort rule: 2 of 20 finished device(s) health_check_failed (10.0%), threshold 10%",
    ),
    "percent above": (
        [rule(failure="timed_out", threshold_percent=25)],
        {TIMED_OUT: 3},
        8,
        "abort rule: 3 of 8 finished device(s) timed_out (37.5%), threshold 25%",
    ),
    "fractional percent": (
        [rule(threshold_percent=33.3)],
        {GATE: 1},
        3,
        "abort rule: 1 of 3 finished device(s) failed (33.3%), threshold 33.3%",
    ),
    "any sums every kind (count)": (
        [rule(failure="any", threshold_count=4)],
        {HEALTH: 1, INSTALL: 1, TIMED_OUT: 1, GATE: 1},
        50,
        "abort rule: 4 device(s) failed, threshold 4 (50 finished)",
    ),
    "any sums every kind (percent)": (
        [rule(threshold_percent=20)],
        {HEALTH: 1, INSTALL: 1},
        10,
        "abort rule: 2 of 10 finished device(s) failed (20.0%), threshold 20%",
    ),
    "any below": ([rule(threshold_count=4)], {HEALTH: 1, INSTALL: 2}, 50, None),
    "a rule for one kind ignores the others": (
        [rule(failure="health_check_failed", threshold_count=1)],
        {INSTALL: 50, TIMED_OUT: 50, GATE: 50},
        150,
        None,
    ),
    "a missing kind counts zero": (
        [rule(failure="gate_failed", threshold_percent=1)],
        {},
        100,
        None,
    ),
    "nothing finished": ([rule(threshold_percent=1)], {}, 0, None),
    "the first rule that fires speaks": (
        [
            rule(failure="install_failed", threshold_count=10),
            rule(failure="timed_out", threshold_count=2),
            rule(threshold_count=1),
        ],
        {INSTALL: 1, TIMED_OUT: 2},
        5,
        "abort rule: 2 device(s) timed_out, threshold 2 (5 finished)",
    ),
    "a waiting rule does not hide a later one": (
        [
            rule(threshold_count=1, min_devices=100),
            rule(failure="install_failed", threshold_percent=50),
        ],
        {INSTALL: 3},
        6,
        "abort rule: 3 of 6 finished device(s) install_failed (50.0%), threshold 50%",
    ),
}


@pytest.mark.parametrize(
    ("rules", "failures", "finished", "expected"), ABORTS.values(), ids=ABORTS.keys()
)
def test_abort_reason(
    rules: list[AbortRule], failures: dict[FailureKind, int], finished: int, expected: str | None
) -> None:
    assert abort_reason(rules, failures, finished) == expected


def test_abort_reason_reads_rules_from_a_stored_spec() -> None:
    """Rules come back from JSON: their failure kinds must still find the counts."""
    spec = RolloutSpec.model_validate(
        rollout(abort_rules=[{"failure": "health_check_failed", "threshold_count": 2}]).model_dump(
            mode="json"
        )
    )
    assert abort_reason(spec.abort_rules, {HEALTH: 2}, 2) == (
        "abort rule: 2 device(s) health_check_failed, threshold 2 (2 finished)"
    )


# --------------------------------------------------------------------------- windows


def at(hour: int, minute: int = 0, second: int = 0, day: datetime = T0) -> datetime:
    return day.replace(hour=hour, minute=minute, second=second)


NIGHT = MaintenanceWindow(start="22:00", end="04:00")
MORNING = MaintenanceWindow(start="02:00", end="05:00")


@pytest.mark.parametrize(
    ("window", "now", "inside"),
    [
        (MORNING, at(1, 59), False),
        (MORNING, at(2, 0), True),  # start is in
        (MORNING, at(3, 30), True),
        (MORNING, at(4, 59, 59), True),
        (MORNING, at(5, 0), False),  # end is out
        (MORNING, at(12, 0), False),
        (NIGHT, at(21, 59, 59), False),
        (NIGHT, at(22, 0), True),
        (NIGHT, at(23, 30), True),
        (NIGHT, at(0, 0), True),
        (NIGHT, at(3, 59), True),
        (NIGHT, at(3, 59, 59), True),
        (NIGHT, at(4, 0), False),
        (NIGHT, at(12, 0), False),
    ],
)
def test_in_window_utc(window: MaintenanceWindow, now: datetime, inside: bool) -> None:
    """Start inclusive, end exclusive; a window with start after end wraps midnight."""
    assert in_window(window, None, now) is inside


def test_no_window_is_always_open() -> None:
    assert in_window(None, None, at(12)) is True
    assert in_window(None, "Europe/Berlin", at(12)) is True


SUMMER = datetime(2025, 7, 1, tzinfo=UTC)  # Berlin is UTC+2 (CEST)
WINTER = datetime(2025, 1, 15, tzinfo=UTC)  # Berlin is UTC+1 (CET)
SPRING_FORWARD = datetime(2025, 3, 30, tzinfo=UTC)  # 02:00 CET -> 03:00 CEST at 01:00 UTC
FALL_BACK = datetime(2025, 10, 26, tzinfo=UTC)  # 03:00 CEST -> 02:00 CET at 01:00 UTC


@pytest.mark.parametrize(
    ("window", "zone", "now", "inside"),
    [
        # the device's zone over the window's: 21:30 UTC is 23:30 in Berlin in summer
        (NIGHT, "Europe/Berlin", at(21, 30, day=SUMMER), True),
        (NIGHT, None, at(21, 30, day=SUMMER), False),
        (NIGHT, "UTC", at(21, 30, day=SUMMER), False),
        # 02:30 UTC is 04:30 in Berlin in summer (out) but 03:30 in winter (in)
        (NIGHT, "Europe/Berlin", at(2, 30, day=SUMMER), False),
        (NIGHT, "Europe/Berlin", at(2, 30, day=WINTER), True),
        # 20:30 UTC is 22:30 CEST (in) but 21:30 CET (out)
        (NIGHT, "Europe/Berlin", at(20, 30, day=SUMMER), True),
        (NIGHT, "Europe/Berlin", at(20, 30, day=WINTER), False),
        # the spring-forward night: 00:30 UTC is 01:30 CET, 01:30 UTC is 03:30 CEST
        (MORNING, "Europe/Berlin", at(0, 30, day=SPRING_FORWARD), False),
        (MORNING, "Europe/Berlin", at(1, 30, day=SPRING_FORWARD), True),
        # the fall-back night: 00:30 UTC is 02:30 CEST, 01:30 UTC is 02:30 CET, both in
        (MORNING, "Europe/Berlin", at(0, 30, day=FALL_BACK), True),
        (MORNING, "Europe/Berlin", at(1, 30, day=FALL_BACK), True),
        (MORNING, "Europe/Berlin", at(3, 59, day=FALL_BACK), True),  # 04:59 CET
        (MORNING, "Europe/Berlin", at(4, 0, day=FALL_BACK), False),  # 05:00 CET
        # west of UTC: 09:00 UTC is 02:00 in Los Angeles in summer (PDT, UTC-7)
        (MORNING, "America/Los_Angeles", at(9, 0, day=SUMMER), True),
        (MORNING, "America/Los_Angeles", at(8, 59, day=SUMMER), False),
        # a half-hour zone: 21:00 UTC is 02:30 in Kolkata
        (MORNING, "Asia/Kolkata", at(21, 0, day=SUMMER), True),
        (MORNING, "Asia/Kolkata", at(20, 29, day=SUMMER), False),
    ],
)
def test_in_window_device_local(
    window: MaintenanceWindow, zone: str | None, now: datetime, inside: bool
) -> None:
    assert in_window(window, zone, now) is inside


BERLIN_NIGHT = MaintenanceWindow(start="22:00", end="04:00", timezone="Europe/Berlin")


@pytest.mark.parametrize(
    ("zone", "inside"),
    [
        (None, True),  # no zone reported: the window's (Berlin: 23:30)
        ("", True),
        ("Mars/Olympus", True),  # unknown: the window's
        ("../../etc/passwd", True),  # not a key: the window's
        ("Europe", True),  # a folder of zones, not a zone
        ("UTC", False),  # the device's own zone wins: 21:30
        ("Asia/Tokyo", False),  # 06:30 the next morning
    ],
)
def test_unknown_device_zone_falls_back_to_the_window(zone: str | None, inside: bool) -> None:
    """A device may report anything as its zone; a bad one must not break the engine step."""
    now = at(21, 30, day=SUMMER)
    assert in_window(BERLIN_NIGHT, zone, now) is inside


def test_device_zone_used_over_window_zone() -> None:
    """The same instant, the same window: the answer follows the device's clock."""
    now = at(20, 30, day=SUMMER)  # 22:30 in Berlin, 20:30 in UTC, 05:30 in Tokyo
    window_utc = MaintenanceWindow(start="22:00", end="23:00", timezone="UTC")
    assert in_window(window_utc, "Europe/Berlin", now) is True
    assert in_window(window_utc, None, now) is False
    window_berlin = MaintenanceWindow(start="22:00", end="23:00", timezone="Europe/Berlin")
    assert in_window(window_berlin, None, now) is True
    assert in_window(window_berlin, "UTC", now) is False
    assert in_window(window_berlin, "Asia/Tokyo", now) is False


# --------------------------------------------------------------------------- rank


def test_device_rank_is_stable_and_short() -> None:
    """A restart must pick the same canaries: the rank is a hash, not a random draw."""
    rank = device_rank("ro-1", "dev-1")
    assert rank == device_rank("ro-1", "dev-1")
    assert rank == hashlib.sha256(b"ro-1/dev-1").hexdigest()[:16]
    assert len(rank) == 16
    assert int(rank, 16) >= 0


def test_device_rank_differs_by_rollout_and_device() -> None:
    """Another rollout draws other canaries, so the same devices are not always first."""
    devices = [f"dev-{i}" for i in range(50)]
    order_a = sorted(devices, key=lambda d: device_rank("ro-a", d))
    order_b = sorted(devices, key=lambda d: device_rank("ro-b", d))
    assert order_a != order_b
    assert order_a[:5] != order_b[:5]
    assert len({device_rank("ro-a", d) for d in devices}) == len(devices)
    assert device_rank("ro-a", "dev-1") != device_rank("ro-b", "dev-1")


def test_in_window_reads_the_instant_not_the_zone_of_now() -> None:
    """The engine's clock may be in any zone: 23:30 Berlin is the same instant as 21:30 UTC."""
    berlin_now = datetime(2025, 7, 1, 23, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    assert in_window(NIGHT, None, berlin_now) is False  # 21:30 UTC
    assert in_window(NIGHT, "Europe/Berlin", berlin_now) is True
    assert in_window(BERLIN_NIGHT, None, berlin_now.astimezone(UTC)) is True


def test_a_rejected_policy_fails_the_device_unless_it_enforces_it() -> None:
    later = SINCE + timedelta(seconds=5)
    rejected = Observation(serves_target=False, healthy=False, rejected="chains: bad tier")
    assert judge_device(DeviceState.UPDATING, rejected, SINCE, later, TIMEOUT) == (
        DeviceState.FAILED,
        FailureKind.POLICY_REJECTED,
        "chains: bad tier",
    )
    enforced = Observation(
        serves_target=True, healthy=True, rejected="an older copy", success="enforces policy p v2"
    )
    assert judge_device(DeviceState.UPDATING, enforced, SINCE, later, TIMEOUT) == (
        DeviceState.UPDATED,
        None,
        "enforces policy p v2",
    )
    # A rejection after a timeout changes nothing: only a late success does.
    assert judge_device(DeviceState.TIMED_OUT, rejected, SINCE, later, TIMEOUT) is None
