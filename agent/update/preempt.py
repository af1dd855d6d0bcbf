"""Stopping a long download when a newer desired state arrives.

Reconciles run one at a time (:class:`agent.state.apply.ModelController` holds a lock),
and the download of a multi-GB model can take many minutes, so without this a newer
desired state (an abort that rolls the device back, say) would wait for an update that
is no longer wanted. The executor gives each reconcile a :class:`Preemption`; a newer
desired state requests it; the updater runs under :func:`preemptible` only the step that
is safe to abandon half way, the download, whose ``.part`` stays where it is so that a
later desire for the same target resumes it. Installing, activating and the health check
are never pre-empted: once begun they run to their end, so nothing half-installed is
ever activated.

Pre-emption is asked for, never forced from outside: the token is checked where the
updater allows it, and the download is cancelled there, by its own caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Preempted", "Preemption", "preemptible"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Preempted:
    """A step stopped because desired state ``by`` superseded the one it worked for."""

    by: int


class Preemption:
    """Asked of one reconcile when a newer desired state is waiting for it to end."""

    def __init__(self) -> None:
        self._requested = asyncio.Event()
        self._by = 0

    def request(self, by: int) -> None:
        """Desired state ``by`` supersedes the reconcile's: stop what can be stopped."""
        self._by = max(self._by, by)
        self._requested.set()

    @property
    def requested(self) -> Preempted | None:
        """Whether, and by which desired state, the reconcile has been pre-empted."""
        return Preempted(self._by) if self._requested.is_set() else None

    async def wait(self) -> None:
        await self._requested.wait()


async def preemptible(step: Coroutine[Any, Any, T], preemption: Preemption | None) -> T | Preempted:
    """Run ``step`` unless or until ``preemption`` is requested; then cancel it.

    A step that ends first, even as pre-emption is requested, keeps its result (work
    done is not thrown away). A cancelled step has finished cleaning up when this
    returns: the caller may touch what it was writing.
    """
    if preemption is None:
        return await step
    if (already := preemption.requested) is not None:
        step.close()  # never started
        return already
    task = asyncio.ensure_future(step)
    stop = asyncio.ensure_future(preemption.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it close its files before anyone else looks
    if not task.cancelled():
        return task.result()  # its value, or its exception
    preempted = preemption.requested
    assert preempted is not None
    return preempted
