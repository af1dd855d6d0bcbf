"""The database engine and its schema migrations; SQLite by default, PostgreSQL at scale.

One code path for both: :func:`make_engine` picks the driver and the settings each
needs (SQLite: the file created owner-only, WAL so readers never block the writer, a
busy timeout so writers wait instead of failing, foreign keys on; PostgreSQL:
psycopg 3 and pre-ping so a restarted server costs no failed request). :func:`migrate`
brings any database to the latest Alembic revision at start-up; with PostgreSQL an
advisory lock makes replicas that start together migrate one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.pool import StaticPool

from fleet.errors import ConfigError, DatabaseUnavailable
from fleet.files import private_file

__all__ = [
    "DESIRED_PUBLISH_LOCK",
    "IN_CHUNK",
    "SQLITE_BUSY_TIMEOUT_MS",
    "SQLITE_SIDE_FILES",
    "advisory_lock",
    "alembic_config",
    "current_revision",
    "head_revision",
    "in_chunks",
    "is_transient",
    "make_engine",
    "migrate",
    "ping",
    "unavailable",
]

log = logging.getLogger(__name__)

IN_CHUNK = 500  # values per SQL IN list: well under every driver's parameter limit


def in_chunks(items: Sequence[str], size: int = IN_CHUNK) -> list[Sequence[str]]:
    """``items`` cut into IN lists a statement can take, in order."""
    return [items[i : i + size] for i in range(0, len(items), size)]


SQLITE_BUSY_TIMEOUT_MS = 10_000  # how long a writer waits for the lock before failing
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")  # what SQLite may add beside the database
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x45_46_4C_54  # "EFLT": pg_advisory_lock key serialising migrations


def _url(url: str) -> URL:
    try:
        parsed = sa.make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"{url!r} is not a database URL like sqlite:///path/fleet.db "
            "or postgresql://user@host/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgres":  # the Heroku-style spelling
        parsed = parsed.set(drivername="postgresql")
        backend = "postgresql"
    if backend == "postgresql" and "+" not in parsed.drivername:
        parsed = parsed.set(drivername="postgresql+psycopg")  # the driver edgefleet ships
    if backend not in {"sqlite", "postgresql"}:
        raise ConfigError(f"unsupported database {backend!r}: use sqlite or postgresql")
    return parsed


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL, far fewer fsyncs
    finally:
        cursor.close()


def _private_sqlite_files(database: Path) -> None:
    """Create the database file owner-only before SQLite does (it would make it 0644).

    It holds credential hashes. SQLite gives the files it adds beside it (``-wal``,
    ``-shm``, ``-journal``) the database file's permissions; ones left by an older
    controller are tightened here, as is an existing database.
    """
    try:
        database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_file(database)
        for suffix in SQLITE_SIDE_FILES:
            with contextlib.suppress(FileNotFoundError):
                private_file(database.with_name(database.name + suffix), create=False)
    except OSError as exc:
        raise ConfigError(f"cannot create the database file {database}: {exc}") from None


# libpq's network settings, unless the URL sets them (``?connect_timeout=30``). Without
# them a replica cut off from PostgreSQL by the network waits on a dead connection for as
# long as the kernel retransmits (15 minutes on Linux): with them a connect gives up
# after 5 s and a connection that stopped answering is dropped within about 15 s, so the
# controller reports the outage, retries, and resumes once the network is back.
_POSTGRES_NETWORK: dict[str, int] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,  # ms: data unacknowledged this long ends the connection
}


def make_engine(url: str) -> Engine:
    """An engine for ``url``; raises :class:`ConfigError` for URLs edgefleet cannot use."""
    parsed = _url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            memory = parsed.database in {None, "", ":memory:"}
            if not memory and parsed.database is not None:
                _private_sqlite_files(Path(parsed.database))
            engine = sa.create_engine(
                parsed,
                connect_args={"check_same_thread": False},
                poolclass=StaticPool if memory else None,
            )
            sa.event.listen(engine, "connect", _on_sqlite_connect)
            return engine
        defaults = {k: v for k, v in _POSTGRES_NETWORK.items() if k not in parsed.query}
        return sa.create_engine(parsed, pool_pre_ping=True, connect_args=defaults)
    except (NoSuchModuleError, ImportError) as exc:
        raise ConfigError(f"no driver for {parsed.drivername}: {exc}") from None


def is_transient(exc: BaseException) -> bool:
    """True for database errors that retrying later may fix (lost connection, lock)."""
    if isinstance(exc, OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OSError)


def unavailable(exc: BaseException) -> DatabaseUnavailable:
    """``exc`` as the transient error callers retry, with its first line."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseUnavailable(f"database unavailable: {first[:300]}")


def ping(engine: Engine) -> None:
    """Raise :class:`DatabaseUnavailable` unless the database answers a trivial query."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except OperationalError as exc:
        raise DatabaseUnavailable(f"the database does not answer: {exc.orig}") from None


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """Alembic's configuration, built in code: no alembic.ini to find or to drift."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "fleet/migrations holds no revisions"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None when it was never migrated."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


DESIRED_PUBLISH_LOCK = 0x45_46_44_53  # "EFDS": held while desired states are published
BROKER_AUTH_LOCK = 0x45_46_42_41  # "EFBA": held while a replica reads and writes broker users


@contextlib.asynccontextmanager
async def advisory_lock(engine: Engine, key: int) -> AsyncIterator[None]:
    """Hold a PostgreSQL advisory lock across awaits; other replicas wait for it.

    Transaction-scoped on a connection of its own, so a replica that dies releases it
    with its connection. On SQLite it is a no-op: one process uses the file, and
    orders its own work. Raises :class:`DatabaseUnavailable` when it cannot be taken.
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    conn = await asyncio.to_thread(_lock, engine, key)
    try:
        yield
    finally:
        await asyncio.to_thread(_unlock, conn)


def _lock(engine: Engine, key: int) -> sa.Connection:
    try:
        conn = engine.connect()
    except sa_exc.SQLAlchemyError as exc:
        raise unavailable(exc) from exc
    try:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    except sa_exc.SQLAlchemyError as exc:
        conn.close()
        raise unavailable(exc) from exc
    return conn


def _unlock(conn: sa.Connection) -> None:
    with contextlib.suppress(sa_exc.SQLAlchemyError):  # a lost connection released it
        conn.rollback()
    conn.close()


def migrate(engine: Engine) -> None:
    """Upgrade the database to the latest revision; a no-op when it is already there."""
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
                )
            before = MigrationContext.configure(conn).get_current_revision()
            command.upgrade(alembic_config(conn), "head")
            after = MigrationContext.configure(conn).get_current_revision()
    except CommandError as exc:
        raise ConfigError(
            f"cannot migrate the database: {exc} (was it created by a newer edgefleet?)"
        ) from None
    except OperationalError as exc:
        raise DatabaseUnavailable(f"the database does not answer: {exc.orig}") from None
    if before != after:
        log.info("database migrated from %s to %s", before or "empty", after)
