"""Background tasks whose lifetime is a ``with`` block, so an exit stack can own them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

__all__ = ["background", "cancel", "spawn"]


def spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro, name=f"edgefleet-link-{name}")


async def cancel(task: asyncio.Task[None]) -> BaseException | None:
    """Cancel ``task`` and wait until it ends; the exception it ended with, if any.

    A library can turn a cancellation into its own error on the way out (aiomqtt may,
    while disconnecting), and a loop that catches that error would go on; so the task
    is cancelled again until it is really done.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=5.0)
    if task.cancelled():
        return None
    return task.exception()


@asynccontextmanager
async def background(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Run ``coro`` as a task for the length of the block; cancelled (and awaited) at its end."""
    task = spawn(coro, name)
    try:
        yield
    finally:
        await cancel(task)
