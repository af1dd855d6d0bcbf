"""Waiting for what another thread, task or process does: one helper, always with a deadline.

Tests often check state they do not own (a background task, a server process, the
database, a broker). Sleeping a fixed time would be slow or flaky; polling without a
deadline would hang the suite. Each wait names what it waits for, so a timeout says
what never happened, and the last value the probe returned.

``ignoring`` lists exceptions that mean "not yet" (a server still starting refuses
connections): the probe is tried again, and the last such error becomes the timeout's
cause. Any other exception from the probe fails the wait at once. ``detail`` adds what
helps to explain a timeout (a process's log, the messages seen so far). ``in_time``
bounds a single await (a task, a future) the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["eventually", "in_time", "wait_until"]

T = TypeVar("T")

WITHIN_S = 60.0  # generous: a loaded 2-core CI machine is slow, and a pass returns at once

Detail = Callable[[], object] | None


def _timed_out(
    what: str, within_s: float, last: object, error: BaseException | None, detail: Detail
) -> AssertionError:
    message = f"timed out after {within_s:g} s waiting for {what} (last: {last!r})"
    if error is not None:
        message += f"; last error: {error!r}"
    if detail is not None:
        message += f"\n{detail()}"
    return AssertionError(message)


def wait_until(
    probe: Callable[[], T],
    what: str,
    *,
    within_s: float = WITHIN_S,
    every_s: float = 0.02,
    ignoring: tuple[type[BaseException], ...] = (),
    detail: Detail = None,
) -> T:
    """Call ``probe`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + within_s
    while True:
        error: BaseException | None = None
        try:
            value = probe()
        except ignoring as exc:
            value, error = None, exc  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, within_s, value, error, detail) from error
        time.sleep(every_s)  # polling state another thread or process changes


async def eventually(
    probe: Callable[[], T | Awaitable[T]],
    what: str,
    *,
    within_s: float = WITHIN_S,
    every_s: float = 0.02,
    in_thread: bool = False,
    ignoring: tuple[type[BaseException], ...] = (),
    detail: Detail = None,
) -> T:
    """Await ``probe`` (sync or async) until it is truthy; ``in_thread`` for blocking probes."""
    deadline = time.monotonic() + within_s
    while True:
        error: BaseException | None = None
        try:
            value = await asyncio.to_thread(probe) if in_thread else probe()
            if inspect.isawaitable(value):
                value = await value
        except ignoring as exc:
            value, error = None, exc
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise _timed_out(what, within_s, value, error, detail) from error
        await asyncio.sleep(every_s)  # polling state another task or process changes


async def in_time(awaitable: Awaitable[T], what: str, *, within_s: float = WITHIN_S) -> T:
    """Await ``awaitable``; past ``within_s`` cancel it and fail, naming ``what``."""
    timeout = asyncio.timeout(within_s)
    try:
        async with timeout:
            return await awaitable
    except TimeoutError:
        if not timeout.expired():
            raise  # the awaitable's own timeout, not ours
        raise AssertionError(f"timed out after {within_s:g} s waiting for {what}") from None
