"""'edgefleet rollouts' pure pieces (fleet.cli.rollouts): option parsers and the status view."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import typer
from rich.console import Console

from fleet.cli.rollouts import (
    parse_abort,
    parse_canary,
    parse_change,
    parse_gate,
    parse_policy,
    parse_window,
    render_status,
)
from fleet.rollout.gates import Cohort, Sample, check_gate
from fleet.rollout.plan import stage_names, stage_quotas
from fleet.rollout.spec import AbortRule, Canary, Gate, MaintenanceWindow, RolloutSpec
from fleet.rollout.views import (
    AuditPublic,
    GateCheckPublic,
    RolloutDetail,
    StagePublic,
)

# --------------------------------------------------------------------------- --canary


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5", {"count": 5}),
        ("1", {"count": 1}),
        (" 12 ", {"count": 12}),
        ("5.0", {"count": 5}),  # a whole number written as a float is still a count
        ("1e3", {"count": 1000}),
        ("2%", {"percent": 2.0}),
        ("2.5%", {"percent": 2.5}),
        ("100%", {"percent": 100.0}),
        ("0.1%", {"percent": 0.1}),
    ],
)
def test_parse_canary(text: str, expected: dict[str, Any]) -> None:
    parsed = parse_canary(text)
    assert parsed == expected
    assert type(next(iter(parsed.values()))) is type(next(iter(expected.values())))
    Canary.model_validate(parsed)  # what the controller will accept


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2.5", "a count is a whole number"),
        ("five", "'five' is not a number"),
        ("%", "'' is not a number"),
        ("", "'' is not a number"),
        ("5 devices", "'5 devices' is not a number"),
        ("two%", "'two' is not a number"),
    ],
)
def test_parse_canary_refuses(text: str, message: str) -> None:
    with pytest.raises(typer.BadParameter, match=message) as caught:
        parse_canary(text)
    assert caught.value.param_hint == "--canary"


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_parse_canary_refuses_non_finite_counts(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_canary(text)


# --------------------------------------------------------------------------- --gate


def test_parse_gate_with_every_key() -> None:
    text = (
        "p95_latency_ms:max_increase=20,max_decrease=5,max=900,min=1,window=300,"
        "min_samples=5,insufficient=fail,failures=4"
    )
    assert parse_gate(text) == {
        "metric": "p95_latency_ms",
        "max_increase_percent": 20.0,
        "max_decrease_percent": 5.0,
        "max_value": 900.0,
        "min_value": 1.0,
        "window_s": 300.0,
        "min_samples": 5.0,
        "on_insufficient_data": "fail",
        "max_consecutive_failures": 4.0,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("error_rate:max=0.05", {"metric": "error_rate", "max_value": 0.05}),
        (
            " tokens_per_s : max_decrease=15 , window=600 ",
            {"metric": "tokens_per_s", "max_decrease_percent": 15.0, "window_s": 600.0},
        ),
        ("restarts:max=1,", {"metric": "restarts", "max_value": 1.0}),  # a trailing comma
        ("ttft_ms", {"metric": "ttft_ms"}),  # no condition: the controller says so
        ("ttft_ms:", {"metric": "ttft_ms"}),
        (
            "oom:max=0,insufficient=wait",
            {"metric": "oom", "max_value": 0.0, "on_insufficient_data": "wait"},
        ),
    ],
)
def test_parse_gate(text: str, expected: dict[str, Any]) -> None:
    assert parse_gate(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "p95_latency_ms:max_increase=20,window=300,min_samples=5,insufficient=wait",
        "error_rate:max=0.05,failures=2",
        "tokens_per_s:max_decrease=15,min=2",
        "golden_failure_rate:max=0",
    ],
)
def test_parsed_gates_are_valid_gates(text: str) -> None:
    """What the CLI sends must pass the controller's validation (floats for ints included)."""
    parsed = Gate.model_validate(parse_gate(text))
    assert parsed.metric.value == text.split(":")[0]


def test_parsed_gate_ints_arrive_as_ints() -> None:
    parsed = Gate.model_validate(parse_gate("ttft_ms:max=100,min_samples=7,failures=2"))
    assert (parsed.min_samples, parsed.max_consecutive_failures) == (7, 2)
    assert type(parsed.min_samples) is int


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("p95_latency_ms:increase=20", "'increase=20': use key=value with max_increase"),
        ("p95_latency_ms:max_increase", "'max_increase': use key=value"),
        ("p95_latency_ms:max_increase:20", "use key=value"),
        ("p95_latency_ms:Max=20", "'Max=20': use key=value"),  # keys are case-sensitive
        ("p95_latency_ms:max_increase=twenty", "'twenty' is not a number"),
        ("p95_latency_ms:window=5m", "'5m' is not a number"),
    ],
)
def test_parse_gate_refuses(text: str, message: str) -> None:
    with pytest.raises(typer.BadParameter, match=message) as caught:
        parse_gate(text)
    assert caught.value.param_hint == "--gate"


