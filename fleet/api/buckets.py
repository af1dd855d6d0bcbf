"""Time buckets in SQL that mean the same on SQLite and PostgreSQL.

``epoch_bucket(ts, width)`` is ``floor(unix seconds of ts / width)``. The two
databases spell it differently (SQLite stores timestamps as UTC text and has
``strftime('%s')``; PostgreSQL has ``EXTRACT(EPOCH ...)``), so it is one SQLAlchemy
construct compiled per dialect. The width is rendered as a literal integer, not a
bound parameter: PostgreSQL only accepts a grouped expression in the select list if
it is textually identical to the GROUP BY one, and two parameters never are.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, literal_column
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

__all__ = ["epoch_bucket"]


class epoch_bucket(FunctionElement[int]):  # lower case: it reads like the SQL it renders
    """``floor(epoch seconds of a timestamp / width)`` as a BIGINT."""

    type = BigInteger()
    name = "epoch_bucket"
    inherit_cache = True  # the width is a literal_column clause, so it is in the cache key

    def __init__(self, timestamp: Any, width_s: int) -> None:  # a timestamp column
        if isinstance(width_s, bool) or not isinstance(width_s, int) or width_s < 1:
            raise ValueError(f"bucket width must be a positive integer, got {width_s!r}")
        super().__init__(timestamp, literal_column(str(width_s)))


def _parts(element: epoch_bucket, compiler: Any, **kw: Any) -> tuple[str, str]:
    timestamp, width = element.clauses
    return str(compiler.process(timestamp, **kw)), str(compiler.process(width, **kw))


@compiles(epoch_bucket)
def _default(element: epoch_bucket, compiler: Any, **kw: Any) -> str:
    ts, width = _parts(element, compiler, **kw)
    return f"CAST(FLOOR(EXTRACT(EPOCH FROM {ts}) / {width}) AS BIGINT)"


@compiles(epoch_bucket, "sqlite")
def _sqlite(element: epoch_bucket, compiler: Any, **kw: Any) -> str:
    ts, width = _parts(element, compiler, **kw)
    return f"(CAST(strftime('%s', {ts}) AS INTEGER) / {width})"
