"""A circuit breaker per served model, with resilience4j's semantics (degraded mode).

::

                 failure or slow-call rate >= threshold          wait_in_open passed
      CLOSED ──────────────────────────────────────────► OPEN ──────────────────────► HALF_OPEN
        ▲              (window holds >= minimum_calls)    ▲ ▲                             │
        │                                                 │ └──── probes' rates >= a ─────┤
        │                                                 │       threshold (or certain   │
        │                   trip(): now; hold(): until    │       to be, see below)       │
        │                   release_hold(), then the wait └── from any state              │
        └──────────────────── all permitted probes done, both rates below the thresholds ─┘

The window is count-based: the outcomes (ok, slow, failed) of the last ``sliding_window``
calls. Its rates are judged only once it holds ``minimum_calls`` outcomes. A slow call is
a success whose time to first token was ``>= slow_call_duration``; a failure is never
also slow. In HALF_OPEN at most ``permitted_calls_in_half_open`` calls are let through
(``acquire`` returns ``None`` beyond that) and their outcomes form a fresh window: when
all have completed it closes (with an empty window) if both rates are below their
thresholds and opens again otherwise. It reopens *at once* as soon as the probes that
completed already reach a threshold counted against all permitted probes, since no later
outcome could bring the rate back under it (with the defaults, 2 probes at 50%: the first
failure). Probes still in flight then count for nothing.

Decisions are pure: a frozen :class:`Status` and functions (:func:`advance`,
:func:`admit`, :func:`record`, :func:`forget`, :func:`force_open`, :func:`end_hold`,
:func:`resize`) that take the settings and ``now`` (monotonic seconds) and return the
next status; nothing reads a clock or keeps a timer. OPEN becomes HALF_OPEN lazily, the
next time anyone looks. :class:`Breaker` is the thin thread-safe shell (one lock; it is
called from the event loop and from worker threads) that reads the clocks, hands out
:class:`Permit` tokens and turns state changes into :class:`Transition` values.

Outcomes only count in the period (the time between two transitions) whose ``acquire``
let the call through: a call admitted while CLOSED that fails after the breaker opened,
or a half-open probe still running when the probes already decided, is ignored.

Nothing here raises for a failed model: failures are values. The one error is a
programming error, a permit given to a breaker that did not issue it (``ValueError``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum

from models.policy import BreakerSettings, FailureKind
from models.wire import BreakerState, utc_now

__all__ = [
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

_REASON_CHARS = 300  # a failure's own text is cut to this many characters inside a reason


class Outcome(StrEnum):
    """How one call that reached the model ended."""

    OK = "ok"
    SLOW = "slow"  # succeeded, but its first token took >= slow_call_duration
    FAILED = "failed"


@dataclass(frozen=True)
class Call:
    """One outcome in the window; ``kind`` and ``reason`` only for a failure."""

    outcome: Outcome
    kind: FailureKind | None = None
    reason: str = ""


@dataclass(frozen=True)
class Status:
    """Everything the breaker knows, as one value; times are monotonic seconds."""

    state: BreakerState = BreakerState.CLOSED
    window: tuple[Call, ...] = ()  # CLOSED: the last calls, oldest first; HALF_OPEN: the probes'
    kind: FailureKind | None = None  # what opened it; None once closed
    reason: str = "no calls yet"
    since: float = 0.0  # monotonic seconds of the last transition
    wait_from: float | None = None  # OPEN: monotonic seconds the wait began; None while held
    probes: int = 0  # HALF_OPEN: probe calls let through and not released (done ones included)
    period: int = 0  # grows by one at every transition; outcomes of older periods are ignored

    @property
    def held(self) -> bool:
        """Open until :func:`end_hold` (thermal), not counting down ``wait_in_open``."""
        return self.state is BreakerState.OPEN and self.wait_from is None


@dataclass(frozen=True)
class Transition:
    """The breaker of ``model`` changed state; ``kind`` is what opened it (None: closing)."""

    model: str
    old: BreakerState
    new: BreakerState
    kind: FailureKind | None
    reason: str  # human: "failure rate 60% of the last 10 calls >= 50%"


@dataclass(frozen=True)
class BreakerView:
    """A snapshot for reports, metrics and the 503's Retry-After."""

    state: BreakerState
    kind: FailureKind | None
    reason: str
    since: datetime  # wall clock (UTC) of the last transition
    retry_after_s: float  # seconds until it may go half-open; 0 unless open; held: wait_in_open
    calls: int  # outcomes in the current window (HALF_OPEN: the probes'; OPEN: 0)
    failures: int  # of those, failed
    slow: int  # of those, succeeded slowly


