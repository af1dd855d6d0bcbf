"""Model-aware health gates: one metric of the updated devices against two references.

Pure: the engine hands in three cohorts of telemetry and event counts over the gate's
window (the updated devices since their update, the same devices before it, and the
target's devices not yet updated) and gets back a verdict with its evidence: every
number, threshold and sample count that led to it, stored as given and shown by the
API and CLI.

A relative limit (``max_increase_percent``, ``max_decrease_percent``) is checked
against each reference that has enough samples; one with fewer than ``min_samples``,
or a zero value, is skipped and the evidence says so. When no condition could be
checked at all the verdict is ``insufficient``, and the gate's
``on_insufficient_data`` rule decides: ``wait`` for more data, or count a failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import JsonValue

from fleet.rollout.spec import Gate, Metric

__all__ = ["Cohort", "GateCheck", "Measured", "Sample", "Verdict", "check_gate", "measure"]

Verdict = Literal["pass", "fail", "insufficient"]


@dataclass(frozen=True)
class Sample:
    """One telemetry sample, as the gate reads it."""

    requests: int
    errors: int
    p95_ms: float | None = None
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    fallbacks: int | None = None  # degraded-mode activations; None until agents send them


@dataclass(frozen=True)
class Cohort:
    """A set of devices over one window: their samples and the events that count."""

    samples: Sequence[Sample] = ()
    devices: int = 0
    restarts: int = 0  # agent restarts (online events after the first)
    ooms: int = 0  # model failures for lack of memory
    golden_passed: int = 0  # health checks of the new version that passed
    golden_failed: int = 0


@dataclass(frozen=True)
class Measured:
    """A metric's value over a cohort, and how many samples it rests on."""

    value: float | None  # None: nothing to measure
    samples: int  # what ``min_samples`` is compared with


def _readable(value: float) -> str:
    """A measurement for people: 35,012 rather than 3.501e+04; 0.0512 rather than 5.12e-02."""
    if abs(value) >= 10_000:
        return f"{value:,.0f}"
    if abs(value) >= 0.001 or value == 0:
        return f"{value:.4g}"
    return f"{value:.2e}"


def _weighted(samples: Sequence[Sample], pick: str) -> Measured:
    points = [
        (getattr(s, pick), s.requests)
        for s in samples
        if s.requests > 0 and getattr(s, pick) is not None
    ]
    total = sum(w for _, w in points)
    if not points or total == 0:
        return Measured(None, 0)
    return Measured(sum(v * w for v, w in points) / total, len(points))


def measure(metric: Metric, cohort: Cohort) -> Measured:
    """The cohort's value of ``metric``: request-weighted where requests make it."""
    samples = cohort.samples
    if metric is Metric.P95_LATENCY_MS:
        return _weighted(samples, "p95_ms")
    if metric is Metric.TTFT_MS:
        return _weighted(samples, "ttft_ms")
    if metric is Metric.TOKENS_PER_S:
        return _weighted(samples, "tokens_per_s")
    if metric is Metric.ERROR_RATE:
        busy = [s for s in samples if s.requests > 0]
        requests = sum(s.requests for s in busy)
        return Measured(sum(s.errors for s in busy) / requests if requests else None, len(busy))
    if metric is Metric.FALLBACK_RATE:
        known = [s for s in samples if s.requests > 0 and s.fallbacks is not None]
        requests = sum(s.requests for s in known)
        value = sum(s.fallbacks or 0 for s in known) / requests if requests else None
        return Measured(value, len(known))
    if metric is Metric.RESTARTS:
        return Measured(
            cohort.restarts / cohort.devices if cohort.devices else None, cohort.devices
        )
    if metric is Metric.OOM:
        return Measured(cohort.ooms / cohort.devices if cohort.devices else None, cohort.devices)
    checks = cohort.golden_passed + cohort.golden_failed  # GOLDEN_FAILURE_RATE
    return Measured(cohort.golden_failed / checks if checks else None, checks)


@dataclass(frozen=True)
class GateCheck:
    """A gate's verdict, why, and the evidence stored with it."""

    verdict: Verdict
    reasons: list[str]  # why it failed, or what could not be checked
    evidence: dict[str, JsonValue]


def check_gate(gate: Gate, updated: Cohort, baseline: Cohort, control: Cohort) -> GateCheck:
    """The gate's verdict on ``updated``, with the numbers behind it."""
    now = measure(gate.metric, updated)
    refs = {"baseline": measure(gate.metric, baseline), "control": measure(gate.metric, control)}
    evidence: dict[str, JsonValue] = {
        "metric": gate.metric.value,
        "window_s": gate.window_s,
        "min_samples": gate.min_samples,
        "updated": {"value": now.value, "samples": now.samples, "devices": updated.devices},
        "baseline": {"value": refs["baseline"].value, "samples": refs["baseline"].samples},
        "control": {
            "value": refs["control"].value,
            "samples": refs["control"].samples,
            "devices": control.devices,
        },
        "thresholds": {
            "max_increase_percent": gate.max_increase_percent,
            "max_decrease_percent": gate.max_decrease_percent,
            "max_value": gate.max_value,
            "min_value": gate.min_value,
        },
    }
    if now.value is None or now.samples < gate.min_samples:
        reason = f"{now.samples} sample(s) of the updated devices, {gate.min_samples} needed"
        evidence["verdict"] = "insufficient"
        return GateCheck("insufficient", [reason], evidence)
    failures: list[str] = []
    skipped: list[str] = []
    checked = 0
    name, value = gate.metric.value, now.value
    if gate.max_value is not None:
        checked += 1
        if value > gate.max_value:
            failures.append(f"{name} {_readable(value)} is above the limit {gate.max_value:g}")
    if gate.min_value is not None:
        checked += 1
        if value < gate.min_value:
            failures.append(f"{name} {_readable(value)} is below the limit {gate.min_value:g}")
    changes: dict[str, JsonValue] = {}
    for ref_name, ref in refs.items():
        if gate.max_increase_percent is None and gate.max_decrease_percent is None:
            break
        if ref.value is None or ref.samples < gate.min_samples:
            skipped.append(f"{ref_name}: {ref.samples} sample(s), {gate.min_samples} needed")
            continue
        if ref.value == 0:
            skipped.append(f"{ref_name}: {name} is 0, a relative limit does not apply")
            continue
        change = (value - ref.value) * 100 / ref.value
        changes[ref_name] = round(change, 3)
        checked += 1
        against = (
            f"{name} {_readable(value)} is {change:+.1f}% against the {ref_name} "
            f"{_readable(ref.value)}"
        )
        if gate.max_increase_percent is not None and change > gate.max_increase_percent:
            failures.append(f"{against} (at most +{gate.max_increase_percent:g}%)")
        if gate.max_decrease_percent is not None and -change > gate.max_decrease_percent:
            failures.append(f"{against} (at most -{gate.max_decrease_percent:g}%)")
    evidence["change_percent"] = changes
    if skipped:
        evidence["skipped"] = list(skipped)
    verdict: Verdict = "fail" if failures else ("pass" if checked else "insufficient")
    evidence["verdict"] = verdict
    return GateCheck(verdict, failures or skipped, evidence)
