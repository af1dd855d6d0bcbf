"""Blocking database work from the alert tasks, safe to cancel.

The app cancels its background tasks and then disposes of the database engine. A
worker thread cannot be cancelled, so a task cancelled while its thread holds a
connection would leave that connection to the garbage collector. :func:`in_thread`
lets the thread finish its transaction first, then passes the cancellation on (as
:meth:`fleet.rollout.engine.RolloutEngine.run` does for its steps).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["in_thread"]

P = ParamSpec("P")
T = TypeVar("T")


async def in_thread(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` in a worker thread; cancelled, it waits for the thread."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        raise
