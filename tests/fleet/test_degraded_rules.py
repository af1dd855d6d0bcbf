"""The degraded-group alert rule, purely: who counts, the message, raise, update, clear."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fleet.degraded.rules import (
    GROUP_DEGRADED,
    Clear,
    OpenAlert,
    Raise,
    Thresholds,
    Update,
    counts_toward,
    decide,
    degraded_of,
    group_health,
    message,
)
from models.policy import FailureKind
from models.wire import BreakerState, DegradedModel, Severity

NOW = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
RULE = Thresholds(share=0.2, min_devices=2)


def broken(
    model: str = "gemma3-270m",
    breaker: BreakerState = BreakerState.OPEN,
    kind: FailureKind = FailureKind.ERROR,
) -> DegradedModel:
    return DegradedModel(name=model, breaker=breaker, kind=kind, reason="boom", since=NOW)


def test_the_message_says_how_many_of_how_many_and_on_what() -> None:
    health = group_health("lab", 10, {f"dev-{i}": [broken()] for i in range(3)})
    assert message(health, RULE) == (
        "3 of 10 devices in lab are degraded (30% >= 20%): gemma3-270m open on 3 (error)"
    )
    mixed = group_health(
        "lab",
        5,
        {
            "dev-a": [broken(), broken("minilm", BreakerState.HALF_OPEN, FailureKind.SLOW)],
            "dev-b": [broken(kind=FailureKind.OUT_OF_MEMORY)],
            "dev-c": [],  # nothing degraded: not counted as degraded
        },
    )
    assert mixed.degraded == ("dev-a", "dev-b")
    assert message(mixed, RULE) == (
        "2 of 5 devices in lab are degraded (40% >= 20%): "
        "gemma3-270m open on 2 (error, out_of_memory); minilm half_open on 1 (slow)"
    )
    one = group_health("lab", 10, {"dev-a": [broken()]})
    assert message(one, RULE).startswith("1 of 10 devices in lab is degraded (10% < 20%)")


def test_who_counts_toward_a_group() -> None:
    def counts(**kw: object) -> bool:
        values: dict[str, object] = {
            "revoked": False,
            "online": False,
            "last_seen": None,
            "now": NOW,
            "seen_within_s": 300.0,
        }
        values.update(kw)
        return counts_toward(**values)  # type: ignore[arg-type]

    assert counts(online=True)
    assert counts(last_seen=NOW - timedelta(seconds=299))  # offline a moment: a restart
    assert not counts(last_seen=NOW - timedelta(seconds=301))  # silent for long: stale
    assert not counts()  # never seen
    assert not counts(revoked=True, online=True)


def test_reaching_the_threshold_raises_one_warning() -> None:
    below = group_health("lab", 10, {"dev-a": [broken()]})  # 10%, and only one
    assert decide([below], [], RULE) == []
    few = group_health("lab", 3, {"dev-a": [broken()]})  # 33%, but under min_devices
    assert decide([few], [], RULE) == []
    at = group_health("lab", 10, {"dev-a": [broken()], "dev-b": [broken()]})  # exactly 20%
    (action,) = decide([at], [], RULE)
    assert isinstance(action, Raise)
    assert action.subject == "group:lab"
    assert action.severity is Severity.WARNING
    assert action.message.startswith("2 of 10 devices in lab are degraded (20% >= 20%)")
    assert action.data["devices"] == 10
    assert action.data["degraded"] == 2
    assert action.data["device_ids"] == ["dev-a", "dev-b"]
    assert action.data["models"] == [
        {"model": "gemma3-270m", "breaker": "open", "devices": 2, "kinds": ["error"]}
    ]


def test_an_open_alert_is_updated_only_when_its_numbers_change_and_cleared_below() -> None:
    two = group_health("lab", 10, {"dev-a": [broken()], "dev-b": [broken()]})
    (raised,) = decide([two], [], RULE)
    assert isinstance(raised, Raise)
    stored = OpenAlert(7, raised.subject, raised.message, raised.data)
    assert decide([two], [stored], RULE) == []  # nothing new: nothing written

    three = group_health("lab", 10, {d: [broken()] for d in ("dev-a", "dev-b", "dev-c")})
    (update,) = decide([three], [stored], RULE)
    assert isinstance(update, Update)
    assert update.alert_id == 7
    assert update.message.startswith("3 of 10")

    recovered = group_health("lab", 10, {"dev-a": [broken()]})
    (clear,) = decide([recovered], [stored], RULE)
    assert isinstance(clear, Clear)
    assert clear.alert_id == 7
    assert clear.reason.startswith("1 of 10 devices in lab is degraded (10% < 20%)")


def test_an_alert_of_a_group_with_no_device_that_counts_clears() -> None:
    stored = OpenAlert(3, "group:gone", "2 of 2 ...", {})
    (clear,) = decide([], [stored], RULE)
    assert clear == Clear(3, "group:gone", "no device of gone counts any more")


def test_a_duplicate_open_alert_is_cleared_and_the_older_kept() -> None:
    two = group_health("lab", 4, {"dev-a": [broken()], "dev-b": [broken()]})
    (raised,) = decide([two], [], RULE)
    assert isinstance(raised, Raise)
    older = OpenAlert(1, "group:lab", raised.message, raised.data)
    newer = OpenAlert(2, "group:lab", raised.message, raised.data)
    assert decide([two], [newer, older], RULE) == [
        Clear(2, "group:lab", "a duplicate of an older open alert")
    ]


def test_groups_are_decided_each_on_its_own() -> None:
    hot = group_health("hot", 2, {"dev-a": [broken()], "dev-b": [broken()]})
    calm = group_health("calm", 50, {"dev-c": [broken()], "dev-d": [broken()]})  # 4%
    actions = decide([calm, hot], [], RULE)
    assert [a.subject for a in actions] == ["group:hot"]
    assert GROUP_DEGRADED == "group_degraded"


def test_degraded_of_reads_a_stored_report_tolerantly() -> None:
    report = {
        "device_id": "dev-a",
        "converged": True,
        "agent_version": "0.2.0",
        "degraded": [broken().model_dump(mode="json")],
    }
    assert [m.name for m in degraded_of(report)] == ["gemma3-270m"]
    assert degraded_of(None) == []
    assert degraded_of({"device_id": "dev-a"}) == []  # does not parse: no report
    assert degraded_of({**report, "degraded": []}) == []


def test_the_alerts_router_is_mounted() -> None:
    from fleet.api import ROUTERS, alerts

    assert "router" in alerts.__all__
    assert alerts.router in ROUTERS