# --------------------------------------------------------------------------- pure decisions


def _pct(value: float) -> str:
    """``60.0`` -> ``"60%"``, ``33.333`` -> ``"33.3%"``."""
    return f"{round(value, 1):g}%"


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 1] + "…"


def _counts(window: tuple[Call, ...]) -> tuple[int, int]:
    failures = sum(1 for c in window if c.outcome is Outcome.FAILED)
    slow = sum(1 for c in window if c.outcome is Outcome.SLOW)
    return failures, slow


def _main_kind(window: tuple[Call, ...]) -> tuple[FailureKind, str]:
    """The most frequent failure kind in ``window`` (ties: the latest), with its last reason."""
    failed = [c for c in window if c.outcome is Outcome.FAILED and c.kind is not None]
    tally = Counter(c.kind for c in failed)
    best = max(tally.values())
    last = next(c for c in reversed(failed) if tally[c.kind] == best)
    assert last.kind is not None  # filtered above; for mypy
    return last.kind, last.reason


def _opened(status: Status, kind: FailureKind, reason: str, now: float, *, hold: bool) -> Status:
    return Status(
        state=BreakerState.OPEN,
        kind=kind,
        reason=reason,
        since=now,
        wait_from=None if hold else now,
        period=status.period + 1,
    )


def _judge_window(status: Status, settings: BreakerSettings, now: float) -> Status:
    """CLOSED: open when the window is full enough and a rate reaches its threshold."""
    calls = len(status.window)
    if calls < settings.minimum_calls:
        return status
    failures, slow = _counts(status.window)
    failure_rate, slow_rate = failures * 100 / calls, slow * 100 / calls
    if failure_rate >= settings.failure_rate_threshold:
        kind, last = _main_kind(status.window)
        reason = (
            f"failure rate {_pct(failure_rate)} of the last {calls} calls "
            f">= {_pct(settings.failure_rate_threshold)}"
        )
        return _opened(
            status, kind, f"{reason}; last {kind}: {last}" if last else reason, now, hold=False
        )
    if slow_rate >= settings.slow_call_rate_threshold:
        reason = (
            f"slow-call rate {_pct(slow_rate)} of the last {calls} calls "
            f">= {_pct(settings.slow_call_rate_threshold)} "
            f"(first token >= {settings.slow_call_duration:g} s)"
        )
        return _opened(status, FailureKind.SLOW, reason, now, hold=False)
    return status


def _judge_probes(status: Status, settings: BreakerSettings, now: float) -> Status:
    """HALF_OPEN: reopen once the probes reach a threshold for sure; close when all passed."""
    permitted = settings.permitted_calls_in_half_open
    done = len(status.window)
    failures, slow = _counts(status.window)
    # Counted against every permitted probe: a rate reached now stays reached.
    denominator = max(permitted, done)
    if failures * 100 / denominator >= settings.failure_rate_threshold:
        kind, last = _main_kind(status.window)
        reason = (
            f"{failures} of {denominator} probe calls failed "
            f"(failure rate {_pct(failures * 100 / denominator)} "
            f">= {_pct(settings.failure_rate_threshold)})"
        )
        return _opened(
            status, kind, f"{reason}; last {kind}: {last}" if last else reason, now, hold=False
        )
    if slow * 100 / denominator >= settings.slow_call_rate_threshold:
        reason = (
            f"{slow} of {denominator} probe calls were slow "
            f"(slow-call rate {_pct(slow * 100 / denominator)} "
            f">= {_pct(settings.slow_call_rate_threshold)}, "
            f"first token >= {settings.slow_call_duration:g} s)"
        )
        return _opened(status, FailureKind.SLOW, reason, now, hold=False)
    if done < permitted:
        return status
    reason = (
        f"{done - failures} of {done} probe calls succeeded "
        f"(failure rate {_pct(failures * 100 / done)} < {_pct(settings.failure_rate_threshold)}, "
        f"slow-call rate {_pct(slow * 100 / done)} < {_pct(settings.slow_call_rate_threshold)})"
    )
    return Status(state=BreakerState.CLOSED, reason=reason, since=now, period=status.period + 1)


def advance(status: Status, settings: BreakerSettings, now: float) -> Status:
    """OPEN becomes HALF_OPEN once ``wait_in_open`` has passed (never while held)."""
    if status.state is not BreakerState.OPEN or status.wait_from is None:
        return status
    ready_at = status.wait_from + settings.wait_in_open
    if now < ready_at:
        return status
    return Status(
        state=BreakerState.HALF_OPEN,
        kind=status.kind,
        reason=(
            f"{settings.wait_in_open:g} s open have passed; "
            f"letting {settings.permitted_calls_in_half_open} probe calls through "
            f"(opened for: {status.reason})"
        ),
        since=ready_at,  # when it became half-open, not when someone noticed
        period=status.period + 1,
    )


