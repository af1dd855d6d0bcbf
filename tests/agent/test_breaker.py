import itertools
import random
import threading
from datetime import UTC, datetime, timedelta

import pytest

import agent.serving.breaker
from agent.serving.breaker import (
    Breaker,
    BreakerView,
    Call,
    Outcome,
    Permit,
    Status,
    Transition,
    admit,
    advance,
    record,
)
from models.policy import BreakerSettings, FailureKind
from models.wire import BreakerState

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
ERROR, OOM, THERMAL = FailureKind.ERROR, FailureKind.OUT_OF_MEMORY, FailureKind.THERMAL
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


class Clocks:
    """A monotonic clock and a wall clock that move together, only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.now - 1000.0)

    def tick(self, seconds: float) -> None:
        self.now += seconds


def settings(**overrides: object) -> BreakerSettings:
    fields: dict[str, object] = {
        "failure_rate_threshold": 50.0,
        "slow_call_duration": 2.0,
        "slow_call_rate_threshold": 100.0,
        "minimum_calls": 4,
        "sliding_window": 10,
        "wait_in_open": 30.0,
        "permitted_calls_in_half_open": 2,
    }
    fields.update(overrides)
    return BreakerSettings.model_validate(fields)


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


def make(clocks: Clocks, **overrides: object) -> Breaker:
    return Breaker("gemma", settings(**overrides), clock=clocks.monotonic, wall=clocks.wall)


def ok(breaker: Breaker, ttft_s: float = 0.1) -> Transition | None:
    permit = breaker.acquire()
    assert permit is not None
    return breaker.success(permit, ttft_s)


def fail(breaker: Breaker, kind: FailureKind = ERROR, reason: str = "boom") -> Transition | None:
    permit = breaker.acquire()
    assert permit is not None
    return breaker.failure(permit, kind, reason)


def open_it(breaker: Breaker) -> Transition:
    change = breaker.trip(ERROR, "test")
    assert change is not None
    return change


def to_half_open(breaker: Breaker, clocks: Clocks) -> None:
    open_it(breaker)
    clocks.tick(breaker.settings.wait_in_open)
    assert breaker.state is HALF_OPEN


def test_public_api() -> None:
    assert sorted(agent.serving.breaker.__all__) == [
        "Breaker",
        "BreakerView",
        "Call",
        "Outcome",
        "Permit",
        "Status",
        "Transition",
        "admit",
        "advance",
        "end_hold",
        "force_open",
        "forget",
        "record",
        "resize",
    ]


# --------------------------------------------------------------------------- closed


def test_a_new_breaker_is_closed_with_an_empty_window(clocks: Clocks) -> None:
    breaker = make(clocks)
    assert breaker.model == "gemma"
    assert breaker.state is CLOSED
    assert breaker.view() == BreakerView(
        state=CLOSED,
        kind=None,
        reason="no calls yet",
        since=T0,
        retry_after_s=0.0,
        calls=0,
        failures=0,
        slow=0,
    )


def test_failures_below_minimum_calls_never_open(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=4)
    for _ in range(3):
        assert fail(breaker) is None
    assert breaker.state is CLOSED
    assert (breaker.view().calls, breaker.view().failures) == (3, 3)


def test_the_call_that_reaches_minimum_calls_opens_at_100_percent(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=4)
    for _ in range(3):
        fail(breaker)
    change = fail(breaker, reason="CUDA error: out of launch resources")
    assert change == Transition(
        model="gemma",
        old=CLOSED,
        new=OPEN,
        kind=ERROR,
        reason="failure rate 100% of the last 4 calls >= 50%; "
        "last error: CUDA error: out of launch resources",
    )
    assert breaker.state is OPEN
    assert breaker.acquire() is None


def test_failure_rate_exactly_at_the_threshold_opens(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=10, sliding_window=10, failure_rate_threshold=60)
    for _ in range(4):
        assert ok(breaker) is None
    for _ in range(5):
        assert fail(breaker) is None
    change = fail(breaker)  # 6 of 10 = 60%
    assert change is not None
    assert change.reason.startswith("failure rate 60% of the last 10 calls >= 60%")


def test_failure_rate_just_below_the_threshold_stays_closed(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=10, sliding_window=10, failure_rate_threshold=60)
    for _ in range(5):
        ok(breaker)
    for _ in range(5):
        assert fail(breaker) is None  # 50% < 60%
    assert breaker.state is CLOSED
    view = breaker.view()
    assert (view.calls, view.failures, view.slow) == (10, 5, 0)


def test_the_window_slides_old_failures_out(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=4, sliding_window=4, failure_rate_threshold=75)
    fail(breaker)
    fail(breaker)
    ok(breaker)
    ok(breaker)  # [F F O O]: 50%
    assert ok(breaker) is None  # [F O O O]
    assert ok(breaker) is None  # [O O O O]
    assert breaker.view().failures == 0
    assert fail(breaker) is None  # [O O O F]: 25%
    assert fail(breaker) is None  # [O O F F]: 50%
    change = fail(breaker)  # [O F F F]: 75%
    assert change is not None
    assert change.reason.startswith("failure rate 75% of the last 4 calls >= 75%")


def test_rates_count_the_whole_window_once_minimum_is_reached(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=2, sliding_window=10)
    ok(breaker)
    ok(breaker)
    ok(breaker)
    assert fail(breaker) is None  # 1 of 4 = 25%
    assert fail(breaker) is None  # 2 of 5 = 40%
    change = fail(breaker)  # 3 of 6 = 50%
    assert change is not None
    assert change.reason.startswith("failure rate 50% of the last 6 calls >= 50%")


def test_slow_calls_open_at_the_slow_rate(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=4, slow_call_rate_threshold=75, slow_call_duration=2.0)
    ok(breaker, ttft_s=1.99)  # fast
    assert ok(breaker, ttft_s=2.0) is None  # slow: at the duration counts
    assert ok(breaker, ttft_s=5.0) is None
    assert breaker.view().slow == 2
    change = ok(breaker, ttft_s=9.0)  # 3 of 4 = 75%
    assert change == Transition(
        model="gemma",
        old=CLOSED,
        new=OPEN,
        kind=FailureKind.SLOW,
        reason="slow-call rate 75% of the last 4 calls >= 75% (first token >= 2 s)",
    )


def test_a_failure_is_never_also_slow(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=4, slow_call_rate_threshold=50, failure_rate_threshold=100)
    ok(breaker, ttft_s=9.0)
    fail(breaker)
    fail(breaker)
    assert ok(breaker) is None  # slow 1 of 4 = 25%, failures 50% < 100%
    view = breaker.view()
    assert (view.calls, view.failures, view.slow) == (4, 2, 1)


def test_failure_rate_wins_when_both_thresholds_are_reached(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=4, slow_call_rate_threshold=50)
    ok(breaker, ttft_s=9.0)
    ok(breaker, ttft_s=9.0)
    fail(breaker)
    change = fail(breaker)
    assert change is not None
    assert change.kind is ERROR


def test_the_opening_kind_is_the_most_frequent_failure(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=4)
    fail(breaker, OOM, "cudaMalloc failed")
    fail(breaker, ERROR, "timeout")
    fail(breaker, OOM, "KV cache full")
    change = fail(breaker, ERROR, "timeout again")
    assert change is not None
    assert change.kind is ERROR  # a tie: the latest kind wins
    breaker = make(clocks, minimum_calls=4)
    fail(breaker, OOM, "cudaMalloc failed")
    fail(breaker, OOM, "KV cache full")
    fail(breaker, ERROR, "timeout")
    change = fail(breaker, OOM, "ggml_cuda alloc")
    assert change is not None
    assert change.kind is OOM
    assert change.reason.endswith("last out_of_memory: ggml_cuda alloc")


def test_a_long_failure_text_is_cut_in_the_reason(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=1)
    change = fail(breaker, reason="x" * 5000 + "\n\ttraceback")
    assert change is not None
    assert len(change.reason) < 400
    assert change.reason.endswith("…")


# --------------------------------------------------------------------------- open


def test_open_refuses_calls_and_counts_down_retry_after(clocks: Clocks) -> None:
    breaker = make(clocks, wait_in_open=30)
    open_it(breaker)
    assert breaker.view().retry_after_s == 30.0
    clocks.tick(12.5)
    assert breaker.acquire() is None
    assert breaker.state is OPEN
    view = breaker.view()
    assert view.retry_after_s == 17.5
    assert view.since == T0  # the wall time it opened
    assert (view.calls, view.failures, view.slow) == (0, 0, 0)


def test_open_turns_half_open_lazily_after_the_wait(clocks: Clocks) -> None:
    breaker = make(clocks, wait_in_open=30)
    open_it(breaker)
    clocks.tick(29.999)
    assert breaker.state is OPEN
    clocks.tick(0.001)
    assert breaker.state is HALF_OPEN
    view = breaker.view()
    assert view.retry_after_s == 0.0
    assert view.kind is ERROR  # still what opened it
    assert view.reason.startswith("30 s open have passed; letting 2 probe calls through")


def test_half_open_since_is_when_the_wait_ended_not_when_noticed(clocks: Clocks) -> None:
    breaker = make(clocks, wait_in_open=30)
    open_it(breaker)
    clocks.tick(100)
    assert breaker.view().since == T0 + timedelta(seconds=30)


def test_poll_reports_the_lazy_half_open_once(clocks: Clocks) -> None:
    breaker = make(clocks, wait_in_open=30)
    open_it(breaker)
    assert breaker.poll() is None
    clocks.tick(30)
    assert breaker.acquire() is not None  # this call noticed it, but returns a permit
    change = breaker.poll()
    assert change == Transition(
        model="gemma",
        old=OPEN,
        new=HALF_OPEN,
        kind=ERROR,
        reason="30 s open have passed; letting 2 probe calls through (opened for: test)",
    )
    assert breaker.poll() is None


def test_poll_forgets_a_half_open_that_a_later_transition_superseded(clocks: Clocks) -> None:
    breaker = make(clocks, permitted_calls_in_half_open=1)
    open_it(breaker)
    clocks.tick(30)
    change = ok(breaker)  # the probe closes it
    assert change is not None
    assert (change.old, change.new) == (HALF_OPEN, CLOSED)
    assert breaker.poll() is None


def test_calls_admitted_before_opening_do_not_count_after(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=1, permitted_calls_in_half_open=1)
    late = breaker.acquire()
    assert late is not None
    open_it(breaker)
    clocks.tick(30)
    assert breaker.state is HALF_OPEN
    assert breaker.failure(late, ERROR, "finished late") is None
    assert breaker.state is HALF_OPEN
    assert breaker.view().calls == 0


# --------------------------------------------------------------------------- half-open


def test_half_open_lets_only_the_permitted_probes_through(clocks: Clocks) -> None:
    breaker = make(clocks, permitted_calls_in_half_open=3)
    to_half_open(breaker, clocks)
    permits = [breaker.acquire() for _ in range(5)]
    assert [p is not None for p in permits] == [True, True, True, False, False]
    assert all(p.probe for p in permits if p is not None)


def test_concurrent_acquires_in_half_open_get_exactly_the_permits(clocks: Clocks) -> None:
    breaker = make(clocks, permitted_calls_in_half_open=3)
    to_half_open(breaker, clocks)
    start = threading.Barrier(16)
    got: list[Permit | None] = []
    got_lock = threading.Lock()

    def worker() -> None:
        start.wait()
        permit = breaker.acquire()
        with got_lock:
            got.append(permit)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(p is not None for p in got) == 3


def test_all_probes_succeeding_close_with_a_fresh_window(clocks: Clocks) -> None:
    breaker = make(clocks, permitted_calls_in_half_open=2)
    for _ in range(3):
        ok(breaker)
    open_it(breaker)
    clocks.tick(30)
    first, second = breaker.acquire(), breaker.acquire()
    assert first is not None
    assert second is not None
    assert breaker.success(first, 0.1) is None  # one of two: still half-open
    assert breaker.view().calls == 1
    change = breaker.success(second, 0.1)
    assert change == Transition(
        model="gemma",
        old=HALF_OPEN,
        new=CLOSED,
        kind=None,
        reason="2 of 2 probe calls succeeded (failure rate 0% < 50%, slow-call rate 0% < 100%)",
    )
    view = breaker.view()
    assert (view.state, view.kind, view.calls, view.retry_after_s) == (CLOSED, None, 0, 0.0)
    assert view.since == T0 + timedelta(seconds=30)
    assert breaker.acquire() is not None


def test_a_failed_probe_that_reaches_the_threshold_reopens_at_once(clocks: Clocks) -> None:
    breaker = make(clocks, permitted_calls_in_half_open=2)  # 1 of 2 = 50% >= 50%
    to_half_open(breaker, clocks)
    first, second = breaker.acquire(), breaker.acquire()
    assert first is not None
    assert second is not None
    change = breaker.failure(first, OOM, "cudaMalloc failed")
    assert change == Transition(
        model="gemma",
        old=HALF_OPEN,
        new=OPEN,
        kind=OOM,
        reason="1 of 2 probe calls failed (failure rate 50% >= 50%); "
        "last out_of_memory: cudaMalloc failed",
    )
    assert breaker.view().retry_after_s == 30.0  # a new wait
    assert breaker.success(second, 0.1) is None  # the other probe no longer counts
    assert breaker.state is OPEN


def test_a_failed_probe_below_the_threshold_waits_for_the_others(clocks: Clocks) -> None:
    breaker = make(clocks, permitted_calls_in_half_open=4, failure_rate_threshold=50)
    to_half_open(breaker, clocks)
    assert fail(breaker) is None  # 1 of 4 = 25%
    assert ok(breaker) is None
    assert ok(breaker) is None
    change = ok(breaker)
    assert change is not None
    assert change.new is CLOSED
    assert change.reason.startswith("3 of 4 probe calls succeeded (failure rate 25% < 50%")


def test_half_open_failure_rate_at_the_threshold_after_all_probes_reopens(
    clocks: Clocks,
) -> None:
    breaker = make(clocks, permitted_calls_in_half_open=4, failure_rate_threshold=50)
    to_half_open(breaker, clocks)
    fail(breaker)
    ok(breaker)
    ok(breaker)
    change = fail(breaker)  # the second failure: 2 of 4 = 50%
    assert change is not None
    assert (change.old, change.new, change.kind) == (HALF_OPEN, OPEN, ERROR)


def test_slow_probes_reopen_with_kind_slow(clocks: Clocks) -> None:
    breaker = make(clocks, permitted_calls_in_half_open=2, slow_call_rate_threshold=100)
    to_half_open(breaker, clocks)
    assert ok(breaker, ttft_s=3.0) is None  # 1 of 2 slow: 50% < 100%
    change = ok(breaker, ttft_s=3.0)
    assert change is not None
    assert (change.new, change.kind) == (OPEN, FailureKind.SLOW)
    assert change.reason.startswith("2 of 2 probe calls were slow (slow-call rate 100% >= 100%")


def test_a_released_probe_frees_its_place(clocks: Clocks) -> None:
    breaker = make(clocks, permitted_calls_in_half_open=1)
    to_half_open(breaker, clocks)
    permit = breaker.acquire()
    assert permit is not None
    assert breaker.acquire() is None
    breaker.release(permit)  # the client went away: not counted
    assert breaker.state is HALF_OPEN
    assert breaker.view().calls == 0
    change = ok(breaker)
    assert change is not None
    assert change.new is CLOSED


def test_release_after_success_is_a_no_op(clocks: Clocks) -> None:
    breaker = make(clocks, permitted_calls_in_half_open=2)
    to_half_open(breaker, clocks)
    permit = breaker.acquire()
    assert permit is not None
    breaker.success(permit, 0.1)
    breaker.release(permit)  # as from a finally
    assert breaker.acquire() is not None
    assert breaker.acquire() is None  # the finished probe still holds its place


def test_a_permit_ends_once(clocks: Clocks) -> None:
    breaker = make(clocks, minimum_calls=2)
    permit = breaker.acquire()
    assert permit is not None
    assert breaker.failure(permit, ERROR, "one") is None
    assert breaker.failure(permit, ERROR, "twice") is None  # not counted again
    assert breaker.view().failures == 1
    assert breaker.state is CLOSED


def test_release_in_closed_counts_nothing(clocks: Clocks) -> None:
    breaker = make(clocks)
    permit = breaker.acquire()
    assert permit is not None
    assert not permit.probe
    breaker.release(permit)
    assert breaker.view().calls == 0


def test_a_permit_from_another_breaker_is_refused(clocks: Clocks) -> None:
    breaker, other = make(clocks), make(clocks)
    permit = other.acquire()
    assert permit is not None
    with pytest.raises(ValueError, match="gemma"):
        breaker.success(permit, 0.1)


# --------------------------------------------------------------------------- trip and hold


@pytest.mark.parametrize("start", [CLOSED, HALF_OPEN])
def test_trip_opens_from_closed_and_half_open(clocks: Clocks, start: BreakerState) -> None:
    breaker = make(clocks)
    if start is HALF_OPEN:
        to_half_open(breaker, clocks)
    change = breaker.trip(FailureKind.LOAD_FAILED, "model file is corrupt")
    assert change == Transition(
        model="gemma",
        old=start,
        new=OPEN,
        kind=FailureKind.LOAD_FAILED,
        reason="model file is corrupt",
    )
    clocks.tick(30)
    assert breaker.state is HALF_OPEN


def test_trip_while_open_restarts_the_wait_and_replaces_the_cause(clocks: Clocks) -> None:
    breaker = make(clocks)
    open_it(breaker)
    clocks.tick(20)
    assert breaker.trip(FailureKind.GPU_FAULT, "Xid 79: GPU has fallen off the bus") is None
    view = breaker.view()
    assert (view.state, view.kind, view.retry_after_s) == (OPEN, FailureKind.GPU_FAULT, 30.0)
    assert view.reason == "Xid 79: GPU has fallen off the bus"
    assert view.since == T0  # still open since the first trip


def test_hold_stays_open_until_released_then_waits(clocks: Clocks) -> None:
    breaker = make(clocks, wait_in_open=30)
    change = breaker.hold(THERMAL, "GPU 0 at 91.0 °C >= 85 °C")
    assert change == Transition(
        model="gemma", old=CLOSED, new=OPEN, kind=THERMAL, reason="GPU 0 at 91.0 °C >= 85 °C"
    )
    clocks.tick(3600)
    assert breaker.state is OPEN
    assert breaker.acquire() is None
    assert breaker.view().retry_after_s == 30.0
    assert breaker.hold(THERMAL, "GPU 0 at 88.0 °C >= 85 °C") is None  # still hot
    assert breaker.view().reason == "GPU 0 at 88.0 °C >= 85 °C"
    assert breaker.release_hold() is None  # the state stays OPEN
    clocks.tick(29)
    assert breaker.view().retry_after_s == 1.0
    assert breaker.state is OPEN
    clocks.tick(1)
    assert breaker.state is HALF_OPEN


def test_hold_takes_over_an_open_breaker(clocks: Clocks) -> None:
    breaker = make(clocks)
    open_it(breaker)
    assert breaker.hold(THERMAL, "throttled") is None
    clocks.tick(100)
    assert breaker.state is OPEN
    assert breaker.view().kind is THERMAL


def test_trip_does_not_shorten_a_hold(clocks: Clocks) -> None:
    breaker = make(clocks)
    breaker.hold(THERMAL, "hot")
    assert breaker.trip(OOM, "oom") is None
    clocks.tick(100)
    view = breaker.view()
    assert (view.state, view.kind, view.reason) == (OPEN, THERMAL, "hot")


def test_release_hold_without_a_hold_changes_nothing(clocks: Clocks) -> None:
    breaker = make(clocks)
    assert breaker.release_hold() is None
    assert breaker.state is CLOSED
    open_it(breaker)
    clocks.tick(10)
    assert breaker.release_hold() is None
    assert breaker.view().retry_after_s == 20.0  # the running wait is kept


def test_hold_from_half_open_ignores_probes_in_flight(clocks: Clocks) -> None:
    breaker = make(clocks)
    to_half_open(breaker, clocks)
    permit = breaker.acquire()
    assert permit is not None
    change = breaker.hold(THERMAL, "hot")
    assert change is not None
    assert (change.old, change.new) == (HALF_OPEN, OPEN)
    assert breaker.success(permit, 0.1) is None
    assert breaker.state is OPEN


# --------------------------------------------------------------------------- reconfigure


def test_reconfigure_trims_the_window_and_judges_the_next_call_by_the_new_rules(
    clocks: Clocks,
) -> None:
    breaker = make(clocks, minimum_calls=10, sliding_window=10)
    for _ in range(6):
        ok(breaker)
    for _ in range(3):
        fail(breaker)  # [O O O O O O F F F]
    breaker.reconfigure(settings(minimum_calls=2, sliding_window=4))
    assert breaker.state is CLOSED  # nothing judged on reconfigure
    view = breaker.view()
    assert (view.calls, view.failures) == (4, 3)  # the latest four: [O F F F]
    change = ok(breaker)  # [F F F O]: 75%
    assert change is not None
    assert change.reason.startswith("failure rate 75% of the last 4 calls")
    assert breaker.settings.sliding_window == 4


def test_reconfigure_keeps_open_and_measures_the_wait_with_the_new_value(
    clocks: Clocks,
) -> None:
    breaker = make(clocks, wait_in_open=60)
    open_it(breaker)
    clocks.tick(10)
    breaker.reconfigure(settings(wait_in_open=15))
    assert breaker.state is OPEN
    assert breaker.view().retry_after_s == 5.0
    clocks.tick(5)
    assert breaker.state is HALF_OPEN


def test_reconfigure_fewer_probes_in_half_open(clocks: Clocks) -> None:
    breaker = make(clocks, permitted_calls_in_half_open=3)
    to_half_open(breaker, clocks)
    permit = breaker.acquire()
    assert permit is not None
    breaker.reconfigure(settings(permitted_calls_in_half_open=1))
    assert breaker.acquire() is None
    change = breaker.success(permit, 0.1)
    assert change is not None
    assert change.new is CLOSED


# --------------------------------------------------------------------------- pure functions


def test_the_pure_functions_never_look_at_a_clock() -> None:
    rules = settings(minimum_calls=1, wait_in_open=10)
    status, allowed = admit(Status(), rules, now=0.0)
    assert allowed
    opened = record(status, rules, Call(Outcome.FAILED, ERROR, "x"), period=0, now=5.0)
    assert (opened.state, opened.since, opened.wait_from) == (OPEN, 5.0, 5.0)
    assert advance(opened, rules, now=14.9) is opened
    half = advance(opened, rules, now=15.0)
    assert (half.state, half.since, half.period) == (HALF_OPEN, 15.0, opened.period + 1)
    assert admit(opened, rules, now=1.0) == (opened, False)


# --------------------------------------------------------------------------- property


_LEGAL = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)}


@pytest.mark.parametrize("seed", range(20))
def test_random_use_only_makes_legal_transitions(seed: int) -> None:
    rng = random.Random(seed)
    clocks = Clocks()
    rules = settings(
        minimum_calls=rng.randint(1, 5),
        sliding_window=rng.randint(5, 12),
        failure_rate_threshold=rng.choice([20, 50, 100]),
        slow_call_rate_threshold=rng.choice([50, 100]),
        permitted_calls_in_half_open=rng.randint(1, 4),
        wait_in_open=10,
    )
    breaker = Breaker("m", rules, clock=clocks.monotonic, wall=clocks.wall)
    permits: list[Permit] = []
    seen: list[BreakerState] = [breaker.state]
    held = False
    for _ in range(400):
        before = breaker.state
        action = rng.random()
        change: Transition | None = None
        if action < 0.35:
            permit = breaker.acquire()
            if permit is None:
                assert before is not CLOSED
            else:
                assert permit.probe == (before is HALF_OPEN)
                permits.append(permit)
        elif action < 0.75 and permits:
            permit = permits.pop(rng.randrange(len(permits)))
            roll = rng.random()
            if roll < 0.4:
                change = breaker.success(permit, rng.choice([0.1, 5.0]))
            elif roll < 0.8:
                change = breaker.failure(permit, rng.choice(list(FailureKind)), "r")
            else:
                breaker.release(permit)
        elif action < 0.78:
            change = breaker.trip(ERROR, "trip")
        elif action < 0.80:
            change = breaker.hold(THERMAL, "hot")
            held = True
        elif action < 0.83:
            change = breaker.release_hold()
            held = False
        else:
            clocks.tick(rng.choice([1.0, 5.0, 10.0]))
        after = breaker.state
        if change is not None:
            assert (change.old, change.new) in _LEGAL
            assert change.old is before
            assert (change.kind is None) == (change.new is CLOSED)
            assert change.reason
        if after is not before:
            seen.append(after)
        view = breaker.view()
        assert view.calls <= rules.sliding_window
        assert view.failures + view.slow <= view.calls
        if view.retry_after_s > 0:
            assert view.state is OPEN
        if held:
            assert view.state is OPEN
            assert view.retry_after_s == rules.wait_in_open
        if view.state is not OPEN:
            assert view.retry_after_s == 0
    for old, new in itertools.pairwise(seen):
        assert (old, new) in _LEGAL
