"""Health gates (fleet.rollout.gates): each metric, and verdicts with the evidence behind them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleet.rollout.gates import Cohort, Measured, Sample, check_gate, measure
from fleet.rollout.spec import Gate, Metric


def gate(metric: str, **fields: Any) -> Gate:
    return Gate.model_validate({"metric": metric, **fields})


def latency(*values: float, requests: int = 10) -> Cohort:
    """A cohort whose samples all carry ``requests`` requests and these p95 values."""
    return Cohort(samples=[Sample(requests=requests, errors=0, p95_ms=v) for v in values])


def speed(*values: float) -> Cohort:
    return Cohort(samples=[Sample(requests=10, errors=0, tokens_per_s=v) for v in values])


EMPTY = Cohort()

# --------------------------------------------------------------------------- measure


def test_p95_is_weighted_by_requests() -> None:
    """A busy device's latency counts more than an idle one's: (100*90 + 400*10) / 100."""
    cohort = Cohort(
        samples=[
            Sample(requests=90, errors=0, p95_ms=100),
            Sample(requests=10, errors=0, p95_ms=400),
        ]
    )
    assert measure(Metric.P95_LATENCY_MS, cohort) == Measured(130.0, 2)


def test_weighted_metrics_skip_idle_and_unknown_samples() -> None:
    """A sample with no requests or no value is not a data point (nor a sample)."""
    cohort = Cohort(
        samples=[
            Sample(requests=0, errors=0, p95_ms=9999, ttft_ms=9999, tokens_per_s=1),
            Sample(requests=5, errors=0, p95_ms=None, ttft_ms=50, tokens_per_s=None),
            Sample(requests=5, errors=0, p95_ms=200, ttft_ms=70, tokens_per_s=30),
        ]
    )
    assert measure(Metric.P95_LATENCY_MS, cohort) == Measured(200.0, 1)
    assert measure(Metric.TTFT_MS, cohort) == Measured(60.0, 2)
    assert measure(Metric.TOKENS_PER_S, cohort) == Measured(30.0, 1)


def test_tokens_per_s_weighted() -> None:
    cohort = Cohort(
        samples=[
            Sample(requests=30, errors=0, tokens_per_s=20),
            Sample(requests=10, errors=0, tokens_per_s=60),
        ]
    )
    assert measure(Metric.TOKENS_PER_S, cohort) == Measured(30.0, 2)


def test_error_rate_is_errors_over_requests_ignoring_idle_samples() -> None:
    """Not a mean of per-sample rates: 6 errors in 200 requests is 3%."""
    cohort = Cohort(
        samples=[
            Sample(requests=100, errors=5),
            Sample(requests=100, errors=1),
            Sample(requests=0, errors=0),  # idle: neither a request nor a sample
        ]
    )
    assert measure(Metric.ERROR_RATE, cohort) == Measured(0.03, 2)


def test_error_rate_of_an_idle_cohort_is_unknown() -> None:
    idle = Cohort(samples=[Sample(requests=0, errors=0)] * 5)
    assert measure(Metric.ERROR_RATE, idle) == Measured(None, 0)


def test_fallback_rate_counts_only_samples_that_report_fallbacks() -> None:
    cohort = Cohort(
        samples=[
            Sample(requests=50, errors=0, fallbacks=5),
            Sample(requests=50, errors=0, fallbacks=0),
            Sample(requests=1000, errors=0, fallbacks=None),  # an old agent: not zero
        ]
    )
    assert measure(Metric.FALLBACK_RATE, cohort) == Measured(0.05, 2)


def test_fallback_rate_without_fallback_data_is_insufficient() -> None:
    """Until agents send fallbacks, a fallback gate must wait, not pass on a made-up 0."""
    cohort = Cohort(samples=[Sample(requests=100, errors=0)] * 10)
    assert measure(Metric.FALLBACK_RATE, cohort) == Measured(None, 0)
    check = check_gate(gate("fallback_rate", max_value=0.1), cohort, cohort, cohort)
    assert check.verdict == "insufficient"
    assert check.reasons == ["0 sample(s) of the updated devices, 3 needed"]


@pytest.mark.parametrize(
    ("metric", "cohort", "expected"),
    [
        (Metric.RESTARTS, Cohort(devices=4, restarts=2), Measured(0.5, 4)),
        (Metric.RESTARTS, Cohort(devices=4, restarts=0), Measured(0.0, 4)),
        (Metric.RESTARTS, Cohort(devices=0, restarts=3), Measured(None, 0)),
        (Metric.OOM, Cohort(devices=5, ooms=1), Measured(0.2, 5)),
        (Metric.OOM, Cohort(devices=0), Measured(None, 0)),
        (Metric.GOLDEN_FAILURE_RATE, Cohort(golden_passed=9, golden_failed=1), Measured(0.1, 10)),
        (Metric.GOLDEN_FAILURE_RATE, Cohort(golden_passed=3), Measured(0.0, 3)),
        (Metric.GOLDEN_FAILURE_RATE, Cohort(), Measured(None, 0)),
    ],
)
def test_event_metrics(metric: Metric, cohort: Cohort, expected: Measured) -> None:
    """Restarts and OOMs are per device; golden failures per health check run."""
    assert measure(metric, cohort) == expected


def test_event_metrics_ignore_samples() -> None:
    cohort = Cohort(samples=[Sample(requests=100, errors=100)] * 3, devices=2, restarts=1)
    assert measure(Metric.RESTARTS, cohort) == Measured(0.5, 2)


@pytest.mark.parametrize("metric", list(Metric))
def test_every_metric_of_nothing_is_unknown(metric: Metric) -> None:
    assert measure(metric, EMPTY) == Measured(None, 0)


# --------------------------------------------------------------------------- check_gate

P95_GATE = gate("p95_latency_ms", max_increase_percent=20, min_samples=3, window_s=600)


def test_p95_fifty_percent_up_fails_naming_the_numbers() -> None:
    """The reason must say what moved, by how much, against what, and the limit."""
    check = check_gate(P95_GATE, latency(150, 150, 150), latency(100, 100, 100), latency(100))
    assert check.verdict == "fail"
    assert check.reasons == [
        "p95_latency_ms 150 is +50.0% against the baseline 100 (at most +20%)",
    ]
    ev = check.evidence
    assert ev["verdict"] == "fail"
    assert ev["metric"] == "p95_latency_ms"
    assert ev["window_s"] == 600
    assert ev["min_samples"] == 3
    assert ev["updated"] == {"value": 150.0, "samples": 3, "devices": 0}
    assert ev["baseline"] == {"value": 100.0, "samples": 3}
    assert ev["control"] == {"value": 100.0, "samples": 1, "devices": 0}
    assert ev["thresholds"] == {
        "max_increase_percent": 20.0,
        "max_decrease_percent": None,
        "max_value": None,
        "min_value": None,
    }
    assert ev["change_percent"] == {"baseline": 50.0}
    assert ev["skipped"] == ["control: 1 sample(s), 3 needed"]


def test_fail_against_both_references_gives_two_reasons() -> None:
    updated = Cohort(samples=[Sample(10, 0, p95_ms=150)] * 4, devices=2)
    control = Cohort(samples=[Sample(10, 0, p95_ms=120)] * 5, devices=8)
    check = check_gate(P95_GATE, updated, latency(100, 100, 100), control)
    assert check.verdict == "fail"
    assert check.reasons == [
        "p95_latency_ms 150 is +50.0% against the baseline 100 (at most +20%)",
        "p95_latency_ms 150 is +25.0% against the control 120 (at most +20%)",
    ]
    assert check.evidence["change_percent"] == {"baseline": 50.0, "control": 25.0}
    assert check.evidence["updated"] == {"value": 150.0, "samples": 4, "devices": 2}
    assert check.evidence["control"] == {"value": 120.0, "samples": 5, "devices": 8}
    assert "skipped" not in check.evidence


@pytest.mark.parametrize(
    ("now", "verdict"),
    [
        (119.0, "pass"),
        (120.0, "pass"),  # exactly +20% is within "at most +20%"
        (120.5, "fail"),
        (80.0, "pass"),  # faster is never a failure of max_increase
    ],
)
def test_increase_boundary(now: float, verdict: str) -> None:
    check = check_gate(P95_GATE, latency(now, now, now), latency(100, 100, 100), latency(100))
    assert check.verdict == verdict


def test_within_limit_passes_with_the_change_in_evidence() -> None:
    check = check_gate(
        P95_GATE, latency(110, 110, 110), latency(100, 100, 100), latency(105, 105, 105)
    )
    assert check.verdict == "pass"
    assert check.reasons == []
    assert check.evidence["verdict"] == "pass"
    assert check.evidence["change_percent"] == {"baseline": 10.0, "control": 4.762}
    assert "skipped" not in check.evidence


def test_too_few_updated_samples_is_insufficient() -> None:
    """Two samples may not judge a stage that asks for three, however bad they look."""
    check = check_gate(P95_GATE, latency(900, 900), latency(100, 100, 100), latency(100, 100, 100))
    assert check.verdict == "insufficient"
    assert check.reasons == ["2 sample(s) of the updated devices, 3 needed"]
    assert check.evidence["verdict"] == "insufficient"
    assert check.evidence["updated"] == {"value": 900.0, "samples": 2, "devices": 0}
    assert "change_percent" not in check.evidence


def test_no_updated_samples_is_insufficient_even_with_absolute_limits() -> None:
    check = check_gate(gate("error_rate", max_value=0.1), EMPTY, EMPTY, EMPTY)
    assert check.verdict == "insufficient"
    assert check.reasons == ["0 sample(s) of the updated devices, 3 needed"]


def test_baseline_short_of_samples_checks_control_only() -> None:
    """A reference with too few samples is skipped, and the evidence says which and why."""
    check = check_gate(P95_GATE, latency(110, 110, 110), latency(50, 50), latency(100, 100, 100))
    assert check.verdict == "pass"
    assert check.reasons == ["baseline: 2 sample(s), 3 needed"]
    assert check.evidence["skipped"] == ["baseline: 2 sample(s), 3 needed"]
    assert check.evidence["change_percent"] == {"control": 10.0}
    assert check.evidence["baseline"] == {"value": 50.0, "samples": 2}


def test_baseline_short_control_failing() -> None:
    check = check_gate(P95_GATE, latency(200, 200, 200), EMPTY, latency(100, 100, 100))
    assert check.verdict == "fail"
    assert check.reasons == ["p95_latency_ms 200 is +100.0% against the control 100 (at most +20%)"]
    assert check.evidence["skipped"] == ["baseline: 0 sample(s), 3 needed"]
    assert check.evidence["baseline"] == {"value": None, "samples": 0}


def test_no_reference_at_all_is_insufficient() -> None:
    """A relative limit with nothing to compare with cannot pass."""
    check = check_gate(P95_GATE, latency(500, 500, 500), EMPTY, latency(100))
    assert check.verdict == "insufficient"
    assert check.reasons == [
        "baseline: 0 sample(s), 3 needed",
        "control: 1 sample(s), 3 needed",
    ]
    assert check.evidence["verdict"] == "insufficient"
    assert check.evidence["change_percent"] == {}


def test_zero_reference_is_skipped() -> None:
    """A percent change from 0 is infinite: skipped, with the reason in the evidence."""
    no_errors = Cohort(samples=[Sample(requests=100, errors=0)] * 3)
    some_errors = Cohort(samples=[Sample(requests=100, errors=2)] * 3)
    check = check_gate(
        gate("error_rate", max_increase_percent=10), some_errors, no_errors, no_errors
    )
    assert check.verdict == "insufficient"
    assert check.evidence["skipped"] == [
        "baseline: error_rate is 0, a relative limit does not apply",
        "control: error_rate is 0, a relative limit does not apply",
    ]
    assert check.reasons == check.evidence["skipped"]


def test_zero_reference_with_an_absolute_limit_still_judges() -> None:
    """An absolute limit beside the relative one catches what a zero baseline cannot."""
    no_errors = Cohort(samples=[Sample(requests=100, errors=0)] * 3)
    some_errors = Cohort(samples=[Sample(requests=100, errors=20)] * 3)
    error_gate = gate("error_rate", max_increase_percent=10, max_value=0.05)
    check = check_gate(error_gate, some_errors, no_errors, no_errors)
    assert check.verdict == "fail"
    assert check.reasons == ["error_rate 0.2 is above the limit 0.05"]
    assert len(check.evidence["skipped"]) == 2  # type: ignore[arg-type]


ABSOLUTE: list[tuple[Gate, Cohort, str, list[str]]] = [
    (gate("ttft_ms", max_value=200), Cohort([Sample(10, 0, ttft_ms=200)] * 3), "pass", []),
    (
        gate("ttft_ms", max_value=200),
        Cohort([Sample(10, 0, ttft_ms=201)] * 3),
        "fail",
        ["ttft_ms 201 is above the limit 200"],
    ),
    (
        gate("tokens_per_s", min_value=12.5),
        Cohort([Sample(10, 0, tokens_per_s=12)] * 3),
        "fail",
        ["tokens_per_s 12 is below the limit 12.5"],
    ),
    (gate("tokens_per_s", min_value=12.5), speed(12.5, 12.5, 12.5), "pass", []),
    (
        gate("tokens_per_s", min_value=10, max_value=20),
        speed(25, 25, 25),
        "fail",
        ["tokens_per_s 25 is above the limit 20"],
    ),
    (
        gate("error_rate", max_value=0.01),
        Cohort([Sample(1000, 11)] * 3),
        "fail",
        ["error_rate 0.011 is above the limit 0.01"],
    ),
    (
        gate("restarts", max_value=1, min_samples=2),
        Cohort(devices=2, restarts=3),
        "fail",
        ["restarts 1.5 is above the limit 1"],
    ),
    (gate("restarts", max_value=1, min_samples=2), Cohort(devices=2, restarts=2), "pass", []),
    (
        gate("golden_failure_rate", max_value=0),
        Cohort(golden_passed=99, golden_failed=1),
        "fail",
        ["golden_failure_rate 0.01 is above the limit 0"],
    ),
    (
        gate("oom", max_value=0, min_samples=1),
        Cohort(devices=1, ooms=1),
        "fail",
        ["oom 1 is above the limit 0"],
    ),
]


@pytest.mark.parametrize(("the_gate", "updated", "verdict", "reasons"), ABSOLUTE)
def test_absolute_limits_need_no_reference(
    the_gate: Gate, updated: Cohort, verdict: str, reasons: list[str]
) -> None:
    """max_value and min_value compare the updated devices with a number: no baseline needed."""
    check = check_gate(the_gate, updated, EMPTY, EMPTY)
    assert (check.verdict, check.reasons) == (verdict, reasons)
    assert check.evidence["change_percent"] == {}
    assert "skipped" not in check.evidence  # no relative limit: nothing was skipped


SKIPPED_CONTROL = "control: 0 sample(s), 3 needed"


@pytest.mark.parametrize(
    ("now", "verdict", "reasons"),
    [
        (90.0, "pass", [SKIPPED_CONTROL]),  # a pass lists what it could not check
        (85.0, "pass", [SKIPPED_CONTROL]),  # exactly -15%
        (80.0, "fail", ["tokens_per_s 80 is -20.0% against the baseline 100 (at most -15%)"]),
        (150.0, "pass", [SKIPPED_CONTROL]),  # faster is never a failure of max_decrease
    ],
)
def test_tokens_per_s_max_decrease(now: float, verdict: str, reasons: list[str]) -> None:
    the_gate = gate("tokens_per_s", max_decrease_percent=15)
    check = check_gate(the_gate, speed(now, now, now), speed(100, 100, 100), EMPTY)
    assert (check.verdict, check.reasons) == (verdict, reasons)
    assert check.evidence["change_percent"] == {"baseline": now - 100}
    assert check.evidence["skipped"] == [SKIPPED_CONTROL]


def test_increase_and_decrease_limits_together() -> None:
    """A band around the baseline: both directions are checked against each reference."""
    band = gate("ttft_ms", max_increase_percent=10, max_decrease_percent=10)
    ref = Cohort([Sample(10, 0, ttft_ms=100)] * 3)
    low = check_gate(band, Cohort([Sample(10, 0, ttft_ms=50)] * 3), ref, ref)
    assert low.verdict == "fail"
    assert low.reasons == [
        "ttft_ms 50 is -50.0% against the baseline 100 (at most -10%)",
        "ttft_ms 50 is -50.0% against the control 100 (at most -10%)",
    ]
    high = check_gate(band, Cohort([Sample(10, 0, ttft_ms=111)] * 3), ref, ref)
    assert [r.split(" (")[1] for r in high.reasons] == ["at most +10%)", "at most +10%)"]
    inside = check_gate(band, Cohort([Sample(10, 0, ttft_ms=95)] * 3), ref, ref)
    assert inside.verdict == "pass"


def test_min_samples_applies_to_references_too() -> None:
    strict = gate("p95_latency_ms", max_increase_percent=20, min_samples=5)
    check = check_gate(strict, latency(100, 100, 100, 100, 100), latency(100), latency(100))
    assert check.verdict == "insufficient"
    assert check.reasons == ["baseline: 1 sample(s), 5 needed", "control: 1 sample(s), 5 needed"]


def test_evidence_is_json() -> None:
    """Evidence is stored as JSON and shown by the API: it must serialise as is."""
    check = check_gate(P95_GATE, latency(150, 150, 150), latency(100, 100, 100), EMPTY)
    assert json.loads(json.dumps(check.evidence)) == check.evidence


def test_reasons_write_large_and_small_numbers_for_people() -> None:
    from fleet.rollout.gates import _readable

    assert _readable(35012.4) == "35,012"
    assert _readable(11970.0) == "11,970"
    assert _readable(150.0) == "150"
    assert _readable(0.0512) == "0.0512"
    assert _readable(0.0) == "0"
    assert _readable(0.00001234) == "1.23e-05"
