"""The rollout spec (fleet.rollout.spec): bad input is refused naming the field; facts filters."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pydantic import ValidationError

from fleet.registry.variants import normalise_arch
from fleet.rollout.members import matches_facts
from fleet.rollout.spec import (
    AbortRule,
    Canary,
    ExponentialRate,
    FactFilter,
    FailureKind,
    Gate,
    MaintenanceWindow,
    Metric,
    ModelChangeSpec,
    PolicyChangeSpec,
    RolloutSpec,
    Target,
    Waves,
)
from models.device import DeviceReport, GpuInfo

BASE: dict[str, Any] = {
    "change": {"model": "gemma3-270m", "version": "1.1"},
    "target": {"groups": ["lab"]},
}

FULL: dict[str, Any] = {
    "name": "gemma 1.1 to the lab",
    "change": {"kind": "model", "model": "gemma3-270m", "version": "1.1"},
    "target": {
        "groups": ["lab", "shop-floor"],
        "tags": ["site=berlin"],
        "devices": ["dev-1", "dev-2"],
        "facts": {
            "arch": ["aarch64", "x86_64"],
            "min_ram_bytes": 2 * 2**30,
            "max_ram_bytes": 64 * 2**30,
            "gpu": True,
            "agent_version": "0.4",
        },
    },
    "canary": {"percent": 2.5},
    "stages": {"kind": "waves", "percents": [10, 50, 100]},
    "soak_s": 900,
    "check_interval_s": 30,
    "approval": True,
    "max_concurrent": 50,
    "device_timeout_s": 7200,
    "maintenance_window": {"start": "22:00", "end": "04:00", "timezone": "Europe/Berlin"},
    "gates": [
        {
            "metric": "p95_latency_ms",
            "window_s": 600,
            "min_samples": 5,
            "max_increase_percent": 20,
            "on_insufficient_data": "fail",
            "max_consecutive_failures": 2,
        },
        {"metric": "error_rate", "max_value": 0.05},
        {"metric": "tokens_per_s", "max_decrease_percent": 15, "min_value": 1},
    ],
    "abort_rules": [
        {"failure": "health_check_failed", "threshold_percent": 10, "min_devices": 5},
        {"failure": "any", "threshold_count": 3},
    ],
}


def spec(**changes: Any) -> dict[str, Any]:
    """BASE with top-level fields replaced."""
    return {**BASE, **changes}


def errors_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as caught:
        RolloutSpec.model_validate(data)
    return [dict(e) for e in caught.value.errors()]


def locs(data: dict[str, Any]) -> set[tuple[str | int, ...]]:
    return {tuple(e["loc"]) for e in errors_of(data)}


# --------------------------------------------------------------------------- good specs


def test_minimal_spec_takes_the_defaults() -> None:
    """A change and a target are all an admin must give; the rest is one 100% wave."""
    parsed = RolloutSpec.model_validate(BASE)
    assert parsed.stages == Waves(percents=[100])
    assert parsed.canary is None
    assert parsed.gates == []
    assert parsed.abort_rules == []
    assert parsed.maintenance_window is None
    assert (parsed.soak_s, parsed.check_interval_s, parsed.device_timeout_s) == (600, 60, 3600)
    assert parsed.approval is False
    assert parsed.max_concurrent is None
    assert parsed.name == ""


def test_full_spec_round_trips_through_json() -> None:
    """The spec is stored as JSON and read back on every step: it must come back the same."""
    parsed = RolloutSpec.model_validate(FULL)
    dumped = parsed.model_dump(mode="json")
    assert RolloutSpec.model_validate(dumped) == parsed
    assert RolloutSpec.model_validate_json(json.dumps(dumped)) == parsed
    assert dumped["stages"] == {"kind": "waves", "percents": [10.0, 50.0, 100.0]}
    assert dumped["gates"][0]["metric"] == "p95_latency_ms"
    assert dumped["abort_rules"][0]["failure"] == "health_check_failed"
    assert dumped["abort_rules"][1]["failure"] == "any"


def test_parsed_types_are_the_enums() -> None:
    """The engine compares with the enums: strings from JSON must become them."""
    parsed = RolloutSpec.model_validate(FULL)
    assert parsed.gates[0].metric is Metric.P95_LATENCY_MS
    assert parsed.abort_rules[0].failure is FailureKind.HEALTH_CHECK_FAILED
    assert parsed.abort_rules[1].failure == "any"
    assert isinstance(parsed.stages, Waves)


def test_exponential_stage_round_trips() -> None:
    data = spec(
        stages={"kind": "exponential", "start_per_minute": 5, "factor": 2, "max_per_minute": 100}
    )
    parsed = RolloutSpec.model_validate(data)
    assert parsed.stages == ExponentialRate(start_per_minute=5, factor=2, max_per_minute=100)
    assert RolloutSpec.model_validate(parsed.model_dump(mode="json")) == parsed


def test_spec_is_frozen() -> None:
    """A stored spec is read, never changed in place."""
    parsed = RolloutSpec.model_validate(BASE)
    with pytest.raises(ValidationError):
        parsed.soak_s = 1


@pytest.mark.parametrize(
    "target",
    [
        {"groups": ["lab"]},
        {"tags": ["site=berlin"]},
        {"devices": ["dev-1"]},
        {"facts": {"arch": ["aarch64"]}},
        {"facts": {"gpu": False}},  # False is a condition, not an absent one
        {"facts": {"min_ram_bytes": 0}},
        {"facts": {"agent_version": "0.4"}},
    ],
)
def test_any_one_selector_makes_a_target(target: dict[str, Any]) -> None:
    assert Target.model_validate(target).model_dump(exclude_defaults=True) == target


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        ({"kind": "waves", "percents": [100]}, [100.0]),
        ({"kind": "waves", "percents": [0.5, 100]}, [0.5, 100.0]),
        ({"kind": "waves", "percents": [1, 10, 50, 100]}, [1.0, 10.0, 50.0, 100.0]),
    ],
)
def test_good_waves(stages: dict[str, Any], expected: list[float]) -> None:
    parsed = RolloutSpec.model_validate(spec(stages=stages))
    assert isinstance(parsed.stages, Waves)
    assert parsed.stages.percents == expected


def test_exponential_max_equal_to_start_is_allowed() -> None:
    """A constant rate is a valid (if dull) exponential stage."""
    rate = ExponentialRate(start_per_minute=10, factor=1.5, max_per_minute=10)
    assert rate.max_per_minute == rate.start_per_minute == 10


@pytest.mark.parametrize(("start", "end"), [("00:00", "23:59"), ("22:00", "04:00")])
def test_good_windows(start: str, end: str) -> None:
    window = MaintenanceWindow(start=start, end=end)
    assert window.timezone == "UTC"
    assert [t.isoformat(timespec="minutes") for t in window.bounds()] == [start, end]


@pytest.mark.parametrize(
    "gate",
    [
        {"metric": "p95_latency_ms", "max_increase_percent": 0},  # 0 is a condition
        {"metric": "tokens_per_s", "max_decrease_percent": 100},
        {"metric": "error_rate", "max_value": 1},  # the top of a fraction
        {"metric": "restarts", "max_value": 3},  # not a fraction: above 1 is fine
        {"metric": "ttft_ms", "min_value": 0},
    ],
)
def test_good_gates(gate: dict[str, Any]) -> None:
    parsed = Gate.model_validate(gate)
    assert parsed.metric == gate["metric"]
    assert (parsed.window_s, parsed.min_samples, parsed.on_insufficient_data) == (300, 3, "wait")
    assert parsed.max_consecutive_failures == 3


# --------------------------------------------------------------------------- bad specs

BAD: dict[str, tuple[dict[str, Any], tuple[str | int, ...], str]] = {
    # id: (spec, the error's location, words the message must contain)
    "empty target": (spec(target={}), ("target",), "target is empty"),
    "empty lists and an empty filter": (
        spec(target={"groups": [], "tags": [], "devices": [], "facts": {}}),
        ("target",),
        "target is empty",
    ),
    "bad group name": (spec(target={"groups": ["-lab"]}), ("target", "groups", 0), "pattern"),
    "bad device name": (spec(target={"devices": ["a b"]}), ("target", "devices", 0), "pattern"),
    "negative ram": (
        spec(target={"facts": {"min_ram_bytes": -1}}),
        ("target", "facts", "min_ram_bytes"),
        "greater than or equal to 0",
    ),
    "canary with count and percent": (
        spec(canary={"count": 2, "percent": 5}),
        ("canary",),
        "exactly one",
    ),
    "canary with neither": (spec(canary={}), ("canary",), "exactly one"),
    "canary count 0": (spec(canary={"count": 0}), ("canary", "count"), "greater than or equal"),
    "canary percent 0": (spec(canary={"percent": 0}), ("canary", "percent"), "greater than 0"),
    "canary percent over 100": (
        spec(canary={"percent": 101}),
        ("canary", "percent"),
        "less than or equal to 100",
    ),
    "waves descending": (
        spec(stages={"kind": "waves", "percents": [50, 10, 100]}),
        ("stages", "waves", "percents"),
        "must grow",
    ),
    "waves repeated": (
        spec(stages={"kind": "waves", "percents": [10, 10, 100]}),
        ("stages", "waves", "percents"),
        "must grow",
    ),
    "waves not ending at 100": (
        spec(stages={"kind": "waves", "percents": [10, 50]}),
        ("stages", "waves", "percents"),
        "reach 100",
    ),
    "wave of 0": (
        spec(stages={"kind": "waves", "percents": [0, 100]}),
        ("stages", "waves", "percents"),
        "(0, 100]",
    ),
    "wave over 100": (
        spec(stages={"kind": "waves", "percents": [50, 150]}),
        ("stages", "waves", "percents"),
        "(0, 100]",
    ),
    "no waves": (
        spec(stages={"kind": "waves", "percents": []}),
        ("stages", "waves", "percents"),
        "at least 1",
    ),
    "unknown stage kind": (
        spec(stages={"kind": "linear", "percents": [100]}),
        ("stages",),
        "does not match any of the expected tags",
    ),
    "exponential max below start": (
        spec(
            stages={
                "kind": "exponential",
                "start_per_minute": 10,
                "factor": 2,
                "max_per_minute": 5,
            }
        ),
        ("stages", "exponential"),
        "max_per_minute must be at least start_per_minute",
    ),
    "exponential factor 1": (
        spec(
            stages={"kind": "exponential", "start_per_minute": 1, "factor": 1, "max_per_minute": 5}
        ),
        ("stages", "exponential", "factor"),
        "greater than 1",
    ),
    "exponential factor below 1": (
        spec(
            stages={
                "kind": "exponential",
                "start_per_minute": 1,
                "factor": 0.5,
                "max_per_minute": 5,
            }
        ),
        ("stages", "exponential", "factor"),
        "greater than 1",
    ),
    "exponential start 0": (
        spec(
            stages={"kind": "exponential", "start_per_minute": 0, "factor": 2, "max_per_minute": 5}
        ),
        ("stages", "exponential", "start_per_minute"),
        "greater than or equal to 1",
    ),
    "gate with no condition": (
        spec(gates=[{"metric": "p95_latency_ms"}]),
        ("gates", 0),
        "a gate needs a condition",
    ),
    "gate on an unknown metric": (
        spec(gates=[{"metric": "vibes", "max_value": 1}]),
        ("gates", 0, "metric"),
        "Input should be",
    ),
    "error_rate max_value above 1": (
        spec(gates=[{"metric": "error_rate", "max_value": 5}]),
        ("gates", 0),
        "error_rate is a fraction",
    ),
    "fallback_rate max_value above 1": (
        spec(gates=[{"metric": "fallback_rate", "max_value": 1.5}]),
        ("gates", 0),
        "fallback_rate is a fraction",
    ),
    "golden_failure_rate max_value above 1": (
        spec(gates=[{"metric": "golden_failure_rate", "max_value": 2}]),
        ("gates", 0),
        "golden_failure_rate is a fraction",
    ),
    "gate window 0": (
        spec(gates=[{"metric": "ttft_ms", "max_value": 100, "window_s": 0}]),
        ("gates", 0, "window_s"),
        "greater than 0",
    ),
    "gate decrease over 100": (
        spec(gates=[{"metric": "tokens_per_s", "max_decrease_percent": 101}]),
        ("gates", 0, "max_decrease_percent"),
        "less than or equal to 100",
    ),
    "gate unknown insufficient rule": (
        spec(gates=[{"metric": "ttft_ms", "max_value": 1, "on_insufficient_data": "pass"}]),
        ("gates", 0, "on_insufficient_data"),
        "'wait' or 'fail'",
    ),
    "abort rule with both thresholds": (
        spec(abort_rules=[{"threshold_percent": 10, "threshold_count": 3}]),
        ("abort_rules", 0),
        "threshold_percent or a threshold_count",
    ),
    "abort rule with neither threshold": (
        spec(abort_rules=[{"failure": "install_failed"}]),
        ("abort_rules", 0),
        "threshold_percent or a threshold_count",
    ),
    "abort rule min_devices 0": (
        spec(abort_rules=[{"threshold_count": 1, "min_devices": 0}]),
        ("abort_rules", 0, "min_devices"),
        "greater than or equal to 1",
    ),
    "window in an unknown zone": (
        spec(maintenance_window={"start": "22:00", "end": "04:00", "timezone": "Mars/Olympus"}),
        ("maintenance_window", "timezone"),
        "unknown time zone 'Mars/Olympus'",
    ),
    "window zone as a path": (
        spec(maintenance_window={"start": "22:00", "end": "04:00", "timezone": "../etc/passwd"}),
        ("maintenance_window", "timezone"),
        "unknown time zone",
    ),
    "window zone empty": (
        spec(maintenance_window={"start": "22:00", "end": "04:00", "timezone": ""}),
        ("maintenance_window", "timezone"),
        "unknown time zone",
    ),
    "window start 24:00": (
        spec(maintenance_window={"start": "24:00", "end": "04:00"}),
        ("maintenance_window", "start"),
        "pattern",
    ),
    "window end without a leading zero": (
        spec(maintenance_window={"start": "22:00", "end": "4:00"}),
        ("maintenance_window", "end"),
        "pattern",
    ),
    "window minutes 60": (
        spec(maintenance_window={"start": "22:60", "end": "04:00"}),
        ("maintenance_window", "start"),
        "pattern",
    ),
    "window with seconds": (
        spec(maintenance_window={"start": "22:00:00", "end": "04:00"}),
        ("maintenance_window", "start"),
        "pattern",
    ),
    "window start equals end": (
        spec(maintenance_window={"start": "03:00", "end": "03:00"}),
        ("maintenance_window",),
        "different start and end",
    ),
    "bad model name": (
        spec(change={"model": "Gemma 3", "version": "1.1"}),
        ("change", "model"),
        "pattern",
    ),
    "bad version": (
        spec(change={"model": "gemma3-270m", "version": "../1"}),
        ("change", "version"),
        "pattern",
    ),
    "device timeout 0": (spec(device_timeout_s=0), ("device_timeout_s",), "greater than 0"),
    "negative soak": (spec(soak_s=-1), ("soak_s",), "greater than or equal to 0"),
    "check interval 0": (spec(check_interval_s=0), ("check_interval_s",), "greater than 0"),
    "max_concurrent 0": (spec(max_concurrent=0), ("max_concurrent",), "greater than or equal"),
    "too many gates": (
        spec(gates=[{"metric": "ttft_ms", "max_value": 1}] * 17),
        ("gates",),
        "at most 16",
    ),
}


@pytest.mark.parametrize(("data", "loc", "words"), BAD.values(), ids=BAD.keys())
def test_bad_spec_names_the_field(
    data: dict[str, Any], loc: tuple[str | int, ...], words: str
) -> None:
    """A bad request is a 422 naming the field, so the admin knows what to fix."""
    errors = errors_of(data)
    assert [tuple(e["loc"]) for e in errors] == [loc]
    assert words in errors[0]["msg"]


EXTRA: dict[str, tuple[dict[str, Any], tuple[str | int, ...]]] = {
    "top level": (spec(priority=1), ("priority",)),
    "change": (spec(change={"model": "m", "version": "1", "variant": "Q4"}), ("change", "variant")),
    "target": (spec(target={"groups": ["lab"], "sites": ["x"]}), ("target", "sites")),
    "facts": (spec(target={"facts": {"cpu": "arm"}}), ("target", "facts", "cpu")),
    "canary": (spec(canary={"count": 1, "soak_s": 5}), ("canary", "soak_s")),
    "waves": (spec(stages={"kind": "waves", "percents": [100], "x": 1}), ("stages", "waves", "x")),
    "gate": (spec(gates=[{"metric": "ttft_ms", "max_value": 1, "max": 2}]), ("gates", 0, "max")),
    "abort rule": (
        spec(abort_rules=[{"threshold_count": 1, "min": 2}]),
        ("abort_rules", 0, "min"),
    ),
    "window": (
        spec(maintenance_window={"start": "01:00", "end": "02:00", "tz": "UTC"}),
        ("maintenance_window", "tz"),
    ),
}


@pytest.mark.parametrize(("data", "loc"), EXTRA.values(), ids=EXTRA.keys())
def test_unknown_fields_are_refused(data: dict[str, Any], loc: tuple[str | int, ...]) -> None:
    """A misspelt option must not be silently dropped (extra=forbid at every level)."""
    errors = errors_of(data)
    assert [(tuple(e["loc"]), e["type"]) for e in errors] == [(loc, "extra_forbidden")]


def test_unknown_failure_kind_names_the_field() -> None:
    """``failure`` is a kind or "any": the error names the field under both members."""
    errors = errors_of(spec(abort_rules=[{"failure": "sad", "threshold_count": 1}]))
    assert [tuple(e["loc"][:3]) for e in errors] == [("abort_rules", 0, "failure")] * 2
    assert "'install_failed'" in errors[0]["msg"]
    assert "'any'" in errors[1]["msg"]


@pytest.mark.parametrize("field", ["change", "target"])
def test_change_and_target_are_required(field: str) -> None:
    data = dict(BASE)
    del data[field]
    assert [(tuple(e["loc"]), e["type"]) for e in errors_of(data)] == [((field,), "missing")]


def test_several_errors_are_all_named() -> None:
    """One 422 lists every bad field, not just the first."""
    data = spec(canary={}, soak_s=-1, maintenance_window={"start": "01:00", "end": "01:00"})
    assert locs(data) == {("canary",), ("soak_s",), ("maintenance_window",)}


def test_parts_validate_alone() -> None:
    """The parts are models in their own right (the CLI and engine build them directly)."""
    with pytest.raises(ValidationError, match="exactly one"):
        Canary()
    with pytest.raises(ValidationError, match="threshold_percent or a threshold_count"):
        AbortRule()
    with pytest.raises(ValidationError, match="a gate needs a condition"):
        Gate(metric=Metric.OOM)
    assert FactFilter().is_empty()
    assert not FactFilter(gpu=False).is_empty()
    assert not FactFilter(max_ram_bytes=0).is_empty()


def test_nan_wave_is_refused() -> None:
    """JSON bodies may carry NaN (Python's json and pydantic both accept it)."""
    data = spec(stages={"kind": "waves", "percents": [math.nan, 100]})
    assert locs(data) == {("stages", "waves", "percents", 0)}


# --------------------------------------------------------------------------- the facts filter

GiB = 2**30


def report(
    arch: str = "x86_64", ram_gib: float = 8, *, gpu: bool = False, zone: str | None = None
) -> DeviceReport:
    ram = int(ram_gib * GiB)
    gpus = [GpuInfo(index=0, name="NVIDIA L4", memory_total_bytes=24 * GiB, source="nvml")]
    return DeviceReport(
        hostname="d",
        os="Linux",
        kernel="6.8",
        arch=arch,
        cpu_physical_cores=4,
        cpu_logical_cores=8,
        ram_total_bytes=ram,
        ram_available_bytes=ram // 2,
        gpus=gpus if gpu else [],
        timezone=zone,
    )


FACTS: dict[str, tuple[dict[str, Any], DeviceReport | None, str, bool]] = {
    # id: (filter, report, agent version, matches)
    "empty filter, unknown device": ({}, None, "", True),
    "arch listed": ({"arch": ["x86_64"]}, report("x86_64"), "0.4.0", True),
    "arch not listed": ({"arch": ["x86_64"]}, report("aarch64"), "0.4.0", False),
    "arch any of": ({"arch": ["riscv64", "aarch64"]}, report("aarch64"), "0.4.0", True),
    "filter arm64 matches aarch64": ({"arch": ["arm64"]}, report("aarch64"), "0.4.0", True),
    "report arm64 matches aarch64": ({"arch": ["aarch64"]}, report("arm64"), "0.4.0", True),
    "filter amd64 matches x86_64": ({"arch": ["amd64"]}, report("x86_64"), "0.4.0", True),
    "arm64 does not match x86_64": ({"arch": ["arm64"]}, report("x86_64"), "0.4.0", False),
    "ram at the minimum": ({"min_ram_bytes": 8 * GiB}, report(ram_gib=8), "0.4.0", True),
    "ram below the minimum": ({"min_ram_bytes": 8 * GiB}, report(ram_gib=7.9), "0.4.0", False),
    "ram at the maximum": ({"max_ram_bytes": 4 * GiB}, report(ram_gib=4), "0.4.0", True),
    "ram above the maximum": ({"max_ram_bytes": 4 * GiB}, report(ram_gib=4.1), "0.4.0", False),
    "ram in a band": (
        {"min_ram_bytes": 2 * GiB, "max_ram_bytes": 16 * GiB},
        report(ram_gib=8),
        "0.4.0",
        True,
    ),
    "gpu wanted, has one": ({"gpu": True}, report(gpu=True), "0.4.0", True),
    "gpu wanted, has none": ({"gpu": True}, report(gpu=False), "0.4.0", False),
    "no gpu wanted, has none": ({"gpu": False}, report(gpu=False), "0.4.0", True),
    "no gpu wanted, has one": ({"gpu": False}, report(gpu=True), "0.4.0", False),
    "agent version prefix": ({"agent_version": "0.4"}, report(), "0.4.2", True),
    "agent version exact": ({"agent_version": "0.4.2"}, report(), "0.4.2", True),
    "agent version other": ({"agent_version": "0.4"}, report(), "0.3.9", False),
    "agent version never reported": ({"agent_version": "0.4"}, report(), "", False),
    "unknown device, agent version only": ({"agent_version": "0.4"}, None, "0.4.1", True),
    "unknown device, agent version mismatch": ({"agent_version": "0.4"}, None, "0.5.0", False),
    "unknown device, arch": ({"arch": ["x86_64"]}, None, "0.4.0", False),
    "unknown device, min ram 0": ({"min_ram_bytes": 0}, None, "0.4.0", False),
    "unknown device, gpu False": ({"gpu": False}, None, "0.4.0", False),
    "every field matches": (
        {
            "arch": ["aarch64"],
            "min_ram_bytes": 4 * GiB,
            "max_ram_bytes": 16 * GiB,
            "gpu": True,
            "agent_version": "0.4",
        },
        report("aarch64", 8, gpu=True),
        "0.4.7",
        True,
    ),
    "every field but one matches": (
        {
            "arch": ["aarch64"],
            "min_ram_bytes": 4 * GiB,
            "max_ram_bytes": 16 * GiB,
            "gpu": True,
            "agent_version": "0.4",
        },
        report("aarch64", 8, gpu=False),
        "0.4.7",
        False,
    ),
}


@pytest.mark.parametrize(
    ("facts", "device_report", "agent_version", "expected"), FACTS.values(), ids=FACTS.keys()
)
def test_matches_facts(
    facts: dict[str, Any], device_report: DeviceReport | None, agent_version: str, expected: bool
) -> None:
    """Every stated field must match; a device that never reported matches no hardware filter."""
    assert matches_facts(FactFilter.model_validate(facts), device_report, agent_version) is expected


@pytest.mark.parametrize(
    ("wanted", "reported"),
    [("x86_64", "AMD64"), ("aarch64", "ARM64"), ("x86_64", "x64"), ("aarch64", "armv8")],
)
def test_arch_spellings_match_as_variants_read_them(wanted: str, reported: str) -> None:
    """The filter and the variant choice must agree on what an arch is."""
    assert normalise_arch(reported) == wanted
    assert matches_facts(FactFilter(arch=[wanted]), report(reported), "0.4.0") is True


def test_agent_version_prefix_stops_at_a_dot() -> None:
    assert matches_facts(FactFilter(agent_version="0.4"), None, "0.41.0") is False


# --------------------------------------------------------------------------- the change


def test_a_change_without_a_kind_is_a_model_change() -> None:
    """Stored specs and older bodies name no kind: they still parse, as model changes."""
    parsed = RolloutSpec.model_validate(BASE)
    assert isinstance(parsed.change, ModelChangeSpec)
    assert parsed.change.kind == "model"


def test_a_policy_change_parses_and_round_trips() -> None:
    data = spec(change={"kind": "policy", "policy": "edge-default", "version": 2})
    parsed = RolloutSpec.model_validate(data)
    assert isinstance(parsed.change, PolicyChangeSpec)
    assert (parsed.change.policy, parsed.change.version) == ("edge-default", 2)
    dumped = json.loads(json.dumps(parsed.model_dump(mode="json")))
    assert RolloutSpec.model_validate(dumped) == parsed
    latest = RolloutSpec.model_validate(spec(change={"kind": "policy", "policy": "edge-default"}))
    assert isinstance(latest.change, PolicyChangeSpec)
    assert latest.change.version is None


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"kind": "policy", "policy": "Edge Default"}, ("change", "policy")),
        ({"kind": "policy", "policy": "p", "version": 0}, ("change", "version")),
        ({"kind": "policy", "policy": "p", "version": "two"}, ("change", "version")),
        ({"kind": "policy"}, ("change", "policy")),
        ({"kind": "policy", "policy": "p", "model": "m"}, ("change", "model")),
        ({"kind": "model", "policy": "p"}, ("change", "model")),
        ({"kind": "profile", "profile": "p"}, ("change",)),
    ],
)
def test_a_bad_change_names_the_field_without_the_kind(
    change: dict[str, Any], loc: tuple[str, ...]
) -> None:
    """``change.version``, as for the rest of the body, not ``change.policy.version``."""
    assert loc in locs(spec(change=change))


def test_policy_rejected_is_a_failure_kind_an_abort_rule_can_name() -> None:
    rule = AbortRule.model_validate({"failure": "policy_rejected", "threshold_count": 1})
    assert rule.failure is FailureKind.POLICY_REJECTED
