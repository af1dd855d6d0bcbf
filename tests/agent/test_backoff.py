"""Exponential backoff with full jitter: the schedule, the cap, the reset."""

from __future__ import annotations

import pytest

from agent.backoff import Backoff, Retry


def test_ceiling_doubles_up_to_the_cap() -> None:
    backoff = Backoff(initial_s=1.0, cap_s=10.0)
    assert [backoff.ceiling(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.ceiling(10_000) == 10.0  # no overflow however long the outage


def test_full_jitter_spans_zero_to_the_ceiling() -> None:
    backoff = Backoff(initial_s=0.5, cap_s=60.0)
    assert backoff.delay(3, rand=lambda: 0.0) == 0.0
    assert backoff.delay(3, rand=lambda: 0.5) == 2.0
    assert backoff.delay(3, rand=lambda: 0.999) == pytest.approx(3.996)


def test_retry_counts_failures_and_resets_after_a_healthy_connection() -> None:
    retry = Retry(Backoff(initial_s=1.0, cap_s=8.0), rand=lambda: 1.0)
    assert [retry.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    retry.reset()
    assert retry.next_delay() == 1.0


@pytest.mark.parametrize(("initial", "cap", "mult"), [(0, 1, 2), (2, 1, 2), (1, 2, 0.5)])
def test_nonsense_schedules_are_refused(initial: float, cap: float, mult: float) -> None:
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(initial, cap, mult)


def test_delays_read_as_seconds_in_messages() -> None:
    from agent.backoff import seconds

    assert seconds(0.04) == "0.0 s"
    assert seconds(2.345) == "2.3 s"
    assert seconds(30.4) == "30 s"
