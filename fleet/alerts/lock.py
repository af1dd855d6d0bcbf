"""One writer of alerts at a time, across controller replicas.

There must never be two open alerts for one subject, and an acknowledgement must not
race a round that is deciding on the same alert. So each round, and each
acknowledgement, first takes a lock and only then reads. On PostgreSQL it is a
transaction-scoped advisory lock: a round tries it without waiting (a replica that
finds it taken skips the round, since another does the same work), an
acknowledgement waits for it. On SQLite it is the database's write lock, taken by a
write that changes nothing; the next writer waits for it (up to the busy timeout).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlmodel import Session

__all__ = ["ALERT_LOCK", "lock_alerts"]

ALERT_LOCK = 0x45_46_41_4C  # "EFAL": the advisory lock key of alert writers


def lock_alerts(session: Session, *, wait: bool) -> bool:
    """Take the lock for the session's transaction; False when taken (PostgreSQL, no wait)."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        if wait:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ALERT_LOCK})
            return True
        taken = conn.execute(
            sa.text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": ALERT_LOCK}
        ).scalar()
        return bool(taken)
    conn.execute(sa.text("UPDATE alerts SET id = id WHERE 0 = 1"))  # SQLite's write lock
    return True
