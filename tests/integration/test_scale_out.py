"""Three controller replicas on one PostgreSQL, behind haproxy, sharing ingest: kill one.

Real processes throughout: ``edgefleet serve`` replicas (each its own MQTT client id, all
in one MQTT 5 shared subscription group), Mosquitto, PostgreSQL, Debian's haproxy in
front, and simulated devices. The fleet-wide jobs run on the replica holding the leader
lease (``fleet/leases.py``); a SIGKILLed leader's lease runs out (2 s here) and another
replica takes over. What is checked is read from the database: every sample a device
had acknowledged stored exactly once, and each rollout stage started once, in order.
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from scripts import servers
from scripts.servers import MosquittoBroker
from tests.integration.test_rollout_controllers import (
    DEADLINE_S,
    STAGED,
    Database,
    all_on_v1,
    api,
    assert_each_device_got_the_change_once,
    assert_revisions_unbroken,
    assert_stages_once_in_order,
    controller,
    fleet_on_v1,
    ok,
    simulation,
    status_of,
    until,
)

pytestmark = pytest.mark.integration

LEASE_S = "2"


def replica(
    tmp_path: Path, broker: MosquittoBroker, url: str, name: str, *, client: str = ""
) -> AbstractContextManager[servers.Controller]:
    """Replica ``name``; its MQTT client id is ``client`` (a restarted one's old name)."""
    return controller(
        tmp_path,
        broker,
        url,
        name,
        client_id=f"edgefleet-controller-{client or name}",
        shared_subscription_group="controllers",
        leader_lease_s=LEASE_S,
    )


async def leader_of(replicas: dict[str, servers.Controller]) -> dict[str, Any]:
    """Each live replica's view of the lease: who leads, as each one sees it."""
    views = {}
    for name, running in replicas.items():
        async with api(running.url) as client:
            views[name] = (await ok(await client.get("/api/v1/status")))["leader"]
    return views


async def one_leader(replicas: dict[str, servers.Controller]) -> str | None:
    """The name of the one replica that leads, once every replica agrees on it."""
    views = await leader_of(replicas)
    leading = [name for name, view in views.items() if view["this_replica"]]
    if len(leading) != 1:
        return None
    holder = views[leading[0]]["replica"]
    return leading[0] if all(v["holder"] == holder for v in views.values()) else None


def start_replicas(
    stack: ExitStack, tmp_path: Path, broker: MosquittoBroker, url: str, names: list[str]
) -> dict[str, servers.Controller]:
    return {name: stack.enter_context(replica(tmp_path, broker, url, name)) for name in names}


@pytest.mark.parametrize("count", [2, 3])
def test_replicas_elect_one_leader_and_a_killed_leader_is_replaced(
    tmp_path: Path, broker: MosquittoBroker, postgres_url: str, count: int
) -> None:
    """One leader among ``count``; SIGKILL it: a survivor takes over, one epoch later.

    Meanwhile haproxy keeps answering: the dead replica leaves its rotation.
    """
    names = ["a", "b", "c"][:count]

    async def scenario(stack: ExitStack) -> None:
        replicas = await asyncio.to_thread(
            start_replicas, stack, tmp_path, broker, postgres_url, names
        )
        backends = [r.url.removeprefix("http://") for r in replicas.values()]
        lb = stack.enter_context(servers.haproxy(tmp_path / "haproxy", backends))
        first = await until(lambda: one_leader(replicas), "one leader")
        epoch = (await leader_of(replicas))[first]["epoch"]
        killed_at = time.monotonic()
        assert await asyncio.to_thread(replicas.pop(first).kill) == -9
        second = await until(lambda: one_leader(replicas), "a new leader")
        took_s = time.monotonic() - killed_at
        assert second != first
        assert (await leader_of(replicas))[second]["epoch"] == epoch + 1
        print(f"{count} replicas: the lease moved {took_s:.1f} s after the kill")
        async with api(lb) as client:  # every request answered by a live replica
            for _ in range(3 * count):
                await ok(await client.get("/api/v1/status"))

    with ExitStack() as stack:
        asyncio.run(scenario(stack))


def telemetry_counts(db: Database) -> tuple[int, int]:
    """Samples stored, and distinct (device, seq) among them."""
    [row] = db.rows("SELECT count(*) AS n, count(DISTINCT (device_id, seq)) AS d FROM telemetry")
    return int(row.n), int(row.d)


def test_a_replica_killed_during_ingest_loses_nothing_and_stores_nothing_twice(
    tmp_path: Path, broker: MosquittoBroker, postgres_url: str
) -> None:
    """Devices send a sample every 0.5 s to three replicas; one is SIGKILLed, then restarted.

    The broker keeps what the dead replica had not acknowledged in its session, and
    hands it over when it comes back under its client id (as a supervisor restarts
    it); the other two keep storing meanwhile. Every sample a device had acknowledged
    is stored once.
    """
    devices = 12
    db = Database(postgres_url)

    async def scenario(stack: ExitStack, doomed: ExitStack) -> None:
        replicas = await asyncio.to_thread(
            start_replicas, stack, tmp_path, broker, postgres_url, ["a", "b"]
        )
        replicas["c"] = await asyncio.to_thread(
            doomed.enter_context, replica(tmp_path, broker, postgres_url, "c")
        )
        async with api(replicas["a"].url) as client:
            secret = await fleet_on_v1(client, devices)
        async with simulation(replicas["b"].url, secret, devices, update_s=1.0) as sim:

            async def stored_by_all() -> bool:
                views = {}
                for name, running in replicas.items():
                    async with api(running.url) as client:
                        views[name] = (await ok(await client.get("/api/v1/status")))["link"]
                return all(v["stored"] > 0 for v in views.values())

            await until(stored_by_all, "every replica storing samples")
            assert await asyncio.to_thread(replicas.pop("c").kill) == -9
            at_kill = telemetry_counts(db)[0]
            await until(lambda: telemetry_counts(db)[0] > at_kill + devices, "ingest goes on")
            replicas["c"] = await asyncio.to_thread(
                stack.enter_context, replica(tmp_path, broker, postgres_url, "c2", client="c")
            )
            await until(lambda: telemetry_counts(db)[0] > at_kill + 3 * devices, "more ingest")
            counters = sim.stats.counters
        # PUBACKed by the broker: must be stored
        await each_acknowledged_sample_stored_once(db, counters.published, counters.sent)

    try:
        with ExitStack() as stack, ExitStack() as doomed:
            asyncio.run(scenario(stack, doomed))
    finally:
        db.dispose()


async def each_acknowledged_sample_stored_once(db: Database, acknowledged: int, sent: int) -> None:
    """Every sample the broker acknowledged is stored (once the backlog drains), none twice."""
    await until(
        lambda: telemetry_counts(db)[0] >= acknowledged,
        f"{acknowledged} acknowledged samples stored",
        lambda: {"stored, distinct": telemetry_counts(db)},
    )
    stored, distinct = telemetry_counts(db)
    assert stored == distinct
    assert acknowledged <= stored <= sent


def test_the_leader_killed_during_a_rollout_stage_hands_it_on_with_no_stage_repeated(
    tmp_path: Path, broker: MosquittoBroker, postgres_url: str
) -> None:
    """Three replicas; the leader is SIGKILLed as stage 1 starts; the rollout completes.

    The survivors take the lease and go on from what the database holds: each stage
    started once, in order; each device got one new desired state. The killed replica is
    started again under its MQTT client id, as a supervisor would: Mosquitto goes on
    giving a dead member of a shared subscription group its share of messages, queued
    in its session until it returns (docs/scale.md, "Replicas").
    """
    devices, stages, quotas = 12, 4, [2, 3, 6, 12]  # canary 2, then 25%, 50%, 100%
    db = Database(postgres_url)

    async def scenario(stack: ExitStack) -> None:
        replicas = await asyncio.to_thread(
            start_replicas, stack, tmp_path, broker, postgres_url, ["a", "b", "c"]
        )
        db.log_rollout_writes()
        backends = [r.url.removeprefix("http://") for r in replicas.values()]
        lb = stack.enter_context(servers.haproxy(tmp_path / "haproxy", backends))
        async with api(lb) as client:
            secret = await fleet_on_v1(client, devices)
        async with simulation(lb, secret, devices, update_s=1.0) as sim:
            ids = [d.identity.device_id for d in sim.devices]
            async with api(lb) as client:
                before = await all_on_v1(client, db, ids)
                rollout_id = (await ok(await client.post("/api/v1/rollouts", json=STAGED)))["id"]

            def started() -> bool:
                return 1 in db.stages(rollout_id, "rollout.stage_started")

            await until(started, "stage 1 started", detail=status_of(db, rollout_id))
            leader = await until(lambda: one_leader(replicas), "one leader")
            assert await asyncio.to_thread(replicas.pop(leader).kill) == -9
            # Its supervisor starts it again under its client id: what the broker queued
            # in its session meanwhile (its share of device reports) is then stored.
            replicas[f"{leader}2"] = await asyncio.to_thread(
                stack.enter_context,
                replica(tmp_path, broker, postgres_url, f"{leader}2", client=leader),
            )

            def completed() -> bool:
                return bool(db.rollout(rollout_id)["status"] == "completed")

            await until(completed, "the rollout completed", detail=status_of(db, rollout_id))
            counters = sim.stats.counters
            assert (counters.desired, counters.updated) == (2 * devices, 2 * devices)
            assert (counters.rolled_back, counters.update_failed) == (0, 0)
        assert_stages_once_in_order(db, rollout_id, stages)
        assert_each_device_got_the_change_once(db, rollout_id, before, quotas)
        writes = assert_revisions_unbroken(db, rollout_id)
        writers = {writer for _, _, writer in writes}
        assert leader in writers, writers  # the rollout changed hands
        assert len(writers) >= 2, writers

    try:
        with ExitStack() as stack:
            asyncio.run(scenario(stack))
    finally:
        db.dispose()


def test_haproxy_spreads_requests_over_every_ready_replica(
    tmp_path: Path, broker: MosquittoBroker, postgres_url: str
) -> None:
    """Each replica answers some of the requests sent through the balancer."""

    async def scenario(stack: ExitStack) -> None:
        replicas = await asyncio.to_thread(
            start_replicas, stack, tmp_path, broker, postgres_url, ["a", "b", "c"]
        )
        backends = [r.url.removeprefix("http://") for r in replicas.values()]
        lb = stack.enter_context(servers.haproxy(tmp_path / "haproxy", backends))
        seen: set[str] = set()
        async with api(lb) as client:

            async def every_replica_answered() -> bool:
                body = await ok(await client.get("/api/v1/status"))
                seen.add(body["leader"]["replica"])
                return len(seen) == 3

            await until(every_replica_answered, "an answer from every replica")

    with ExitStack() as stack:
        asyncio.run(scenario(stack))


async def ready(url: str) -> bool:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        return (await client.get("/readyz")).status_code == 200


def test_postgres_restarted_under_load_loses_nothing_and_the_fleet_converges(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """Two replicas on a PostgreSQL of the test's own, crashed (``immediate``) and restarted.

    While it is down devices keep publishing (the broker takes their samples into the
    replicas' sessions), the replicas say they are not ready, and an admin's change is
    refused with a 503 that says to retry. Once it is back: every acknowledged sample
    stored once, one leader again, and a desired state set then reaches every device.
    """
    devices = 12

    async def scenario(stack: ExitStack, pg: servers.PostgresServer, db: Database) -> None:
        replicas = await asyncio.to_thread(
            start_replicas, stack, tmp_path, broker, db.url, ["a", "b"]
        )
        urls = [r.url for r in replicas.values()]
        backends = [url.removeprefix("http://") for url in urls]
        lb = stack.enter_context(servers.haproxy(tmp_path / "haproxy", backends))
        async with api(lb) as client:
            secret = await fleet_on_v1(client, devices)
        async with simulation(lb, secret, devices, update_s=1.0) as sim:
            ids = [d.identity.device_id for d in sim.devices]
            await until(lambda: telemetry_counts(db)[0] >= devices, "samples stored")
            await asyncio.to_thread(pg.crash)
            published = sim.stats.counters.published

            async def none_ready() -> bool:
                return not any([await ready(url) for url in urls])

            await until(none_ready, "every replica not ready")
            async with api(urls[0]) as client:
                refused = await client.put("/api/v1/groups/lab/desired", json={"models": []})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "database_unavailable"
            assert "retry" in refused.json()["error"]["message"]

            def broker_took_samples() -> bool:
                return sim.stats.counters.published >= published + 2 * devices

            await until(broker_took_samples, "devices publishing through the outage")
            await asyncio.to_thread(pg.start)

            async def all_ready() -> bool:
                return all([await ready(url) for url in urls])

            await until(all_ready, "every replica ready again")
            await until(lambda: one_leader(replicas), "one leader")
            async with api(lb) as client:
                await all_on_v1(client, db, ids)
        counters = sim.stats.counters
        await each_acknowledged_sample_stored_once(db, counters.published, counters.sent)

    with ExitStack() as stack:
        pg = stack.enter_context(servers.postgres_server())
        db = Database(stack.enter_context(servers.postgres_database(pg.admin_url)))
        stack.callback(db.dispose)
        asyncio.run(scenario(stack, pg, db))


_FORM_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')


async def sign_in(client: httpx.AsyncClient, name: str, password: str) -> None:
    """Through the form, as a browser does: the login page, then the POST, then a page."""
    page = await client.get("/ui/login")
    found = _FORM_TOKEN.search(page.text)
    assert found is not None, page.text
    form = {"name": name, "password": password, "login_token": found.group(1), "next": "/ui/"}
    answer = await client.post("/ui/login", data=form)
    assert answer.status_code == 303, answer.text


async def first_event(client: httpx.AsyncClient, topics: str) -> str:
    """The name of the first event the page's live feed sends."""
    async with client.stream("GET", "/ui/events", params={"topics": topics}) as stream:
        assert stream.status_code == 200
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                return line.removeprefix("event: ")
    raise AssertionError("the event stream ended")


def test_a_browser_signs_in_through_any_replica_and_gets_live_updates_from_the_others(
    tmp_path: Path, broker: MosquittoBroker, postgres_url: str
) -> None:
    """Sessions and the dashboard's live feed live in PostgreSQL, not in one replica.

    The browser signs in through haproxy (its requests land on different replicas) and
    its session works on each replica. Replica ``a`` has a broker of its own with no
    device on it, so every device report is stored by ``b``; a page listening on ``a``
    still hears of it.
    """
    password = "correct horse battery staple"

    async def scenario(stack: ExitStack) -> None:
        lonely = stack.enter_context(servers.mosquitto(tmp_path / "lonely"))
        a = await asyncio.to_thread(
            stack.enter_context, controller(tmp_path, lonely, postgres_url, "a", client_id="a")
        )
        b = await asyncio.to_thread(
            stack.enter_context, controller(tmp_path, broker, postgres_url, "b", client_id="b")
        )
        lb = stack.enter_context(servers.haproxy(tmp_path / "haproxy", [a.url[7:], b.url[7:]]))
        async with api(lb) as admin:
            user = {"name": "ada", "role": "admin", "password": password}
            await ok(await admin.post("/api/v1/users", json=user))
            secret = await fleet_on_v1(admin, 2)
        async with httpx.AsyncClient(base_url=lb, timeout=15) as browser:
            await sign_in(browser, "ada", password)
            cookies = browser.cookies
        for replica_url in (a.url, b.url):
            async with httpx.AsyncClient(base_url=replica_url, cookies=cookies) as page:
                answer = await page.get("/ui/")
                assert answer.status_code == 200, (replica_url, answer.status_code)
                assert "ada" in answer.text
        async with httpx.AsyncClient(base_url=a.url, cookies=cookies, timeout=30) as page:
            listening = asyncio.create_task(first_event(page, "devices"))
            async with simulation(b.url, secret, 2, update_s=1.0):
                assert await asyncio.wait_for(listening, DEADLINE_S) == "devices"

    with ExitStack() as stack:
        asyncio.run(scenario(stack))
