"""The bulk writers: SQLite executemany in batches, PostgreSQL ``COPY``.

A big table's plain indexes are dropped while it loads and rebuilt after it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import sqlalchemy as sa
from sqlmodel import SQLModel

from fleet.simulate.seed.progress import _Progress


def _batched(rows: Iterable[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    iterator = iter(rows)
    while batch := list(islice(iterator, size)):
        yield batch


class _Writer:
    """Bulk rows into tables over one connection: ``COPY`` on PostgreSQL, else executemany.

    A big table's plain indexes are dropped while it loads and built again after it:
    building an index once from sorted keys is far cheaper than millions of inserts at
    random places in it. Its unique constraints stay, so a duplicate still fails.
    """

    SQLITE_CACHE_KIB = 256 * 1024  # SQLite's page cache while seeding (its default is 2 MiB)
    REBUILD_FROM_ROWS = 50_000  # tables loaded with more rows than this build indexes after

    def __init__(self, conn: sa.Connection, batch_rows: int, progress: _Progress) -> None:
        self._conn = conn
        self._batch_rows = batch_rows
        self._progress = progress
        self.rows: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(f"PRAGMA cache_size=-{self.SQLITE_CACHE_KIB}")
            conn.commit()

    def dicts(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        """Rows as dicts; keys the table lacks (a column another version added) are left out."""
        table = SQLModel.metadata.tables[name]
        columns = [c for c in rows[0] if c in table.c] if rows else []
        self.tuples(name, columns, (tuple(row[c] for c in columns) for row in rows), len(rows))

    def tuples(
        self,
        name: str,
        columns: Sequence[str],
        rows: Iterable[tuple[Any, ...]],
        total: int | None = None,
    ) -> None:
        table = SQLModel.metadata.tables[name]
        self._progress.start(name, total)
        big = (total or 0) > self.REBUILD_FROM_ROWS
        indexes = [i for i in table.indexes if not i.unique] if big else []
        with self._conn.begin():
            for index in indexes:
                index.drop(self._conn)
        if self._conn.dialect.name == "postgresql":
            written = self._copy(table, columns, rows)
        else:
            written = self._insert(table, columns, rows)
        if indexes:
            self._progress.note(f"{name}: building {len(indexes)} index(es)")
        with self._conn.begin():
            for index in indexes:
                index.create(self._conn)
        self.rows[name] = written
        self.seconds[name] = self._progress.finish()

    def _insert(
        self, table: sa.Table, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]
    ) -> int:
        written = 0
        statement = sa.insert(table)
        for batch in _batched(rows, self._batch_rows):
            with self._conn.begin():
                self._conn.execute(statement, [dict(zip(columns, r, strict=True)) for r in batch])
            written += len(batch)
            self._progress.add(len(batch))
        return written

    def _copy(
        self, table: sa.Table, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]
    ) -> int:
        # JSON columns travel as JSON text, Python None as JSON null, as Core writes them.
        json_at = [i for i, c in enumerate(columns) if isinstance(table.c[c].type, sa.JSON)]
        names = ", ".join(f'"{c}"' for c in columns)
        sql = f'COPY "{table.name}" ({names}) FROM STDIN'
        written = 0
        for batch in _batched(rows, 20 * self._batch_rows):
            with self._conn.begin():
                raw: Any = self._conn.connection.driver_connection
                with raw.cursor() as cursor, cursor.copy(sql) as copy:
                    for row in batch:
                        if json_at:
                            values = list(row)
                            for i in json_at:
                                values[i] = json.dumps(values[i], separators=(",", ":"))
                            copy.write_row(values)
                        else:
                            copy.write_row(row)
            written += len(batch)
            self._progress.add(len(batch))
        return written
