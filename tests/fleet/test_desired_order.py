"""Desired states reach the broker in version order, whichever replica stored them.

Two :class:`DesiredStates` on one database stand for two controller replicas, each
with its own (fake) link. The broker keeps the last retained message, so a replica
that publishes an older state after another published a newer one would leave devices
that connect later on the older one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa
from pydantic import JsonValue
from sqlmodel import Session

from fleet.db import DESIRED_PUBLISH_LOCK, advisory_lock
from fleet.desired import DesiredStates, WantedModel, store_desired
from fleet.tables import Device
from models.wire import DesiredState
from tests.fakes.fleet_link import FakeLink
from tests.fleet.rollout_world import World
from tests.polling import wait_until

DEVICE = "dev-1"


@dataclass(frozen=True)
class Wanted:
    models: Sequence[WantedModel] = ()
    config: dict[str, JsonValue] = field(default_factory=dict)
    fallback: dict[str, JsonValue] = field(default_factory=dict)


@pytest.fixture
def world(database_url: str) -> Iterator[World]:
    world = World.on(database_url)
    world.device(DEVICE, serves=None)
    yield world
    world.db.dispose()


def replica(world: World) -> tuple[DesiredStates, FakeLink]:
    link = FakeLink()
    return DesiredStates(world.db, link, world.clock), link


def versions(link: FakeLink) -> list[int]:
    return [state.version for state in link.published]


def test_a_state_replaced_by_another_replica_before_it_went_out_is_not_published(
    world: World,
) -> None:
    """A stores v1; B stores v2 before A publishes: A sends nothing, B sends v2 (then v3)."""
    a, link_a = replica(world)
    b, link_b = replica(world)

    def store_then_b_stores_newer() -> list[DesiredState]:
        with Session(world.db) as session:
            mine = store_desired(session, DEVICE, [], Wanted(), world.clock())
            session.commit()
        with Session(world.db) as session:  # replica B, between A's commit and its publish
            store_desired(session, DEVICE, [], Wanted(), world.clock())
            session.commit()
        return [mine]

    async def scenario() -> None:
        [stale] = await a.apply(store_then_b_stores_newer)
        assert stale.state.version == 1
        assert stale.published  # its replacement goes out instead
        delivered = await b.set_for_device(DEVICE, Wanted())
        assert delivered.state.version == 3

    asyncio.run(scenario())
    assert versions(link_a) == []
    assert versions(link_b) == [3]


def test_the_newest_state_is_published_by_whichever_replica_stored_it(world: World) -> None:
    a, link_a = replica(world)
    b, link_b = replica(world)

    async def scenario() -> None:
        for n in range(6):
            await (a if n % 2 else b).set_for_device(DEVICE, Wanted())

    asyncio.run(scenario())
    assert versions(link_b) == [1, 3, 5]
    assert versions(link_a) == [2, 4, 6]


def waiting_for_lock(engine: sa.Engine) -> bool:
    """Some connection waits for the desired-publish advisory lock (PostgreSQL)."""
    with engine.connect() as conn:
        waiting = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND NOT granted AND objid = :key"
            ),
            {"key": DESIRED_PUBLISH_LOCK},
        ).scalar_one()
    return bool(waiting)


def test_a_replica_publishes_only_once_another_replicas_publishing_is_done(
    world: World,
) -> None:
    if world.db.dialect.name != "postgresql":
        pytest.skip("replicas share PostgreSQL; one SQLite process orders its own publishing")
    b, link_b = replica(world)

    async def scenario() -> None:
        async with advisory_lock(world.db, DESIRED_PUBLISH_LOCK):  # replica A publishing
            publishing = asyncio.create_task(b.set_for_device(DEVICE, Wanted()))
            await asyncio.to_thread(
                wait_until, lambda: waiting_for_lock(world.db), "B to wait for the lock"
            )
            assert link_b.published == []
        delivered = await publishing
        assert delivered.published

    asyncio.run(scenario())
    assert versions(link_b) == [1]
    with world.db.connect() as conn:
        stored = conn.execute(sa.select(Device.desired_version).where(Device.id == DEVICE))
        assert stored.scalar_one() == 1
