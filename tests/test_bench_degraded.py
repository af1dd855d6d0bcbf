"""The pure parts of scripts/bench_degraded.py: the LiteLLM-style router and the figures."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench_degraded as bench  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def attempt(model: str, *, ok: bool, at: float, text: bool = False) -> bench.Attempt:
    a = bench.Attempt(model=model, t_start=at, t_end=at + 0.1, status=200)
    if ok:
        a.finished, a.chunks, a.t_first = True, 1, at + 0.05
    else:
        a.error = "stream error: injected fault"
        if text:
            a.chunks, a.t_first = 1, at + 0.05
    return a


def run_router(router: bench.CooldownRouter, clock: FakeClock, primary_ok: bool) -> list[str]:
    """One request through the router; the models it called, in order."""
    calls: list[str] = []

    async def send(model: str, is_fallback: bool) -> bench.Attempt:
        calls.append(model)
        return attempt(model, ok=is_fallback or primary_ok, at=clock())

    asyncio.run(router.request(send, clock))
    return calls


def test_router_retries_then_falls_back_then_cools_down() -> None:
    clock = FakeClock()
    router = bench.CooldownRouter("p", "f", num_retries=2, allowed_fails=3, backoff_s=0.0)
    assert run_router(router, clock, primary_ok=False) == ["p", "p", "p", "f"]
    assert router.cooldowns == []  # three failures are allowed
    assert run_router(router, clock, primary_ok=False) == ["p", "f"]  # the fourth cools it down
    assert router.cooldowns == [0.0]
    assert run_router(router, clock, primary_ok=False) == ["f"]  # straight to the fallback
    clock.now = 3.5  # the cooldown is over: the primary is tried again, no probing
    assert run_router(router, clock, primary_ok=False) == ["p", "f"]  # and cools down at once
    assert router.cooldowns == [0.0, 3.5]
    clock.now = 7.0
    assert run_router(router, clock, primary_ok=True) == ["p"]


def test_router_forgets_failures_after_a_minute() -> None:
    clock = FakeClock()
    router = bench.CooldownRouter("p", "f", num_retries=0, allowed_fails=1, backoff_s=0.0)
    run_router(router, clock, primary_ok=False)
    clock.now = 61.0
    run_router(router, clock, primary_ok=False)
    assert router.cooldowns == []


def test_router_does_not_retry_a_stream_that_sent_text() -> None:
    router = bench.CooldownRouter("p", "f", backoff_s=0.0)

    async def send(model: str, is_fallback: bool) -> bench.Attempt:
        return attempt(model, ok=False, at=0.0, text=True)

    attempts, fallback = asyncio.run(router.request(send, FakeClock()))
    assert [a.model for a in attempts] == ["p"]
    assert not fallback


def test_router_backoff_doubles_with_jitter() -> None:
    router = bench.CooldownRouter("p", "f", backoff_s=0.5)
    assert 0.375 <= router.backoff(0) <= 0.5
    assert 0.75 <= router.backoff(1) <= 1.0
    assert router.backoff(10) <= bench.LITELLM_MAX_BACKOFF_S


def test_absorb_tells_fallback_text_from_primary_text() -> None:
    a = bench.Attempt(model="gemma3-270m", t_start=0.0)
    mark: dict[str, Any] = {"served_by": "gemma3-270m", "tier": "primary", "degraded": False}
    bench.absorb(a, {"choices": [{"delta": {"content": "Hi"}}], "edgefleet": mark}, 1.0, False)
    mark = {"served_by": "gemma-small", "tier": "model", "degraded": True}
    chunk = {"choices": [{"delta": {"content": " there"}, "finish_reason": "length"}]}
    bench.absorb(a, {**chunk, "edgefleet": mark}, 2.0, False)
    assert (a.t_first_primary, a.t_first_fallback, a.served_by, a.finished) == (
        1.0,
        2.0,
        "gemma-small",
        True,
    )
    bench.absorb(a, {"error": {"message": "boom"}}, 3.0, False)
    assert a.error == "stream error: boom"


def outcome(
    start: float,
    end: float,
    *,
    ok: bool = True,
    fallback: bool = False,
    first: float | None = None,
    failover: float | None = None,
) -> bench.Outcome:
    first = start + 0.1 if first is None else first
    return bench.Outcome(
        client=0,
        n=0,
        t_start=start,
        t_end=end,
        ok=ok,
        fallback=fallback,
        served_by="gemma-small" if fallback else "gemma3-270m",
        tier="model" if fallback else "primary",
        t_first=first,
        t_first_fallback=first if fallback and ok else None,
        t_first_primary=None if fallback or not ok else first,
        failover_s=failover,
        error=None if ok else "stream error: x",
    )


def test_summarize_failover_recovery_and_share() -> None:
    outcomes = [
        outcome(0.0, 1.0),
        outcome(9.0, 10.5, fallback=True, first=10.05, failover=0.04),  # continued mid-way
        outcome(10.2, 11.0, fallback=True),  # the breaker open: straight to the fallback
        outcome(10.3, 10.4, ok=False),
        outcome(20.5, 21.0, fallback=True),  # the breaker still open after the clear
        outcome(22.0, 23.0),
    ]
    figures = bench.summarize(outcomes, fault_at=10.0, clear_at=20.0, duration=30.0)
    assert figures["requests"] == 6
    assert figures["answered_share"] == pytest.approx(5 / 6)
    assert figures["fallback_answers"] == 3
    assert figures["failover_first_text_s"] == pytest.approx(0.05)
    assert figures["failover_first_answer_s"] == pytest.approx(0.5)
    assert figures["first_answer_sent_after_fault_s"] == pytest.approx(1.0)
    assert figures["recovery_first_text_s"] == pytest.approx(2.1)
    assert figures["recovery_first_answer_s"] == pytest.approx(3.0)
    assert figures["fallback_answers_after_clear"] == 1
    assert figures["failovers"] == 1
    assert figures["failover_p50_s"] == pytest.approx(0.04)
    assert figures["fallback_ttft_p50_s"] == pytest.approx(0.1)  # nothing failed in those
    assert figures["phases"]["fault"] == {
        "requests": 2,
        "answered": 1,
        "answered_share": 0.5,
        "fallback_answers": 1,
    }


def test_comparison_puts_ratios_and_goals_side_by_side() -> None:
    rows = bench.comparison(
        {
            "edgefleet": {"answered_share": 1.0, "failover_first_text_s": 0.05},
            "baseline": {"answered_share": 0.8, "failover_first_text_s": 1.0},
        }
    )
    by_key = {r["key"]: r for r in rows}
    assert by_key["answered_share"]["ratio"] == pytest.approx(1.25)
    assert by_key["answered_share"]["met"] is True
    assert by_key["failover_first_text_s"]["ratio"] == pytest.approx(0.05)
    assert by_key["failover_first_text_s"]["met"] is True
    assert by_key["requests"]["met"] is None


def test_failover_is_the_agents_own_figure_or_what_a_client_router_sees() -> None:
    marked = bench.Attempt(model="gemma3-270m", t_start=0.0, failover_ms=42.0)
    assert bench.failover_of([marked]) == pytest.approx(0.042)
    failed = bench.Attempt(model="gemma-base", t_start=0.0, t_end=1.2, t_error=1.0, status=200)
    failed.error = "stream error: boom"
    retried = bench.Attempt(model="gemma-small", t_start=1.5, t_end=2.0, status=200, t_first=1.7)
    retried.finished = True
    assert bench.failover_of([failed, retried]) == pytest.approx(0.7)
    assert bench.failover_of([retried]) is None