def admit(status: Status, settings: BreakerSettings, now: float) -> tuple[Status, bool]:
    """May one more call go to the model now? HALF_OPEN counts it as a probe."""
    status = advance(status, settings, now)
    if status.state is BreakerState.CLOSED:
        return status, True
    if (
        status.state is BreakerState.HALF_OPEN
        and status.probes < settings.permitted_calls_in_half_open
    ):
        return replace(status, probes=status.probes + 1), True
    return status, False


def record(
    status: Status, settings: BreakerSettings, call: Call, *, period: int, now: float
) -> Status:
    """Count the outcome of a call admitted in ``period``; judge the window or the probes."""
    status = advance(status, settings, now)
    if period != status.period:
        return status  # admitted before the last transition: it says nothing about now
    if status.state is BreakerState.CLOSED:
        window = (*status.window, call)[-settings.sliding_window :]
        return _judge_window(replace(status, window=window), settings, now)
    if status.state is BreakerState.HALF_OPEN:
        return _judge_probes(replace(status, window=(*status.window, call)), settings, now)
    return status  # OPEN admits nothing, so no call of this period can end here


def forget(status: Status, settings: BreakerSettings, *, period: int, now: float) -> Status:
    """A call of ``period`` ended uncounted (client left, 4xx): a half-open probe is freed."""
    status = advance(status, settings, now)
    if period == status.period and status.state is BreakerState.HALF_OPEN and status.probes:
        return replace(status, probes=status.probes - 1)
    return status


def force_open(
    status: Status, kind: FailureKind, reason: str, now: float, *, hold: bool = False
) -> Status:
    """Open now, whatever the window says; ``hold`` stays open until :func:`end_hold`.

    Already open: the new kind and reason replace the old and the wait starts again from
    now; a hold is never shortened by a plain trip (the hold and its kind stay).
    """
    if status.held and not hold:
        return status
    if status.state is BreakerState.OPEN:
        return replace(status, kind=kind, reason=reason, wait_from=None if hold else now)
    return _opened(status, kind, reason, now, hold=hold)


def end_hold(status: Status, now: float) -> Status:
    """A held breaker starts its ``wait_in_open`` now; anything else is unchanged."""
    return replace(status, wait_from=now) if status.held else status


def resize(status: Status, settings: BreakerSettings) -> Status:
    """New settings: keep the state; a CLOSED window keeps its latest ``sliding_window`` calls.

    Nothing is judged here: the next outcome is judged by the new thresholds, and an
    OPEN breaker's wait is measured with the new ``wait_in_open``.
    """
    if status.state is BreakerState.CLOSED and len(status.window) > settings.sliding_window:
        return replace(status, window=status.window[-settings.sliding_window :])
    return status


# --------------------------------------------------------------------------- the shell


@dataclass(eq=False)
class Permit:
    """One call let through by :meth:`Breaker.acquire`; end it once (later ends are no-ops).

    Opaque to callers: pass it back to ``success``, ``failure`` or ``release``. Calling
    ``release`` in a ``finally`` after ``success``/``failure`` is safe.
    """

    _owner: object = field(repr=False)  # the issuing breaker's token
    _period: int = field(repr=False)
    probe: bool  # let through while HALF_OPEN
    _done: bool = field(default=False, repr=False)


