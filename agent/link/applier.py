"""Handing desired states and reconciles to the executor without ever waiting on it.

Applying a desired state can take many minutes (the download of a multi-GB model), and
the link must stay free to take the next one: an abort that rolls the device back cannot
wait for the update it cancels. :class:`Applier` therefore hands each newer desired state
to the host *at once*, even while an older one is still being applied; the host
(:class:`agent.state.apply.ModelController`) pre-empts the download only the older state
wanted and reconciles the newest next. A plain reconcile (a RECONCILE command, a retry
after a passing failure) asked for while the host is busy runs once it is idle, however
many were asked for meanwhile.

Each call's outcomes, or the exception that ended it, go to the callbacks the link
gives; the applier itself decides nothing about them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from agent.link.outcomes import ReconcileOutcome
from models.wire import DesiredState

__all__ = ["Applier", "Executor"]

log = logging.getLogger(__name__)


class Executor(Protocol):
    """What the applier drives: the host's executor."""

    async def apply_desired(self, desired: DesiredState) -> Sequence[ReconcileOutcome]: ...

    async def reconcile(self) -> Sequence[ReconcileOutcome]: ...


Call = Callable[[], Awaitable[Sequence[ReconcileOutcome]]]


class Applier:
    """Runs the host's reconciles in the background; see the module docstring."""

    def __init__(
        self,
        host: Executor,
        done: Callable[[Sequence[ReconcileOutcome]], None],
        failed: Callable[[Exception], None],
    ) -> None:
        self._host = host
        self._done = done  # each call's outcomes (empty after a failure)
        self._failed = failed  # an exception a call raised: a bug in the executor
        self._running: set[asyncio.Task[None]] = set()
        self._reconcile_later = False

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def apply(self, desired: DesiredState) -> None:
        """Hand ``desired`` to the host now, whatever it is doing."""
        self._start(lambda: self._host.apply_desired(desired))

    def reconcile(self) -> None:
        """Reconcile now if the host is idle, else once it is (requests coalesce)."""
        if self._running:
            self._reconcile_later = True
        else:
            self._start(self._host.reconcile)

    async def aclose(self) -> None:
        """Cancel what runs (the host's own cleanup runs) and wait for it to end."""
        self._reconcile_later = False
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, call: Call) -> None:
        task = asyncio.create_task(self._run(call), name="fleet-reconcile")
        self._running.add(task)
        task.add_done_callback(self._ended)

    async def _run(self, call: Call) -> None:
        outcomes: Sequence[ReconcileOutcome] = ()
        try:
            outcomes = await call()
        except Exception as exc:  # the executor reports per model; this is a bug
            self._failed(exc)
        self._done(outcomes)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not self._running and self._reconcile_later:
            self._reconcile_later = False
            self._start(self._host.reconcile)
