"""Store-and-forward on disk: telemetry samples and events wait here for the broker's ack.

Everything the device sends (except its live ONLINE/OFFLINE status and the retained
reported state, which describe *now*) is appended here first; the sender publishes
from the head, in order, and deletes an entry only after the broker's QoS 1 PUBACK.
A SIGKILL or power cut between the two costs a duplicate, never a loss, and ids in
every message let the controller store each one once.

Why SQLite, WAL and ``synchronous=FULL``: each append is one transaction that is on
stable storage when :meth:`Spool.append` returns. WAL with ``NORMAL`` survives a
killed process but may lose the last commits on a power cut, and edge boxes get
unplugged; the write rate here (a sample every few seconds, a delete per ack) is far
too low for FULL's extra fsync to matter.

The spool holds at most ``max_bytes`` of payload (default 64 MiB). A new entry that
does not fit evicts the oldest ones; evictions are counted per kind in the database
(so a restart keeps the count) until the sender reports them: samples in the next
``TelemetryBatch.dropped``, and both kinds in a ``SPOOL_DROPPED`` event appended when
that report is acknowledged. A write the disk refuses (full, read-only, corrupt) is
counted the same way and logged; the spool never raises into serving. A database
that cannot be opened is moved aside (corrupt) or replaced by an in-memory one
(unwritable), and :attr:`SpoolStats.durable` says so.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

__all__ = ["Drops", "Entry", "EntryKind", "Spool", "SpoolStats"]

log = logging.getLogger(__name__)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS entries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        id TEXT NOT NULL,
        created REAL NOT NULL,
        size INTEGER NOT NULL,
        payload BLOB NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
_DROPPED_SAMPLES = "dropped_samples"
_DROPPED_EVENTS = "dropped_events"
_NEXT_SAMPLE_SEQ = "next_sample_seq"


class EntryKind(StrEnum):
    """What an entry holds, which decides how it is sent."""

    SAMPLE = "sample"  # one TelemetrySample (JSON); consecutive ones travel as one batch
    EVENT = "event"  # one Event (JSON), published as is


@dataclass(frozen=True)
class Entry:
    """One spooled message, as read back from the head."""

    seq: int  # spool order (not the sample's own seq)
    kind: EntryKind
    id: str
    payload: bytes


@dataclass(frozen=True)
class Drops:
    """Entries lost to the byte budget or a failed write, not yet reported."""

    samples: int = 0
    events: int = 0

    @property
    def total(self) -> int:
        return self.samples + self.events

    def __add__(self, other: Drops) -> Drops:
        return Drops(self.samples + other.samples, self.events + other.events)

    def add(self, kind: EntryKind, n: int = 1) -> Drops:
        return self + (Drops(samples=n) if kind is EntryKind.SAMPLE else Drops(events=n))


@dataclass(frozen=True)
class SpoolStats:
    """The spool's size and health, for /v1/fleet."""

    entries: int
    bytes: int  # payload bytes held
    max_bytes: int
    dropped: Drops  # lost and not yet reported
    durable: bool  # False: the database could not be opened on disk; entries live in memory
    path: str | None


Notice = Callable[[Drops], tuple[str, bytes]]
"""Builds the SPOOL_DROPPED event (id, payload) that reports ``Drops``."""