def test_parse_gate_error_lists_the_keys() -> None:
    with pytest.raises(typer.BadParameter) as caught:
        parse_gate("ttft_ms:bogus=1")
    assert caught.value.message == (
        "'bogus=1': use key=value with max_increase, max_decrease, max, min, window, "
        "min_samples, insufficient, failures"
    )


# --------------------------------------------------------------------------- --abort


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "health_check_failed:10%,min=5",
            {"failure": "health_check_failed", "threshold_percent": 10.0, "min_devices": 5},
        ),
        ("any:3", {"failure": "any", "threshold_count": 3}),
        (":3", {"failure": "any", "threshold_count": 3}),  # no kind: any
        ("install_failed:2.5%", {"failure": "install_failed", "threshold_percent": 2.5}),
        (
            " timed_out : 20% , min=10 ",
            {"failure": "timed_out", "threshold_percent": 20.0, "min_devices": 10},
        ),
        ("gate_failed:1,min=1", {"failure": "gate_failed", "threshold_count": 1, "min_devices": 1}),
    ],
)
def test_parse_abort(text: str, expected: dict[str, Any]) -> None:
    parsed = parse_abort(text)
    assert parsed == expected
    AbortRule.model_validate(parsed)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("any", "give a threshold"),
        ("any:", "give a threshold"),
        ("any: , ", "give a threshold"),
        ("any:ten", "'ten' is not a number"),
        ("any:x%", "'x' is not a number"),
        ("any:10%,max=5", "'max=5': the only option is min=N"),
        ("any:10%,min", "'min': the only option is min=N"),
        ("any:10%,min=five", "'five' is not a number"),
    ],
)
def test_parse_abort_refuses(text: str, message: str) -> None:
    with pytest.raises(typer.BadParameter, match=message) as caught:
        parse_abort(text)
    assert caught.value.param_hint == "--abort"


@pytest.mark.parametrize("text", ["any:2.5", "any:3,min=2.5"])
def test_parse_abort_refuses_fractional_counts(text: str) -> None:
    with pytest.raises(typer.BadParameter, match="whole number"):
        parse_abort(text)


@pytest.mark.parametrize("text", ["any:nan", "any:inf", "any:3,min=nan"])
def test_parse_abort_refuses_non_finite_counts(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_abort(text)


# --------------------------------------------------------------------------- --window


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("02:00-05:00", {"start": "02:00", "end": "05:00"}),
        (
            "22:00-04:00@Europe/Berlin",
            {"start": "22:00", "end": "04:00", "timezone": "Europe/Berlin"},
        ),
        (" 22:00 - 04:00 @ UTC ", {"start": "22:00", "end": "04:00", "timezone": "UTC"}),
        ("22:00-04:00@", {"start": "22:00", "end": "04:00"}),  # an empty zone: the default
        (
            "01:00-02:00@America/Argentina/Buenos_Aires",
            {"start": "01:00", "end": "02:00", "timezone": "America/Argentina/Buenos_Aires"},
        ),
    ],
)
def test_parse_window(text: str, expected: dict[str, Any]) -> None:
    parsed = parse_window(text)
    assert parsed == expected
    MaintenanceWindow.model_validate(parsed)


@pytest.mark.parametrize("text", ["02:00", "0200", "", "@UTC", "22:00 to 04:00"])
def test_parse_window_refuses(text: str) -> None:
    with pytest.raises(typer.BadParameter, match=r"use HH:MM-HH:MM\[@Zone\]") as caught:
        parse_window(text)
    assert caught.value.param_hint == "--window"


def test_parse_window_leaves_clock_checks_to_the_controller() -> None:
    """The shape is checked here; the times and the zone by the spec, naming the field."""
    assert parse_window("25:00-04:00@Nowhere") == {
        "start": "25:00",
        "end": "04:00",
        "timezone": "Nowhere",
    }


# --------------------------------------------------------------------------- render_status

