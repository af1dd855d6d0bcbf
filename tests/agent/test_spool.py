"""The on-disk spool: order, byte budget, drop counts, persistence, ack, broken databases."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from agent.link.spool import Drops, EntryKind, Spool


def payload(n: int, size: int = 100) -> bytes:
    body = json.dumps({"n": n}).encode()
    return body + b" " * (size - len(body))


def fill(spool: Spool, count: int, size: int = 100) -> None:
    for n in range(count):
        assert spool.append(EntryKind.SAMPLE, f"id{n:06d}", payload(n, size))


def rows(path: Path) -> list[tuple[str, str]]:
    """(kind, id) of every entry, read the way an operator would, with sqlite3."""
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT kind, id FROM entries ORDER BY seq").fetchall()


def numbers(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [json.loads(p)["n"] for (p,) in conn.execute("SELECT payload FROM entries")]


def test_entries_come_back_in_order_and_samples_travel_together(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.append(EntryKind.SAMPLE, "s1", payload(1))
    spool.append(EntryKind.SAMPLE, "s2", payload(2))
    spool.append(EntryKind.EVENT, "e3", payload(3))
    spool.append(EntryKind.SAMPLE, "s4", payload(4))
    first = spool.head(500, 10**6)
    assert [e.id for e in first] == ["s1", "s2"]  # the run of samples stops at the event
    assert spool.ack(first)
    event = spool.head(500, 10**6)
    assert [(e.id, e.kind) for e in event] == [("e3", EntryKind.EVENT)]
    assert spool.ack(event)
    assert [e.id for e in spool.head(500, 10**6)] == ["s4"]
    spool.close()


def test_head_is_bounded_by_count_and_bytes_but_never_empty(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    fill(spool, 10, size=100)
    assert len(spool.head(4, 10**6)) == 4
    assert len(spool.head(500, 350)) == 3
    assert len(spool.head(500, 10)) == 1  # one oversized entry still goes alone
    spool.close()


def test_a_full_spool_drops_the_oldest_and_counts_them_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, max_bytes=1000)
    fill(spool, 10)
    assert spool.stats().bytes == 1000
    spool.append(EntryKind.EVENT, "event-1", payload(10))
    spool.append(EntryKind.SAMPLE, "sample-11", payload(11, size=250))  # evicts three
    assert numbers(path) == [4, 5, 6, 7, 8, 9, 10, 11]
    assert spool.drops() == Drops(samples=4, events=0)
    stats = spool.stats()
    assert (stats.entries, stats.bytes) == (8, 950)
    spool.close()

    again = Spool(path, max_bytes=1000)
    assert again.drops() == Drops(samples=4)
    assert numbers(path) == [4, 5, 6, 7, 8, 9, 10, 11]
    assert (again.stats().entries, again.stats().bytes) == (8, 950)
    again.close()


def test_acking_a_batch_settles_the_drops_it_reported_and_queues_a_notice(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, max_bytes=600)
    spool.append(EntryKind.EVENT, "old-event", payload(0))
    fill(spool, 7)  # the event and sample 0 are evicted
    assert spool.drops() == Drops(samples=1, events=1)
    batch = spool.head(500, 10**6)
    assert [e.id for e in batch] == [f"id{n:06d}" for n in range(1, 7)]
    reported = spool.drops().samples  # what the batch carries in "dropped"
    notices: list[Drops] = []

    def notice(settled: Drops) -> tuple[str, bytes]:
        notices.append(settled)
        return f"notice-{len(notices)}", payload(99)

    spool.append(EntryKind.SAMPLE, "lost-later", payload(6))  # evicts sample 1 meanwhile
    assert spool.ack(batch, reported_samples=reported, notice=notice)
    assert notices == [Drops(samples=1, events=1)]
    assert spool.drops() == Drops(samples=1)  # sample 1: lost after the batch was built
    assert rows(path) == [("sample", "lost-later"), ("event", "notice-1")]
    assert spool.ack(spool.head(500, 10**6), reported_samples=1, notice=notice)
    assert notices[-1] == Drops(samples=1, events=0)
    assert spool.drops() == Drops()
    assert rows(path) == [("event", "notice-1"), ("event", "notice-2")]
    assert (spool.stats().entries, spool.stats().bytes) == (2, 200)
    spool.close()


def test_sample_numbers_survive_a_restart_and_never_repeat(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    seqs = [spool.append_sample(f"s{n}", lambda seq: payload(seq)) for n in range(3)]
    assert seqs == [0, 1, 2]
    spool.close()
    again = Spool(path)
    assert again.append_sample("s3", lambda seq: payload(seq)) == 3
    assert numbers(path) == [0, 1, 2, 3]
    again.close()


def test_an_entry_larger_than_the_spool_is_dropped_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_bytes=100)
    assert not spool.append(EntryKind.EVENT, "huge", b"x" * 101)
    assert spool.drops() == Drops(events=1)
    assert spool.head(10, 10**6) == []


def test_a_corrupt_database_is_moved_aside_and_sample_numbers_stay_ahead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR):
        spool = Spool(path)
    assert "corrupt" in caplog.text
    assert list(tmp_path.glob("spool.db.corrupt-*"))
    assert spool.stats().durable
    seq = spool.append_sample("s0", lambda n: payload(n))
    assert seq is not None
    assert seq > 10**12
    spool.close()


def test_an_unopenable_database_falls_back_to_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "missing" / "deeper"  # sqlite cannot create the folders
    with caplog.at_level(logging.ERROR):
        spool = Spool(folder / "spool.db")
    assert "in memory" in caplog.text
    assert not spool.stats().durable
    assert spool.append(EntryKind.EVENT, "e1", payload(1))
    assert [e.id for e in spool.head(10, 10**6)] == ["e1"]


def test_a_read_only_database_drops_with_a_count_and_never_raises(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    fill(spool, 2)
    spool._conn.execute("PRAGMA query_only = ON")  # as if the filesystem went read-only
    assert not spool.append(EntryKind.SAMPLE, "s", payload(5))
    assert spool.append_sample("s", lambda n: payload(n)) is None
    assert spool.drops() == Drops(samples=2)
    head = spool.head(10, 10**6)
    assert [e.id for e in head] == ["id000000", "id000001"]
    assert not spool.ack(head)  # the delete fails ...
    assert spool.head(10, 10**6) == []  # ... but delivered entries are not sent again
    assert spool.stats().entries == 0
    spool._conn.execute("PRAGMA query_only = OFF")  # the disk recovers
    assert spool.append_sample("s", lambda n: payload(n)) == 1  # number 0 went to the lost one
    assert [e.id for e in spool.head(10, 10**6)] == ["s"]
    assert spool.stats().entries == 1
    assert spool.drops() == Drops(samples=2)
    spool.close()


def test_a_full_disk_drops_with_a_count_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    fill(spool, 3)
    pages = sqlite3.connect(path).execute("PRAGMA page_count").fetchone()[0]
    # Simulate the disk filling up: the database may not grow beyond its current pages.
    spool._conn.execute(f"PRAGMA max_page_count = {pages}")
    with caplog.at_level(logging.ERROR):
        for n in range(50):
            spool.append(EntryKind.SAMPLE, f"big{n}", b"x" * 5000)
    assert "refused a write" in caplog.text
    assert spool.drops().samples > 0
    head = spool.head(500, 10**9)
    assert [e.id for e in head][:3] == ["id000000", "id000001", "id000002"]
    assert spool.ack(head, reported_samples=spool.drops().samples)  # deleting still works
    assert spool.drops() == Drops()
    assert spool.append(EntryKind.SAMPLE, "after", payload(1))  # room again
    spool.close()
