"""A newer desired state pre-empts a download in progress; a later desire resumes it.

The executor and updater are real, on a real store; the controller is the fake update
source behind :class:`tests.agent.update_support.SlowSource`, whose artifacts stall half
way until the test lets them flow, so without pre-emption the newer desired state would
wait for a download that never ends (its stall timeout is an hour).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.update.download import DownloadConfig
from agent.update.preempt import Preempted, Preemption, preemptible
from agent.update.updater import UpdateConfig
from models.wire import DesiredModel, DesiredState, EventKind, ModelState, Severity, TargetRef
from tests.agent.update_support import (
    NAME,
    OLD,
    Events,
    Loader,
    SlowSource,
    executor,
    make_store,
    publish,
)
from tests.fakes.update_source import FakeUpdateSource
from tests.polling import eventually, in_time

DEVICE = "dev-preempt-1"
BIG = b"ONNX" + bytes(range(256)) * 256  # 64 KiB and a bit: a model worth resuming
HEAD = 16 << 10  # bytes the slow link sends before it stalls
SLOW_LINK = UpdateConfig(
    download=DownloadConfig(
        chunk_bytes=4096, stall_timeout_s=3600.0, max_attempts=1, min_free_bytes=0
    ),
    progress_every_s=0.0,
)
WITHIN_S = 30.0  # seconds: generous on a loaded machine; a pass takes milliseconds


def desired(version: int, target: TargetRef) -> DesiredState:
    return DesiredState(
        device_id=DEVICE, version=version, models=[DesiredModel(name=NAME, target=target)]
    )


def test_a_newer_desired_state_preempts_a_download_and_a_later_desire_resumes_it(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path / "store")  # serves version 1
    fake = FakeUpdateSource()
    new = publish(fake, BIG)
    old = fake.publish(f"{NAME}/1/emb.onnx", OLD, version="1", format="onnx")
    events = Events()

    async def scenario() -> None:
        slow = SlowSource(fake, HEAD)
        device = executor(store, Loader())
        device.on_outcomes = events.outcomes
        device.attach_updates(slow, events, SLOW_LINK)
        try:
            update = asyncio.create_task(device.apply_desired(desired(1, new)))
            await eventually(lambda: slow.stalled, "the download of version 2 stalled half way")

            # An abort: desired state 2 names the version that serves.
            abort = asyncio.create_task(device.apply_desired(desired(2, old)))
            applied = await in_time(abort, "desired state 2 applied", within_s=WITHIN_S)
            assert applied == []  # version 1 already serves: nothing to do
            stopped = await in_time(update, "the pre-empted reconcile", within_s=WITHIN_S)
            assert [(o.action, o.error) for o in stopped if o.error] == [
                ("update", "superseded by desired version 2")
            ]
            assert events.kinds() == [EventKind.UPDATE_FAILED, EventKind.MODEL_READY]
            [(severity, failed)] = events.of(EventKind.UPDATE_FAILED)
            assert severity is Severity.INFO
            assert failed["superseded"] is True
            assert (failed["phase"], failed["superseded_by"], failed["bytes"]) == (
                "download",
                2,
                HEAD,
            )
            assert (failed["version"], failed["sha256"]) == ("2", new.sha256)
            [model] = device.report(DEVICE).models
            assert (model.state, model.version) == (ModelState.READY, "1")
            [part] = store.root.rglob("*.part")
            assert part.stat().st_size == HEAD  # kept for a resume
            assert slow.sent == [HEAD]

            # Desired again: the download resumes where it stopped.
            slow.flowing.set()
            again = device.apply_desired(desired(3, new))
            assert await in_time(again, "desired state 3 applied", within_s=WITHIN_S)
            assert fake.requests[-1].headers["range"] == f"bytes={HEAD}-"
            assert slow.sent == [HEAD, len(BIG) - HEAD]  # the rest, not the whole again
            assert events.kinds()[2:] == [
                EventKind.UPDATE_VERIFIED,
                EventKind.UPDATE_INSTALLED,
                EventKind.UPDATE_HEALTHY,
            ]
            [model] = device.report(DEVICE).models
            assert (model.state, model.version) == (ModelState.READY, "2")
            assert not list(store.root.rglob("*.part"))
        finally:
            await slow.aclose()
            await fake.aclose()

    asyncio.run(scenario())


# -- the token and the wrapper ----------------------------------------------------------------


def test_a_step_that_ends_first_keeps_its_result() -> None:
    async def scenario() -> None:
        preemption = Preemption()

        async def step() -> str:
            preemption.request(5)  # asked for as the step ends: its work is kept
            return "done"

        assert await preemptible(step(), preemption) == "done"
        assert preemption.requested == Preempted(5)

    asyncio.run(scenario())


def test_a_preempted_step_is_cancelled_and_has_cleaned_up_when_it_returns() -> None:
    async def scenario() -> None:
        preemption = Preemption()
        started, cleaned = asyncio.Event(), []

        async def step() -> str:
            started.set()
            try:
                await asyncio.Event().wait()  # forever
            finally:
                await asyncio.sleep(0)  # cleanup that itself awaits
                cleaned.append(True)
            return "never"

        running = asyncio.create_task(preemptible(step(), preemption))
        await in_time(started.wait(), "the step to start")
        preemption.request(3)
        preemption.request(2)  # an older one changes nothing
        assert await in_time(running, "the pre-empted step") == Preempted(3)
        assert cleaned == [True]

    asyncio.run(scenario())


def test_a_step_preempted_before_it_starts_never_runs() -> None:
    async def scenario() -> None:
        preemption = Preemption()
        preemption.request(4)
        ran = []

        async def step() -> None:
            ran.append(True)

        assert await preemptible(step(), preemption) == Preempted(4)
        assert ran == []
        assert await preemptible(step(), None) is None  # no token: it just runs
        assert ran == [True]

    asyncio.run(scenario())
