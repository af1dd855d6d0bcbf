"""Leases: one controller replica at a time runs each fleet-wide job.

Replicas run the same code. The jobs that must run once across them (the rollout
engine, renewing TUF metadata and desired states, presence and retention) run only on
the replica that holds the ``leader`` lease. A lease is a row of ``leases``: who holds
it, until when, and an epoch that grows at every takeover. One conditional ``UPDATE``
(an ``INSERT`` the first time) claims or renews it, timed by the database's clock, so
two replicas can never both win and their own clocks need not agree:

- the holder renews every third of the lease (``ttl_s``); a failed renewal is retried;
- a holder that has not renewed for the lease, less a margin, by its own monotonic
  clock stops counting itself the leader before the database lets anyone take over;
- the others try every third of the lease and take it once it ran out: a leader that
  died (SIGKILL, power, a cut cable) is replaced within ``ttl_s * 4/3``;
- a replica that stops cleanly gives the lease up, and another takes it within
  ``ttl_s / 3``.

Leadership keeps replicas from doing the same work, it is not what keeps the work
correct: the jobs still write as if another replica could run them too (the rollout
engine's row locks and revision checks, conditional updates), so a leader stalled past
its lease can at worst repeat a round, never corrupt one.

Errors: a claim that cannot reach the database raises
:class:`~fleet.errors.DatabaseUnavailable` (transient); :class:`Leadership` logs it,
counts itself no longer leader once its lease is due, and tries again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from fleet.db import is_transient, unavailable
from fleet.tables import Lease

__all__ = [
    "LEADER",
    "Claim",
    "Leadership",
    "LeaseTerms",
    "claim",
    "give_up",
    "holds",
    "new_holder_id",
]

log = logging.getLogger(__name__)

LEADER = "leader"  # the lease whose holder runs every fleet-wide job

_leases = Lease.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class LeaseTerms:
    """How long a lease lasts, and so how soon a dead holder is replaced."""

    ttl_s: float = 10.0  # seconds a lease lasts unless renewed

    @property
    def renew_s(self) -> float:
        """Seconds between claims: a holder renews, the others try to take over."""
        return self.ttl_s / 3

    @property
    def margin_s(self) -> float:
        """Seconds before the lease runs out that its holder stops counting on it."""
        return min(1.0, self.ttl_s / 10)


def holds(sent_at: float, now: float, terms: LeaseTerms) -> bool:
    """Whether a renewal sent at ``sent_at`` (monotonic seconds) still holds at ``now``.

    The database started the lease after the renewal was sent, so counting from the
    moment it was sent ends early, never late.
    """
    return now < sent_at + terms.ttl_s - terms.margin_s


@dataclass(frozen=True)
class Claim:
    """A claim's outcome: who holds the lease now, as the database sees it."""

    held: bool  # the claimant holds it
    holder: str | None  # None: nobody ever held it
    epoch: int  # takeovers so far
    expires_in_s: float  # seconds left on it, by the database's clock


def new_holder_id() -> str:
    """A name no other process ever claims with: host, pid and a random part."""
    return f"{socket.gethostname()[:64]}/{os.getpid()}/{secrets.token_hex(4)}"


def _db_now(dialect: str) -> sa.ColumnElement[float]:
    """Seconds since the epoch by the database's clock, as a double."""
    if dialect == "postgresql":
        return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Double)
    return (sa.func.julianday("now") - 2440587.5) * 86400.0


def _insert(dialect: str) -> Any:
    return (postgresql if dialect == "postgresql" else sqlite).insert(_leases)


def _claim(conn: sa.Connection, name: str, holder: str, ttl_s: float) -> Claim:
    dialect = conn.dialect.name
    now = _db_now(dialect)
    c = _leases.c
    mine = c.holder == holder
    renewed = conn.execute(
        sa.update(_leases)
        .where(c.name == name, sa.or_(mine, c.expires_at <= now))
        .values(
            holder=holder,
            epoch=sa.case((mine, c.epoch), else_=c.epoch + 1),
            acquired_at=sa.case((mine, c.acquired_at), else_=now),
            expires_at=now + ttl_s,
        )
        .returning(c.epoch)
    ).first()
    if renewed is not None:
        return Claim(True, holder, int(renewed[0]), ttl_s)
    first = conn.execute(
        _insert(dialect)
        .values(name=name, holder=holder, epoch=1, acquired_at=now, expires_at=now + ttl_s)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(c.epoch)
    ).first()
    if first is not None:
        return Claim(True, holder, 1, ttl_s)
    other = conn.execute(
        sa.select(c.holder, c.epoch, c.expires_at - now).where(c.name == name)
    ).one()
    return Claim(False, str(other[0]), int(other[1]), max(float(other[2]), 0.0))


def claim(engine: sa.Engine, name: str, holder: str, ttl_s: float) -> Claim:
    """Take or renew ``name`` for ``ttl_s`` seconds if free, ours, or run out (blocking)."""
    try:
        with engine.begin() as conn:
            return _claim(conn, name, holder, ttl_s)
    except sa_exc.SQLAlchemyError as exc:
        if is_transient(exc):
            raise unavailable(exc) from exc
        raise


def give_up(engine: sa.Engine, name: str, holder: str) -> None:
    """End ``holder``'s lease now, so another replica takes over at its next try."""
    c = _leases.c
    with engine.begin() as conn:
        conn.execute(
            sa.update(_leases)
            .where(c.name == name, c.holder == holder)
            .values(expires_at=_db_now(conn.dialect.name))
        )


class Leadership:
    """Claims the ``leader`` lease while entered; :meth:`leads` says whether we hold it."""

    def __init__(
        self,
        engine: sa.Engine,
        terms: LeaseTerms,
        *,
        holder: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._terms = terms
        self.holder = holder or new_holder_id()
        self._monotonic = monotonic
        self._sent_at: float | None = None  # when the last successful claim was sent
        self.last: Claim | None = None  # the last claim's outcome
        self._task: asyncio.Task[None] | None = None

    def leads(self) -> bool:
        """Whether this replica holds the lease now, and so may run fleet-wide jobs."""
        sent_at = self._sent_at
        return sent_at is not None and holds(sent_at, self._monotonic(), self._terms)

    async def __aenter__(self) -> Leadership:
        await self._try()
        self._task = asyncio.create_task(self._loop(), name="leader-lease")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sent_at is not None:
            self._sent_at = None
            try:
                await asyncio.to_thread(give_up, self._engine, LEADER, self.holder)
            except Exception as exc:  # the lease runs out by itself
                log.warning("could not give up the leader lease: %s", exc)
            else:
                log.info("gave up the leader lease")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._terms.renew_s)
            await self._try()

    async def _try(self) -> None:
        was = self.leads()
        sent_at = self._monotonic()
        try:
            outcome = await asyncio.to_thread(
                claim, self._engine, LEADER, self.holder, self._terms.ttl_s
            )
        except Exception as exc:
            if was and not self.leads():
                log.error("lost the leader lease: cannot renew it (%s)", exc)
            else:
                log.warning("cannot claim the leader lease: %s", exc)
            return
        self.last = outcome
        if outcome.held:
            self._sent_at = sent_at
            if not was:
                log.info("this replica (%s) leads, epoch %d", self.holder, outcome.epoch)
        else:
            self._sent_at = None
            if was:
                log.error("lost the leader lease to %s", outcome.holder)
