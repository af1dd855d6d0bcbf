"""The engine and the migrations, on real SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import fleet.tables  # noqa: F401  (the tables the migrations must match)
from fleet.db import alembic_config, current_revision, head_revision, make_engine, migrate, ping
from fleet.errors import ConfigError, DatabaseUnavailable


@pytest.fixture
def engine(database_url: str) -> Any:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _diff(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, SQLModel.metadata))


def test_migrations_build_exactly_the_tables_in_fleet_tables(engine: sa.Engine) -> None:
    migrate(engine)
    assert _diff(engine) == []
    assert current_revision(engine) == head_revision()


def test_revisions_form_one_line() -> None:
    """Two heads (two branches merged without a merge revision) would break upgrades."""
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [head_revision()]
    assert [r.revision for r in script.walk_revisions()][-1] == "0001_initial"


def test_migrate_is_idempotent_and_keeps_data(engine: sa.Engine) -> None:
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO groups (name, description, created_at) VALUES ('a', '', :t)"),
            {"t": "2031-01-01 00:00:00"},
        )
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM groups")).scalar_one() == 1


def test_downgrade_to_empty_and_back(engine: sa.Engine) -> None:
    migrate(engine)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate(engine)
    assert _diff(engine) == []


def test_an_empty_database_differs_from_the_tables(engine: sa.Engine) -> None:
    """The comparison itself can fail: without migrations every table is missing."""
    assert {d[0] for d in _diff(engine)} == {"add_table", "add_index"}


def test_database_from_a_newer_controller_is_a_config_error(engine: sa.Engine) -> None:
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'from_the_future'"))
    with pytest.raises(ConfigError, match="newer edgefleet"):
        migrate(engine)


def test_sqlite_gets_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'fleet.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() >= 1000
    engine.dispose()
    assert (tmp_path / "sub" / "fleet.db").is_file()  # the folder was created


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("permissive_umask")
def test_sqlite_files_are_created_owner_only(tmp_path: Path) -> None:
    """fleet.db holds credential hashes: 0600, and SQLite's WAL files follow its mode."""
    db = tmp_path / "fleet.db"
    engine = make_engine(f"sqlite:///{db}")
    migrate(engine)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT count(*) FROM devices"))
        beside = [db.with_name(db.name + suffix) for suffix in ("-wal", "-shm")]
        assert all(p.is_file() for p in beside)  # WAL mode: both exist while connected
        assert [mode(p) for p in (db, *beside)] == [0o600, 0o600, 0o600]
    engine.dispose()


@pytest.mark.usefixtures("permissive_umask")
def test_an_existing_sqlite_database_and_its_wal_are_tightened(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    older = sqlite3.connect(db)  # as SQLite makes them: 0644 under this umask
    older.execute("PRAGMA journal_mode=WAL")
    older.execute("CREATE TABLE t (x)")
    older.commit()
    wal = db.with_name(db.name + "-wal")
    try:
        assert (mode(db), mode(wal)) == (0o644, 0o644)
        engine = make_engine(f"sqlite:///{db}")
        assert (mode(db), mode(wal)) == (0o600, 0o600)
        engine.dispose()
    finally:
        older.close()


def test_sqlite_enforces_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrate(engine)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO device_tags (device_id, tag) VALUES ('dev-nope', 'x')"))
    engine.dispose()


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u@db.example/fleet", "postgresql+psycopg"),
        ("postgres://u@db.example/fleet", "postgresql+psycopg"),
        ("postgresql+psycopg://u@db.example/fleet", "postgresql+psycopg"),
    ],
)
def test_postgresql_urls_use_psycopg_3(url: str, driver: str) -> None:
    engine = make_engine(url)  # connects lazily: nothing is contacted here
    assert engine.url.drivername == driver
    engine.dispose()


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url", "oracle://h/db"])
def test_unsupported_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        make_engine(url)


def test_ping_reports_an_unreachable_database() -> None:
    engine = make_engine("postgresql://nobody@127.0.0.1:1/nothing?connect_timeout=2")
    with pytest.raises(DatabaseUnavailable):
        ping(engine)
    engine.dispose()
