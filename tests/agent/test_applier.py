"""The link's applier: a newer desired state reaches the host at once, reconciles coalesce.

A host whose applies last until the test releases them stands in for the executor (the
real one, and its pre-emption, are in test_preempt.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from agent.link.applier import Applier
from agent.state.apply import Outcome
from models.wire import DesiredState
from tests.polling import eventually, in_time

DEVICE = "dev-applier-1"


class GatedHost:
    """Each apply of a version with a gate waits for it; everything is recorded."""

    def __init__(self) -> None:
        self.gates: dict[int, asyncio.Event] = {}
        self.started: list[int] = []
        self.finished: list[int] = []
        self.reconciles = 0
        self.broken = False

    async def apply_desired(self, desired: DesiredState) -> Sequence[Outcome]:
        self.started.append(desired.version)
        gate = self.gates.get(desired.version)
        if gate is not None:
            await gate.wait()
        if self.broken:
            raise RuntimeError("a bug in the executor")
        self.finished.append(desired.version)
        return [Outcome("m", "update", "later", retry=True)]

    async def reconcile(self) -> Sequence[Outcome]:
        self.reconciles += 1
        return []


class Recorded:
    def __init__(self) -> None:
        self.done: list[Sequence[Any]] = []
        self.failed: list[Exception] = []


def applier_for(host: GatedHost) -> tuple[Applier, Recorded]:
    seen = Recorded()
    return Applier(host, seen.done.append, seen.failed.append), seen


def state(version: int) -> DesiredState:
    return DesiredState(device_id=DEVICE, version=version)


def test_a_newer_desired_state_reaches_the_host_while_an_older_one_is_applied() -> None:
    async def scenario() -> None:
        host = GatedHost()
        host.gates[1] = asyncio.Event()
        applier, seen = applier_for(host)
        applier.apply(state(1))
        await eventually(lambda: host.started == [1], "desired state 1 being applied")
        applier.apply(state(2))
        await eventually(
            lambda: host.started == [1, 2], "desired state 2 handed over while 1 still applies"
        )
        assert host.finished == [2]
        host.gates[1].set()
        await eventually(lambda: not applier.busy, "both applies to end")
        assert host.finished == [2, 1]
        assert [len(outcomes) for outcomes in seen.done] == [1, 1]

    asyncio.run(scenario())


def test_reconciles_asked_for_while_busy_run_once_afterwards() -> None:
    async def scenario() -> None:
        host = GatedHost()
        host.gates[1] = asyncio.Event()
        applier, _ = applier_for(host)
        applier.apply(state(1))
        for _ in range(3):
            applier.reconcile()
        await eventually(lambda: host.started == [1], "desired state 1 being applied")
        assert host.reconciles == 0  # not while the host is busy
        host.gates[1].set()
        await eventually(lambda: host.reconciles == 1, "one reconcile once idle")
        await eventually(lambda: not applier.busy, "the reconcile to end")
        assert host.reconciles == 1
        applier.reconcile()  # idle: at once
        await eventually(lambda: host.reconciles == 2, "a reconcile while idle")

    asyncio.run(scenario())


def test_a_failing_call_is_reported_and_the_applier_goes_on() -> None:
    async def scenario() -> None:
        host = GatedHost()
        host.broken = True
        applier, seen = applier_for(host)
        applier.apply(state(1))
        await eventually(lambda: seen.failed, "the failure reported")
        assert [str(exc) for exc in seen.failed] == ["a bug in the executor"]
        assert seen.done == [()]  # no outcomes: nothing to retry
        applier.reconcile()
        await eventually(lambda: host.reconciles == 1, "a reconcile after the failure")

    asyncio.run(scenario())


def test_closing_cancels_what_runs() -> None:
    async def scenario() -> None:
        host = GatedHost()
        host.gates[1] = asyncio.Event()
        applier, seen = applier_for(host)
        applier.apply(state(1))
        applier.reconcile()
        await eventually(lambda: host.started == [1], "desired state 1 being applied")
        await in_time(applier.aclose(), "the applier to close")
        assert not applier.busy
        assert (host.finished, host.reconciles, seen.done) == ([], 0, [])

    asyncio.run(scenario())