T0 = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
SPEC = RolloutSpec.model_validate(
    {
        "name": "gemma 1.1",
        "change": {"model": "gemma3-270m", "version": "1.1"},
        "target": {"groups": ["lab"]},
        "canary": {"count": 2},
        "stages": {"kind": "waves", "percents": [10, 50, 100]},
        "gates": [
            {"metric": "p95_latency_ms", "max_increase_percent": 20},
            {"metric": "error_rate", "max_value": 0.05},
        ],
        "abort_rules": [{"failure": "any", "threshold_count": 5}],
    }
)
STAGE_DEVICES = [
    {"updated": 2},
    {"updated": 7, "failed": 1},
    {"updated": 21, "updating": 9, "queued": 4, "failed": 2, "timed_out": 3},
    {},
]


def gate_check(index: int, updated: Cohort, baseline: Cohort, decision: str) -> GateCheckPublic:
    result = check_gate(SPEC.gates[index], updated, baseline, Cohort())
    return GateCheckPublic(
        stage=2,
        gate=index,
        at=T0,
        verdict=result.verdict,
        decision=decision,
        reasons=result.reasons,
        evidence=result.evidence,
    )


def detail(**changes: Any) -> dict[str, Any]:
    """A detail as the API sends it: RolloutDetail dumped to JSON."""
    quotas = stage_quotas(SPEC, 80)
    names = stage_names(SPEC)
    slow = Cohort(samples=[Sample(10, 0, p95_ms=180)] * 3)
    fast = Cohort(samples=[Sample(10, 0, p95_ms=100)] * 3)
    errors = Cohort(samples=[Sample(100, 1)] * 3)
    fields: dict[str, Any] = {
        "id": "ro-7f3a",
        "name": SPEC.name,
        "kind": "model",
        "change": "gemma3-270m 1.1",
        "model": "gemma3-270m",
        "version": "1.1",
        "policy": None,
        "policy_version": None,
        "status": "active",
        "stage": 2,
        "stage_name": names[2],
        "stages": len(names),
        "phase": "soaking",
        "devices": {"updated": 30, "updating": 9, "queued": 4, "failed": 3, "timed_out": 3},
        "reason": "",
        "created_by": "admin",
        "created_at": T0,
        "updated_at": T0 + timedelta(minutes=30),
        "finished_at": None,
        "spec": SPEC.model_dump(mode="json"),
        "stage_progress": [
            StagePublic(index=i, name=name, quota=quotas[i], devices=STAGE_DEVICES[i])
            for i, name in enumerate(names)
        ],
        "failures": {"install_failed": 2, "health_check_failed": 1, "timed_out": 3},
        "gate_checks": [
            gate_check(0, slow, fast, "wait"),
            gate_check(1, errors, errors, "pass"),
            gate_check(0, fast, fast, "pass"),  # older than the latest per gate: not shown
        ],
        "audit": [
            AuditPublic(
                at=T0 + timedelta(minutes=m),
                actor="admin" if action in {"created", "approved"} else "engine",
                action=action,
                subject="rollout:ro-7f3a",
                reason=reason,
                data={},
            )
            for m, action, reason in [
                (25, "stage_started", "stage 3 (50%)"),
                (20, "stage_started", "stage 2 (10%)"),
                (10, "approved", "looks fine"),
                (5, "stage_started", "stage 1 (canary)"),
                (1, "gate_passed", "canary soaked"),
                (0, "created", "first try"),
            ]
        ],
    }
    return RolloutDetail(**(fields | changes)).model_dump(mode="json")


def render(data: dict[str, Any]) -> str:
    console = Console(record=True, width=120, color_system=None)
    console.print(render_status(data))
    return console.export_text()


def lines_with(text: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if word in line]


def test_render_status_heading() -> None:
    text = render(detail())
    assert text.splitlines()[0] == "ro-7f3a gemma3-270m 1.1  active  stage 3/4 50% (soaking)"


def test_render_status_stages_and_counts() -> None:
    """One row per stage: quota, updated, updating (queued included), failed, timed out, back."""
    text = render(detail())
    rows = {}
    for name in ("canary", "10%", "50%", "100%"):
        (line,) = [row for row in lines_with(text, name) if row.split()[0] == name]
        words = line.split()
        rows[name] = [words[1], *words[-5:]]  # the bar between has no words
    assert rows == {
        "canary": ["2", "2", "0", "0", "0", "0"],
        "10%": ["8", "7", "0", "1", "0", "0"],
        "50%": ["40", "21", "13", "2", "3", "0"],
        "100%": ["80", "0", "0", "0", "0", "0"],
    }


