"""The leader lease: one holder at a time, taken over only once it ran out (SQLite and PostgreSQL).

Expiry is simulated by moving a lease's end into the past in the database, never by
waiting for it; the replicas' processes are in tests/integration/test_scale_out.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from fleet.db import make_engine
from fleet.errors import DatabaseUnavailable
from fleet.leases import LEADER, Claim, Leadership, LeaseTerms, claim, give_up, holds
from fleet.tables import Lease

TTL_S = 60.0


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    SQLModel.metadata.create_all(engine)
    yield engine
    engine.dispose()


def run_out(engine: sa.Engine) -> None:
    """Move every lease's end 1000 s into the past: as if its holder died long ago."""
    with engine.begin() as conn:
        conn.execute(sa.update(Lease).values(expires_at=Lease.expires_at - TTL_S - 1000))


def test_a_renewal_holds_until_the_lease_less_a_margin() -> None:
    terms = LeaseTerms(ttl_s=9.0)
    assert (terms.renew_s, terms.margin_s) == (3.0, 0.9)
    assert holds(100.0, 100.0, terms)
    assert holds(100.0, 108.0, terms)
    assert not holds(100.0, 108.1, terms)
    assert LeaseTerms(ttl_s=0.5).margin_s == 0.05


def test_the_first_claimant_holds_the_lease_and_the_others_see_who(engine: sa.Engine) -> None:
    assert claim(engine, LEADER, "a", TTL_S) == Claim(True, "a", 1, TTL_S)
    refused = claim(engine, LEADER, "b", TTL_S)
    assert (refused.held, refused.holder, refused.epoch) == (False, "a", 1)
    assert TTL_S - 5 < refused.expires_in_s <= TTL_S
    assert claim(engine, LEADER, "a", TTL_S).held  # a renewal keeps the epoch
    assert claim(engine, LEADER, "a", TTL_S).epoch == 1


def test_a_lease_that_ran_out_is_taken_over_and_its_old_holder_cannot_renew(
    engine: sa.Engine,
) -> None:
    claim(engine, LEADER, "a", TTL_S)
    run_out(engine)
    assert claim(engine, LEADER, "b", TTL_S) == Claim(True, "b", 2, TTL_S)
    late = claim(engine, LEADER, "a", TTL_S)
    assert (late.held, late.holder, late.epoch) == (False, "b", 2)


def test_a_lease_given_up_is_free_at_once_and_only_its_holder_can_give_it_up(
    engine: sa.Engine,
) -> None:
    claim(engine, LEADER, "a", TTL_S)
    give_up(engine, LEADER, "b")  # not the holder: nothing changes
    assert not claim(engine, LEADER, "b", TTL_S).held
    give_up(engine, LEADER, "a")
    assert claim(engine, LEADER, "b", TTL_S).held


def test_leases_of_different_names_are_independent(engine: sa.Engine) -> None:
    assert claim(engine, LEADER, "a", TTL_S).held
    assert claim(engine, "other", "b", TTL_S).held


def test_of_many_claimants_at_once_exactly_one_wins(engine: sa.Engine) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("one SQLite writer at a time: the race is PostgreSQL's")
    start = threading.Barrier(8)

    def one(holder: str) -> bool:
        start.wait()
        return claim(engine, LEADER, holder, TTL_S).held

    for _ in range(5):
        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(one, [f"r{n}" for n in range(8)]))
        assert won.count(True) == 1
        run_out(engine)


def test_a_claim_without_a_database_is_transient() -> None:
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:9/nowhere?connect_timeout=2")
    try:
        with pytest.raises(DatabaseUnavailable):
            claim(engine, LEADER, "a", TTL_S)
    finally:
        engine.dispose()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_leadership_leads_while_its_renewals_hold_and_gives_the_lease_up_on_exit(
    engine: sa.Engine,
) -> None:
    clock = Clock()
    terms = LeaseTerms(ttl_s=TTL_S)

    async def scenario() -> None:
        async with Leadership(engine, terms, holder="a", monotonic=clock) as a:
            assert a.leads()
            async with Leadership(engine, terms, holder="b", monotonic=clock) as b:
                assert not b.leads()
                assert b.last is not None
                assert b.last.holder == "a"
            clock.now += TTL_S - terms.margin_s  # no renewal came back in time
            assert not a.leads()
        async with Leadership(engine, terms, holder="c", monotonic=clock) as c:
            assert c.leads()  # a gave the lease up as it stopped
            assert c.last is not None
            assert c.last.epoch == 2

    asyncio.run(scenario())


def test_leadership_without_a_database_does_not_lead_and_does_not_fail() -> None:
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:9/nowhere?connect_timeout=2")

    async def scenario() -> None:
        async with Leadership(engine, LeaseTerms(ttl_s=TTL_S)) as nobody:
            assert not nobody.leads()
            assert nobody.last is None

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()
