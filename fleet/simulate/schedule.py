"""When each simulated device sends: pure functions of the index, the count and the clock.

A real fleet's devices boot at random times, so their telemetry reaches the
controller spread evenly over the interval, not in one burst every 5 s. The
simulator reproduces that: device ``i`` of ``n`` sends at
``base + i * interval / n + k * interval`` for whole ``k``, where ``base`` is a wall
clock instant that every simulator process agrees on (a multiple of the interval),
so several processes sharing one fleet (``--shard``) interleave instead of colliding.
"""

from __future__ import annotations

import math

__all__ = ["aligned_base", "next_send", "shard_indices", "start_offset"]


def start_offset(index: int, count: int, interval: float) -> float:
    """Seconds after the base at which device ``index`` of ``count`` sends in each interval."""
    if count <= 0 or interval <= 0:
        raise ValueError("count and interval must be positive")
    return (index % count) * interval / count


def aligned_base(now: float, interval: float) -> float:
    """The latest multiple of ``interval`` (seconds since the epoch) not after ``now``."""
    return math.floor(now / interval) * interval


def next_send(base: float, offset: float, interval: float, now: float) -> float:
    """The first slot ``base + offset + k * interval`` (whole ``k``) that is not before ``now``.

    A device that was late (a slow connect, a busy loop) skips the slots it missed
    instead of sending a burst to catch up, as an agent sending one sample per window does.
    """
    first = base + offset
    if now <= first:
        return first
    return first + math.ceil((now - first) / interval) * interval


def shard_indices(count: int, shard: int, shards: int) -> range:
    """The device indices one of ``shards`` simulator processes runs: every ``shards``-th."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    return range(shard, count, shards)
