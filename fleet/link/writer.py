"""The ingest buffer and its flusher: accepted messages in, batched database writes out.

Messages wait at most ``ingest_flush_ms`` (or until ``ingest_batch_rows`` rows are
waiting) and are then written in one transaction, in a worker thread so the event loop
never blocks on the database. While the database is unavailable the batch is retried
with backoff; nothing is dropped, except past a backlog bound that keeps memory finite.
On close the writer stores what it holds, trying for a bounded time.

A message can come with a *settle* callback (the MQTT session's acknowledgement to the
broker): it is called on the event loop once the transaction that stored the message,
found it a duplicate or refused it for good has committed, never before. So a message
the broker still waits an acknowledgement for is either in the database or will be
delivered again. A message dropped past the backlog bound is settled at once (it is
counted in ``overflowed`` and lost, as it would be if it were kept unacknowledged until
the broker gave up); one still unwritten when :meth:`close` gives up is never settled.
Because a broker sends only so many unacknowledged messages at a time (Mosquitto's
``max_inflight_messages``, 20 by default for MQTT 3.1.1), the writer does not wait for
``ingest_flush_ms`` once :data:`FLUSH_AT_UNSETTLED` messages wait for their settling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa

from fleet.errors import DatabaseUnavailable
from fleet.link import store
from fleet.link.ingest import Accepted, Reason, Rejection
from models.topics import DeviceTopic

__all__ = ["FLUSH_AT_UNSETTLED", "BatchWriter", "Settle"]

log = logging.getLogger(__name__)

Reject = Callable[[Rejection], None]
Warn = Callable[..., None]  # (key, message, *args): a rate-limited warning
Settle = Callable[[], None]  # called once the message is stored (or dropped); must not raise

# Write without waiting for ingest_flush_ms once this many buffered messages wait to be
# settled: half of the smallest window a broker commonly grants (Mosquitto's 20), so the
# other half keeps arriving while the write runs.
FLUSH_AT_UNSETTLED = 10


class BatchWriter:
    """Buffers accepted messages and writes them in batches; counts what happened."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        batch_rows: int,
        flush_s: float,
        retry_delay: Callable[[int], float],
        reject: Reject,
        warn: Warn,
    ) -> None:
        self._engine = engine
        self._batch_rows = batch_rows
        self._flush_s = flush_s
        self._max_backlog_rows = max(10_000, 100 * batch_rows)
        self._retry_delay = retry_delay
        self._reject = reject
        self._warn = warn
        # (monotonic arrival, message, its settle callback or None)
        self._buffer: deque[tuple[float, Accepted, Settle | None]] = deque()
        self._buffered_rows = 0
        self._unsettled = 0  # buffered messages with a settle callback
        self._writing = 0  # messages in the batch being written (or retried)
        self._wake = asyncio.Event()
        self._closing = False
        self._give_up_at = 0.0  # monotonic; set by close(): stop retrying the database then
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edgefleet-ingest")
        self.stored = 0
        self.duplicates = 0
        self.db_retries = 0
        self.overflowed = 0

    @property
    def backlog(self) -> int:
        """Messages taken but not yet stored."""
        return len(self._buffer) + self._writing

    def add(self, item: Accepted, settle: Settle | None = None) -> None:
        """Buffer ``item``; ``settle`` is called once it is stored, or refused or dropped."""
        if self._buffered_rows >= self._max_backlog_rows:
            self.overflowed += 1
            self._warn(
                "overflow",
                "ingest backlog full (%d rows waiting for the database): dropping messages",
                self._buffered_rows,
            )
            if settle is not None:
                settle()
            return
        was_empty = not self._buffer
        self._buffer.append((time.monotonic(), item, settle))
        self._buffered_rows += item.rows
        if settle is not None:
            self._unsettled += 1
        if was_empty or self._full():
            self._wake.set()

    def _full(self) -> bool:
        return self._buffered_rows >= self._batch_rows or self._unsettled >= FLUSH_AT_UNSETTLED

    async def run(self) -> None:
        """Flush until :meth:`close` was called and the buffer is empty."""
        while True:
            if not self._buffer:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._closing and not self._full():
                remaining = self._buffer[0][0] + self._flush_s - time.monotonic()
                if remaining > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), remaining)
                    continue
            chunk, settles = self._take_chunk()
            self._writing = len(chunk)
            try:
                stored = await self._store(chunk)
            finally:
                self._writing = 0
            if stored:  # committed (or refused for good): only now may the broker forget them
                for settle in settles:
                    settle()

    def close(self, give_up_after_s: float) -> None:
        """Write what is buffered now, retrying the database for at most ``give_up_after_s``."""
        self._closing = True
        self._give_up_at = time.monotonic() + give_up_after_s
        self._wake.set()

    def shutdown(self) -> None:
        """Release the worker thread (after :meth:`run` has ended)."""
        self._executor.shutdown(wait=True)
        if self._buffer:
            log.error("shut down with %d messages not stored", len(self._buffer))

    def _take_chunk(self) -> tuple[list[Accepted], list[Settle]]:
        chunk: list[Accepted] = []
        settles: list[Settle] = []
        rows = 0
        while self._buffer and (not chunk or rows + self._buffer[0][1].rows <= self._batch_rows):
            _, item, settle = self._buffer.popleft()
            chunk.append(item)
            rows += item.rows
            if settle is not None:
                settles.append(settle)
        self._buffered_rows -= rows
        self._unsettled -= len(settles)
        return chunk, settles

    async def _store(self, items: list[Accepted]) -> bool:
        """Write ``items``, retrying while the database is down; False when given up on."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                result = await loop.run_in_executor(
                    self._executor, store.write_batch, self._engine, items
                )
                break
            except DatabaseUnavailable as exc:
                self.db_retries += 1
                if self._closing and time.monotonic() > self._give_up_at:
                    log.error(
                        "database still unavailable at shutdown: %d messages not stored "
                        "(not acknowledged: the broker keeps them for the next session)",
                        len(items),
                    )
                    return False
                self._warn("db", "database unavailable, retrying %d messages: %s", len(items), exc)
                await asyncio.sleep(min(self._retry_delay(attempt), 5.0))
                attempt += 1
            except Exception:  # a bug, not bad input: log it and keep the loop alive
                log.exception("storing %d messages failed; they are dropped", len(items))
                for item in items:
                    topic = str(DeviceTopic(item.device_id, item.channel))
                    self._reject(Rejection(Reason.STORE_FAILED, "storing failed", topic))
                return True
        self.stored += result.stored
        self.duplicates += result.duplicates
        for item, detail in result.failed:
            topic = str(DeviceTopic(item.device_id, item.channel))
            self._reject(Rejection(Reason.STORE_FAILED, detail, topic))
        return True