class Spool:
    """An ordered, byte-bounded, crash-safe queue in SQLite; thread-safe, blocking calls.

    The link calls it through ``asyncio.to_thread`` so an fsync never stalls the event loop.
    """

    def __init__(self, path: Path | None, max_bytes: int = 64 * 2**20) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._unsaved = Drops()  # lost while the database refused writes
        self._write_failing = False
        self._floor = 0  # entries up to this seq were delivered but could not be deleted yet
        self._conn, self._durable = self._open(path)

    # -- opening ------------------------------------------------------------------

    def _open(self, path: Path | None) -> tuple[sqlite3.Connection, bool]:
        if path is None:
            return self._connect(":memory:", reseed=False), False
        try:
            return self._connect(str(path), reseed=False), True
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # cannot open or write: keep the file
                log.error(
                    "spool %s cannot be opened (%s): telemetry is kept in memory only, and is "
                    "lost if the agent restarts before the broker acknowledges it",
                    path,
                    exc,
                )
                return self._connect(":memory:", reseed=True), False
            aside = _move_aside(path)
            log.error("spool %s is corrupt (%s): moved to %s, starting empty", path, exc, aside)
        try:
            return self._connect(str(path), reseed=True), True
        except sqlite3.Error as exc:
            log.error("spool %s cannot be recreated (%s): keeping telemetry in memory", path, exc)
            return self._connect(":memory:", reseed=True), False

    def _connect(self, target: str, *, reseed: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(target, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            for statement in _SCHEMA:
                conn.execute(statement)
            entries, size = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries"
            ).fetchone()
            counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        except sqlite3.Error:
            conn.close()
            raise
        self._entries, self._bytes = int(entries), int(size)
        self._dropped = Drops(
            int(counters.get(_DROPPED_SAMPLES, 0)), int(counters.get(_DROPPED_EVENTS, 0))
        )
        if _NEXT_SAMPLE_SEQ in counters:
            self._next_seq = int(counters[_NEXT_SAMPLE_SEQ])
        elif reseed:  # earlier samples' numbers are unknown: stay above them
            self._next_seq = time.time_ns() // 1_000_000
        else:
            self._next_seq = 0
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- writing ------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self._floor:  # delivered earlier, while deletes failed; already uncounted
                conn.execute("DELETE FROM entries WHERE seq <= ?", (self._floor,))
            yield conn
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _make_room(self, conn: sqlite3.Connection, size: int, held: int) -> tuple[int, int, Drops]:
        """Evict the oldest entries until ``size`` more bytes fit; (entries, bytes, drops) freed."""
        need = held + size - self.max_bytes
        freed_entries, freed_bytes, evicted = 0, 0, Drops()
        if need <= 0:
            return freed_entries, freed_bytes, evicted
        last = None
        for seq, kind, entry_size in conn.execute(
            "SELECT seq, kind, size FROM entries WHERE seq > ? ORDER BY seq", (self._floor,)
        ):
            last = seq
            freed_entries += 1
            freed_bytes += int(entry_size)
            evicted = evicted.add(_kind(kind))
            if freed_bytes >= need:
                break
        if last is not None:
            conn.execute("DELETE FROM entries WHERE seq <= ?", (last,))
        return freed_entries, freed_bytes, evicted

    def _save_counters(self, conn: sqlite3.Connection, dropped: Drops) -> None:
        conn.executemany(
            "INSERT INTO counters(name, value) VALUES(?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            [
                (_DROPPED_SAMPLES, dropped.samples),
                (_DROPPED_EVENTS, dropped.events),
                (_NEXT_SAMPLE_SEQ, self._next_seq),
            ],
        )

    def _insert(self, kind: EntryKind, entry_id: str, payload: bytes) -> bool:
        size = len(payload)
        if size > self.max_bytes:
            log.error("dropping a %d-byte %s: larger than the whole spool", size, kind.value)
            self._unsaved = self._unsaved.add(kind)
            return False
        try:
            with self._transaction() as conn:
                n, freed, evicted = self._make_room(conn, size, self._bytes)
                conn.execute(
                    "INSERT INTO entries(kind, id, created, size, payload) VALUES(?, ?, ?, ?, ?)",
                    (kind.value, entry_id, time.time(), size, payload),
                )
                dropped = self._dropped + self._unsaved + evicted
                self._save_counters(conn, dropped)
        except sqlite3.Error as exc:
            self._write_failed(exc)
            self._unsaved = self._unsaved.add(kind)
            return False
        self._write_ok()
        self._floor = 0
        if evicted.total:
            log.warning("spool full (%d bytes): dropped the %d oldest entries", self.max_bytes, n)
        self._entries += 1 - n
        self._bytes += size - freed
        self._dropped, self._unsaved = dropped, Drops()
        return True

    def append(self, kind: EntryKind, entry_id: str, payload: bytes) -> bool:
        """Queue one entry; False (and counted as dropped) if the disk refused it."""
        with self._lock:
            return self._insert(kind, entry_id, payload)

    def append_sample(self, entry_id: str, render: Callable[[int], bytes]) -> int | None:
        """Queue a telemetry sample numbered by the spool: ``render(seq)`` gives its payload.

        Returns the sample's seq, or None if it was dropped. A dropped sample still
        uses its number, so the controller sees the gap.
        """
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            return seq if self._insert(EntryKind.SAMPLE, entry_id, render(seq)) else None

    def _write_failed(self, exc: sqlite3.Error) -> None:
        if not self._write_failing:
            log.error(
                "spool %s refused a write (%s): dropping telemetry until it recovers",
                self.path,
                exc,
            )
        self._write_failing = True

    def _write_ok(self) -> None:
        if self._write_failing:
            log.warning("spool %s accepts writes again", self.path)
        self._write_failing = False

    # -- reading and acknowledging -------------------------------------------------

    def head(self, max_samples: int, max_bytes: int) -> list[Entry]:
        """The oldest entry, or the run of consecutive samples at the head (bounded).

        An event comes alone; samples come together, at most ``max_samples`` and
        ``max_bytes`` of payload (but always at least one).
        """
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT seq, kind, id, payload FROM entries WHERE seq > ? ORDER BY seq LIMIT ?",
                    (self._floor, max(1, max_samples)),
                ).fetchall()
            except sqlite3.Error as exc:
                log.error("spool %s cannot be read: %s", self.path, exc)
                return []
        out: list[Entry] = []
        total = 0
        for seq, kind, entry_id, payload in rows:
            entry = Entry(int(seq), _kind(kind), str(entry_id), bytes(payload))
            if out and (
                entry.kind is not EntryKind.SAMPLE
                or out[0].kind is not EntryKind.SAMPLE
                or total + len(entry.payload) > max_bytes
            ):
                break
            out.append(entry)
            total += len(entry.payload)
        return out

    def ack(
        self,
        entries: Sequence[Entry],
        *,
        reported_samples: int = 0,
        notice: Notice | None = None,
    ) -> bool:
        """Forget ``entries`` (the broker has them) and settle reported drops, atomically.

        ``reported_samples`` is the ``dropped`` the acknowledged batch carried. Those,
        and every dropped event so far, are settled; if any were, ``notice(settled)``
        builds a SPOOL_DROPPED event queued in the same transaction. False if the
        database refused the delete: the entries are then skipped in memory (and
        deleted by the next transaction that works), so they are not sent again
        unless the agent restarts first (a duplicate, never a loss).
        """
        return self._remove(entries, reported_samples=reported_samples, notice=notice)

    def discard(self, entries: Sequence[Entry]) -> bool:
        """Forget entries that cannot be sent (unreadable); they count as dropped."""
        lost = Drops()
        for entry in entries:
            lost = lost.add(entry.kind)
        return self._remove(entries, lost=lost)

    def _remove(
        self,
        entries: Sequence[Entry],
        *,
        reported_samples: int = 0,
        notice: Notice | None = None,
        lost: Drops | None = None,
    ) -> bool:
        seqs = [e.seq for e in entries]
        with self._lock:
            pending = self._dropped + self._unsaved + (lost or Drops())
            settled = Drops(
                min(max(reported_samples, 0), pending.samples),
                pending.events if notice is not None else 0,
            )
            try:
                with self._transaction() as conn:
                    marks = _marks(len(seqs))  # only "?" placeholders: values stay bound
                    removed, freed = conn.execute(
                        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries "  # noqa: S608
                        f"WHERE seq IN ({marks})",
                        seqs,
                    ).fetchone()
                    conn.execute(f"DELETE FROM entries WHERE seq IN ({marks})", seqs)  # noqa: S608
                    added, added_bytes, evicted = 0, 0, Drops()
                    if notice is not None and settled.total:
                        event_id, payload = notice(settled)
                        n, evicted_bytes, evicted = self._make_room(
                            conn, len(payload), self._bytes - int(freed)
                        )
                        conn.execute(
                            "INSERT INTO entries(kind, id, created, size, payload) "
                            "VALUES(?, ?, ?, ?, ?)",
                            (EntryKind.EVENT.value, event_id, time.time(), len(payload), payload),
                        )
                        added, added_bytes = 1 - n, len(payload) - evicted_bytes
                    remaining = Drops(
                        pending.samples - settled.samples, pending.events - settled.events
                    )
                    remaining = remaining + evicted
                    self._save_counters(conn, remaining)
            except sqlite3.Error as exc:
                self._write_failed(exc)
                fresh = [e for e in entries if e.seq > self._floor]
                if fresh:
                    self._floor = max(e.seq for e in fresh)
                    self._entries -= len(fresh)
                    self._bytes -= sum(len(e.payload) for e in fresh)
                return False
            self._write_ok()
            self._floor = 0
            self._entries += added - int(removed)
            self._bytes += added_bytes - int(freed)
            self._dropped, self._unsaved = remaining, Drops()
            return True

    # -- status -------------------------------------------------------------------

    def drops(self) -> Drops:
        """Entries lost and not yet reported (persisted ones plus failed writes)."""
        with self._lock:
            return self._dropped + self._unsaved

    def stats(self) -> SpoolStats:
        with self._lock:
            return SpoolStats(
                entries=self._entries,
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                dropped=self._dropped + self._unsaved,
                durable=self._durable,
                path=str(self.path) if self.path is not None else None,
            )


def _kind(value: str) -> EntryKind:
    try:
        return EntryKind(value)
    except ValueError:
        return EntryKind.EVENT  # unknown kinds are sent alone, like events


def _marks(n: int) -> str:
    return ",".join("?" * n) or "NULL"


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        src = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            src.replace(aside.with_name(aside.name + suffix))
    return aside
