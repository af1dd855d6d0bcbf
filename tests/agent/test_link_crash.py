"""SIGKILL the link while it spools: nothing it spooled is lost, numbers never repeat.

The link runs in a child process (this module's ``child``) that takes telemetry
samples as fast as it can and prints each seq once the spool has committed it. The
test kills it with the broker down, restarts it with the broker up, and checks that
the controller side received every printed sample, in order; then kills it while
connected and sees the last will.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.servers import MosquittoBroker
from tests.agent.link_support import Watcher, authorize, write_identity
from tests.agent.test_link_session import DEVICE, DEVICE_REPORT, PASSWORD, settings
from tests.fakes.link_host import FakeHost, FakeTelemetry
from tests.polling import eventually

pytestmark = pytest.mark.integration  # the link in child processes, a real Mosquitto

REPO = Path(__file__).resolve().parents[2]


def child(state_dir: str) -> None:
    """Run the link and spool samples until killed; print each committed seq."""
    from agent.link.fleet import FleetLink

    async def run() -> None:
        link = FleetLink(settings(Path(state_dir)), FakeHost(), FakeTelemetry(), DEVICE_REPORT)
        async with link:
            while True:
                seq = await link.sample_now()
                if seq is not None:
                    sys.stdout.write(f"{seq}\n")
                    sys.stdout.flush()
                await asyncio.sleep(0.005)  # pace the producer, not hiding a race

    asyncio.run(run())


class Child:
    def __init__(self, state_dir: Path, out: Path) -> None:
        self.out = out
        with out.open("wb") as stdout:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", f"from {__name__} import child; child({str(state_dir)!r})"],
                stdout=stdout,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )

    def seqs(self) -> list[int]:
        return [int(line) for line in self.out.read_text().splitlines() if line.isdigit()]

    async def wait_for_seqs(self, count: int, within_s: float = 60.0) -> None:
        def spooled() -> bool:
            assert self.proc.poll() is None, self.out.read_text()[-3000:]
            return len(self.seqs()) >= count

        await eventually(
            spooled,
            f"{count} samples spooled by the child",
            within_s=within_s,
            detail=lambda: f"only {len(self.seqs())} samples spooled",
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def sample_seqs(watcher: Watcher) -> list[int]:
    return [int(s["seq"]) for m in watcher.on("telemetry") for s in m.json()["samples"]]


def test_a_killed_link_loses_nothing_it_spooled(broker: MosquittoBroker, tmp_path: Path) -> None:
    authorize(broker, {DEVICE: PASSWORD})
    state_dir = tmp_path / "state"
    write_identity(state_dir, broker, DEVICE, PASSWORD)

    async def scenario() -> None:
        watcher = Watcher(broker, client_id="crash-watcher", persistent=True)
        await watcher.start()
        first = Child(state_dir, tmp_path / "first.out")
        try:
            await watcher.wait_for(lambda w: sample_seqs(w), "samples from the child")
            await asyncio.to_thread(broker.stop)
            spooled_before = len(first.seqs())
            await first.wait_for_seqs(spooled_before + 100)  # all of these wait in the spool
        finally:
            first.kill()
        printed = first.seqs()

        await asyncio.to_thread(broker.start)
        second = Child(state_dir, tmp_path / "second.out")
        try:
            await watcher.wait_for(
                lambda w: set(printed) <= set(sample_seqs(w)),
                "every sample the killed child spooled",
                within_s=60,
            )
            await second.wait_for_seqs(10)
            await watcher.wait_for(
                lambda w: set(second.seqs()[:10]) <= set(sample_seqs(w)),
                "the second child's first ten samples",
            )
            wills_before = len(watcher.on("events"))
        finally:
            second.kill()
        # Killed while connected: the broker publishes the last will for it.
        will = await watcher.wait_for(
            lambda w: [
                m
                for m in w.on("events")[wills_before:]
                if m.json()["kind"] == "offline" and m.json()["message"] == "connection lost"
            ],
            "the last will",
            within_s=30,
        )
        assert will[0].json()["device_id"] == DEVICE
        await watcher.stop()
        assert min(second.seqs()) > max(printed)  # numbers continue across the crash
        seen: set[int] = set()
        order = []
        for seq in sample_seqs(watcher):
            if seq not in seen:
                seen.add(seq)
                order.append(seq)
        assert order == sorted(order), "samples arrived out of order"

    asyncio.run(scenario())