class Breaker:
    """The breaker of one served model: thread-safe, no timers, clocks injected.

    ``clock`` is monotonic seconds (all waits); ``wall`` gives the UTC time reported in
    :attr:`BreakerView.since`. Methods that can change the state return the
    :class:`Transition` they caused, or ``None``. The lazy OPEN -> HALF_OPEN change
    happens inside whichever call notices it first; :meth:`poll` returns it once.
    """

    def __init__(
        self,
        model: str,
        settings: BreakerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = utc_now,
    ) -> None:
        self.model = model
        self._settings = settings
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._token = object()  # marks the permits this breaker issued
        self._status = Status(since=clock())
        self._unpolled: Transition | None = None  # a lazy half-open nobody was told of

    @property
    def settings(self) -> BreakerSettings:
        return self._settings

    @property
    def state(self) -> BreakerState:
        """The current state; OPEN turns HALF_OPEN here once ``wait_in_open`` has passed."""
        with self._lock:
            self._advance()
            return self._status.state

    def acquire(self) -> Permit | None:
        """A permit for one call to the model, or ``None``: open, or no probe left."""
        with self._lock:
            status, allowed = admit(self._status, self._settings, self._clock())
            self._set(status, lazy=True)
            if not allowed:
                return None
            return Permit(self._token, status.period, status.state is BreakerState.HALF_OPEN)

    def success(self, permit: Permit, ttft_s: float) -> Transition | None:
        """The call answered; its first token came after ``ttft_s`` seconds."""
        slow = ttft_s >= self._settings.slow_call_duration
        return self._end(permit, Call(Outcome.SLOW if slow else Outcome.OK))

    def failure(self, permit: Permit, kind: FailureKind, reason: str) -> Transition | None:
        """The call failed because of the model (``kind``); ``reason`` is the human detail."""
        return self._end(permit, Call(Outcome.FAILED, kind, _clip(reason)))

    def release(self, permit: Permit) -> None:
        """The call neither succeeded nor failed (client left, 4xx): not counted.

        Frees a half-open probe for another call. A no-op for a permit already ended.
        """
        with self._lock:
            if self._take(permit):
                self._set(
                    forget(self._status, self._settings, period=permit._period, now=self._clock()),
                    lazy=True,
                )

    def trip(self, kind: FailureKind, reason: str) -> Transition | None:
        """Open now, whatever the window says (load failure, OOM, GPU fault, full queue).

        Then ``wait_in_open`` and half-open as usual. While held it changes nothing.
        """
        with self._lock:
            self._advance()
            return self._set(force_open(self._status, kind, reason, self._clock()))

    def hold(self, kind: FailureKind, reason: str) -> Transition | None:
        """Open and stay open, no half-open, until :meth:`release_hold` (thermal).

        Calling it again while held updates the kind and reason (the temperature now).
        """
        with self._lock:
            self._advance()
            return self._set(force_open(self._status, kind, reason, self._clock(), hold=True))

    def release_hold(self) -> Transition | None:
        """End a hold: ``wait_in_open`` starts now, then half-open as usual.

        The state stays OPEN, so this returns ``None`` (the signature matches the others);
        the later HALF_OPEN comes lazily, see :meth:`poll`.
        """
        with self._lock:
            return self._set(end_hold(self._status, self._clock()))

    def reconfigure(self, settings: BreakerSettings) -> None:
        """A new policy: keep the state and the window (trimmed to the new size)."""
        with self._lock:
            self._settings = settings
            self._status = resize(self._status, settings)

    def poll(self) -> Transition | None:
        """The OPEN -> HALF_OPEN transition that happened lazily since the last poll, once.

        ``None`` if there was none, or a later transition (returned to its caller)
        superseded it. Call it on a tick to publish ``breaker_half_open`` events.
        """
        with self._lock:
            self._advance()
            found, self._unpolled = self._unpolled, None
            return found

    def view(self) -> BreakerView:
        """A consistent snapshot of the state, its cause and the current window."""
        with self._lock:
            self._advance()
            status, now = self._status, self._clock()
            failures, slow = _counts(status.window)
            if status.state is not BreakerState.OPEN:
                retry_after = 0.0
            elif status.wait_from is None:
                retry_after = self._settings.wait_in_open
            else:
                retry_after = max(0.0, status.wait_from + self._settings.wait_in_open - now)
            return BreakerView(
                state=status.state,
                kind=status.kind,
                reason=status.reason,
                since=self._wall() - timedelta(seconds=max(0.0, now - status.since)),
                retry_after_s=retry_after,
                calls=len(status.window),
                failures=failures,
                slow=slow,
            )

    # -- inside the lock

    def _advance(self) -> None:
        self._set(advance(self._status, self._settings, self._clock()), lazy=True)

    def _take(self, permit: Permit) -> bool:
        if permit._owner is not self._token:
            raise ValueError(f"this permit was not issued by the breaker of {self.model!r}")
        if permit._done:
            return False
        permit._done = True
        return True

    def _end(self, permit: Permit, call: Call) -> Transition | None:
        with self._lock:
            self._advance()  # a lazy half-open is poll()'s to report, not this call's
            if not self._take(permit):
                return None
            status = record(
                self._status, self._settings, call, period=permit._period, now=self._clock()
            )
            return self._set(status)

    def _set(self, status: Status, *, lazy: bool = False) -> Transition | None:
        old, self._status = self._status, status
        if old.state is status.state:
            return None
        change = Transition(
            model=self.model,
            old=old.state,
            new=status.state,
            kind=status.kind if status.state is not BreakerState.CLOSED else None,
            reason=status.reason,
        )
        if lazy:
            self._unpolled = change
            return None
        self._unpolled = None
        return change
