"""``GET /ui/events?topics=a,b``: a server-sent event stream for one open page.

Each event is named after its topic (``device-<id>``, ``rollouts`` ...), so a page
refreshes a fragment with ``hx-trigger="sse:device-<id>"`` through htmx's SSE
extension. A comment line every ``_KEEPALIVE_S`` keeps proxies from closing it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from fleet.api.deps import get_state
from fleet.dashboard.guard import Viewer
from fleet.dashboard.live import LiveFeed
from fleet.errors import InvalidInput

__all__ = ["events", "parse_topics", "router"]

router = APIRouter(prefix="/ui")
_TOPIC = re.compile(
    r"^(devices|rollouts|alerts|device-[A-Za-z0-9._-]{1,63}|rollout-[A-Za-z0-9._-]{1,64})$"
)
_KEEPALIVE_S = 15.0


def parse_topics(text: str) -> frozenset[str]:
    topics = frozenset(t.strip() for t in text.split(",") if t.strip())
    if not topics or len(topics) > 32:
        raise InvalidInput("name 1 to 32 topics, comma-separated", field="topics")
    bad = sorted(t for t in topics if not _TOPIC.fullmatch(t))
    if bad:
        raise InvalidInput(f"unknown topic {bad[0]!r}", field="topics")
    return topics


def _feed(request: Request) -> LiveFeed:
    """The app's one feed, made on first use (the engine exists only once the app runs)."""
    feed: LiveFeed | None = getattr(request.app.state, "live", None)
    if feed is None:
        state = get_state(request)
        feed = request.app.state.live = LiveFeed(state.engine, state.clock)
    return feed


@router.get("/events", include_in_schema=False)
async def events(
    request: Request, _who: Viewer, topics: Annotated[str, Query(max_length=2000)]
) -> StreamingResponse:
    wanted = parse_topics(topics)
    feed = _feed(request)

    async def stream() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        async with feed.listen(wanted) as queue:
            while not await request.is_disconnected():
                try:
                    changed = await asyncio.wait_for(queue.get(), _KEEPALIVE_S)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                for topic in sorted(changed):
                    yield f"event: {topic}\ndata: {topic}\n\n".encode()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
