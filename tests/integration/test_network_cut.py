"""The leader replica cut off from the network (not killed): the lease moves, and comes back.

A kill closes sockets, so the other side learns at once; a network partition drops
packets and tells nobody. Here the leading replica runs in a network namespace joined to
the host by one veth link (``scripts/servers.py``'s ``network_namespace``), and the link
is taken down: the replica loses PostgreSQL and the broker together, as when its
machine's cable is pulled. It stays alive meanwhile, so this checks what a kill cannot:
that the survivor takes the lease, and that the cut replica, once the link is back,
reconnects by itself and follows instead of taking the lease back. Real processes:
PostgreSQL of the test's own (listening on the link too), Mosquitto, two
``edgefleet serve``. Needs root (``ip netns``), as scripts/test runs.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from scripts import servers
from tests.integration.test_rollout_controllers import ADMIN_TOKEN, api, ok, until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not Path(servers.IP).exists(),
        reason="network namespaces need root and iproute2",
    ),
]

LEASE_S = 3.0


async def leader_view(url: str) -> dict[str, Any]:
    async with api(url) as client:
        body = await ok(await client.get("/api/v1/status"))
        return dict(body["leader"])


async def ready(url: str) -> bool:
    async with api(url) as client:
        try:
            return (await client.get("/readyz", timeout=3)).status_code == 200
        except Exception:
            return False


def test_the_leader_cut_off_from_the_network_hands_over_and_follows_once_back(
    tmp_path: Path,
) -> None:
    async def scenario(stack: ExitStack, ns: servers.NetworkNamespace) -> None:
        pg = stack.enter_context(servers.postgres_server(also_listen=ns.host_ip))
        url = stack.enter_context(servers.postgres_database(pg.admin_url))
        broker = stack.enter_context(servers.mosquitto(tmp_path / "mosquitto", bind="0.0.0.0"))

        def replica(name: str, database_url: str, broker_host: str, **more: Any) -> Any:
            return servers.running_controller(
                tmp_path,
                database_url,
                "--broker", f"mqtt://{broker_host}:{broker.port}",
                "--broker-auth-dir", str(broker.auth_dir),
                "--broker-pid-file", str(broker.pid_file),
                env={
                    "EDGEFLEET_FLEET_ADMIN_TOKEN": ADMIN_TOKEN,
                    "EDGEFLEET_FLEET_LEADER_LEASE_S": str(LEASE_S),
                    "EDGEFLEET_FLEET_CLIENT_ID": f"edgefleet-controller-{name}",
                    "EDGEFLEET_FLEET_SHARED_SUBSCRIPTION_GROUP": "controllers",
                },
                ready_s=60,
                name=name,
                data_dir=tmp_path / "data",
                **more,
            )  # fmt: skip

        inside_url = url.replace("@127.0.0.1:", f"@{ns.host_ip}:")
        cut = stack.enter_context(replica("cut", inside_url, ns.host_ip, netns=ns))
        await until(lambda: _leads(cut.url), "the replica in the namespace leading")
        other = await asyncio.to_thread(stack.enter_context, replica("other", url, "127.0.0.1"))
        before = await leader_view(other.url)
        assert not before["this_replica"]
        assert before["holder"] == (await leader_view(cut.url))["replica"]

        cut_at = time.monotonic()
        await asyncio.to_thread(ns.cut)
        await until(lambda: _leads(other.url), "the other replica taking the lease")
        took_s = time.monotonic() - cut_at
        after = await leader_view(other.url)
        assert after["epoch"] == before["epoch"] + 1
        assert took_s <= LEASE_S * 4 / 3 + 2.0, took_s  # the lease's bound, plus polling
        print(f"the lease moved {took_s:.1f} s after the cut ({LEASE_S:g} s lease)")

        healed_at = time.monotonic()
        await asyncio.to_thread(ns.heal)
        await until(lambda: ready(cut.url), "the cut replica ready again")
        print(f"the cut replica ready {time.monotonic() - healed_at:.1f} s after the heal")

        async def follows() -> bool:
            view = await leader_view(cut.url)
            return not view["this_replica"] and view["holder"] == after["replica"]

        await until(follows, "the cut replica following the new leader")
        final = await leader_view(other.url)
        assert final["this_replica"]
        assert final["epoch"] == after["epoch"]  # nobody took it back

    with ExitStack() as stack:
        ns = stack.enter_context(servers.network_namespace())
        asyncio.run(scenario(stack, ns))


async def _leads(url: str) -> bool:
    return bool((await leader_view(url))["this_replica"])