def test_render_status_overall_devices() -> None:
    text = render(detail())
    assert lines_with(text, "devices:") == [
        "devices: 3 failed, 4 queued, 3 timed_out, 30 updated, 9 updating"
    ]


def test_render_status_shows_the_latest_check_per_gate_with_evidence() -> None:
    text = render(detail())
    gates = lines_with(text, "gate ")
    assert len(gates) == 2  # two gates: the two newest checks, not the older third
    assert gates[0].startswith("gate 0 p95_latency_ms: fail -> wait  updated 180.0 baseline 100.0")
    assert "control None" in gates[0]
    reason = "(p95_latency_ms 180 is +80.0% against the baseline 100 (at most +20%))"
    assert reason in " ".join(text.split())  # the reasons follow, wrapped at the width
    assert gates[1].startswith("gate 1 error_rate: pass -> pass  updated 0.01")


def test_render_status_shows_the_five_newest_audit_entries() -> None:
    text = render(detail())
    assert "2025-06-02 12:25:00 engine: stage_started stage 3 (50%)" in text
    assert "2025-06-02 12:10:00 admin: approved looks fine" in text
    assert "2025-06-02 12:01:00 engine: gate_passed canary soaked" in text
    assert "first try" not in text  # the sixth entry


def test_render_status_reason_of_an_aborted_rollout() -> None:
    reason = "abort rule: 5 device(s) failed, threshold 5 (40 finished)"
    text = render(detail(status="aborted", reason=reason, finished_at=T0 + timedelta(hours=1)))
    assert "ro-7f3a gemma3-270m 1.1  aborted  stage 3/4 50% (soaking)" in text
    assert text.splitlines()[1] == reason


def test_render_status_without_gates_or_history() -> None:
    """A fresh rollout: no checks, no reason line, an empty stage table still renders."""
    spec = RolloutSpec.model_validate(
        {"change": {"model": "gemma3-270m", "version": "1.1"}, "target": {"devices": ["d1"]}}
    )
    data = detail(
        spec=spec.model_dump(mode="json"),
        stage=0,
        stage_name="100%",
        stages=1,
        phase="rolling",
        devices={"pending": 1},
        stage_progress=[StagePublic(index=0, name="100%", quota=1, devices={})],
        failures={"timed_out": 0},
        gate_checks=[],
        audit=[],
    )
    text = render(data)
    lines = text.splitlines()
    assert lines[0] == "ro-7f3a gemma3-270m 1.1  active  stage 1/1 100% (rolling)"
    assert lines_with(text, "devices:") == ["devices: 1 pending"]
    assert not lines_with(text, "gate ")
    assert lines[-1].strip() == "devices: 1 pending"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("edge-default", {"kind": "policy", "policy": "edge-default"}),
        ("edge-default:2", {"kind": "policy", "policy": "edge-default", "version": 2}),
        (" edge-default :3", {"kind": "policy", "policy": "edge-default", "version": 3}),
    ],
)
def test_parse_policy(text: str, expected: dict[str, Any]) -> None:
    assert parse_policy(text) == expected
    change = RolloutSpec.model_validate({"change": expected, "target": {"groups": ["lab"]}})
    assert change.change.kind == "policy"


@pytest.mark.parametrize(
    ("text", "message"), [("p:two", "not a number"), ("p:1.5", "whole"), ("p:0", "start at 1")]
)
def test_parse_policy_refuses(text: str, message: str) -> None:
    with pytest.raises(typer.BadParameter, match=message):
        parse_policy(text)


def test_parse_change_is_a_model_or_a_policy_never_both() -> None:
    assert parse_change("gemma3", "2.0", None) == {"model": "gemma3", "version": "2.0"}
    assert parse_change(None, None, "p:2") == {"kind": "policy", "policy": "p", "version": 2}
    for model, version in (("gemma3", None), (None, "2.0"), ("gemma3", "2.0")):
        with pytest.raises(typer.BadParameter, match="--policy"):
            parse_change(model, version, "p")
    with pytest.raises(typer.BadParameter, match="--model and --version"):
        parse_change("gemma3", None, None)


def test_render_status_of_a_policy_rollout() -> None:
    text = render(
        detail(
            kind="policy",
            change="policy edge-default v2",
            model=None,
            version=None,
            policy="edge-default",
            policy_version=2,
        )
    )
    assert text.splitlines()[0] == (
        "ro-7f3a policy edge-default v2  active  stage 3/4 50% (soaking)"
    )
