"""What the controller publishes to devices: signed desired states (retained) and commands.

Each desired state is signed with the director key (a DSSE envelope) and published
retained at QoS 1 on the device's ``desired`` topic. As every new session starts,
:meth:`DesiredPublisher.republish_stored` publishes every stored desired state again:
the broker may have lost its retained messages (restarted without persistence, or the
embedded one), and republishing is harmless because agents ignore versions they have
applied. A state already sent in this session, at the same or a newer version, is
skipped, so a stale read can never overwrite a newer retained state; and the read and
the publishing happen under the lock every replica publishes under
(:data:`fleet.db.DESIRED_PUBLISH_LOCK`), so another replica's newer state is never
overwritten by this one's older read either.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any, Protocol

import sqlalchemy as sa
from pydantic import ValidationError

from fleet.db import DESIRED_PUBLISH_LOCK, advisory_lock
from fleet.errors import DatabaseUnavailable
from fleet.link import store
from fleet.link.logs import RateLimitedLog
from models.topics import Channel, DeviceTopic
from models.wire import Command, DesiredState, encode

__all__ = ["REPUBLISH_CONCURRENCY", "DesiredPublisher", "Publishes"]

log = logging.getLogger(__name__)

REPUBLISH_CONCURRENCY = 64  # publishes in flight while republishing stored states


class Publishes(Protocol):
    """Where messages go out: the MQTT session."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool) -> None: ...


class DesiredPublisher:
    """Publishes desired states, clears them and sends commands, in the newest-wins order."""

    def __init__(
        self,
        session: Publishes,
        engine: sa.Engine,
        *,
        sign_desired: Callable[[DesiredState], bytes],
        retry_delay: Callable[[int], float],
        warn: RateLimitedLog,
    ) -> None:
        self._session = session
        self._engine = engine
        self._sign_desired = sign_desired  # the director key's DSSE envelope
        self._retry_delay = retry_delay
        self._warn = warn
        self._sent: dict[str, int] = {}  # device id -> desired version sent in this session

    async def publish_desired(self, state: DesiredState) -> None:
        """Publish ``state`` retained; ``BrokerUnavailable`` when the broker is down."""
        self._sent[state.device_id] = max(self._sent.get(state.device_id, 0), state.version)
        await self._session.publish(
            _desired_topic(state.device_id), self._sign_desired(state), retain=True
        )

    async def clear_desired(self, device_id: str) -> None:
        """Clear a revoked device's retained desired state (and its reported state).

        The reported state goes too: every controller restart would re-read it, and
        reject it as coming from a revoked device.
        """
        self._sent[device_id] = sys.maxsize  # never republish it in this session
        await self._session.publish(_desired_topic(device_id), b"", retain=True)
        reported = str(DeviceTopic(device_id, Channel.REPORTED))
        await self._session.publish(reported, b"", retain=True)

    async def send_command(self, command: Command) -> None:
        topic = str(DeviceTopic(command.device_id, Channel.CMD))
        await self._session.publish(topic, encode(command), retain=False)

    async def republish_stored(self) -> None:
        """Publish every stored desired state again (retained): a new session has started."""
        self._sent.clear()
        attempt = 0
        while True:
            try:
                async with advisory_lock(self._engine, DESIRED_PUBLISH_LOCK):
                    rows = await asyncio.to_thread(store.load_desired, self._engine)
                    await self._republish(rows)
                return
            except DatabaseUnavailable as exc:
                self._warn.warning("republish", "cannot read desired states yet: %s", exc)
                await asyncio.sleep(self._retry_delay(attempt))
                attempt += 1

    async def _republish(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        slots = asyncio.Semaphore(REPUBLISH_CONCURRENCY)
        sent = 0

        async def one(device_id: str, stored: dict[str, Any]) -> None:
            nonlocal sent
            state = _valid_state(device_id, stored)
            if state is None:
                return
            async with slots:
                if self._sent.get(device_id, 0) >= state.version:
                    return
                self._sent[device_id] = state.version
                await self._session.publish(
                    _desired_topic(device_id), self._sign_desired(state), retain=True
                )
                sent += 1

        results = await asyncio.gather(
            *(one(device_id, stored) for device_id, stored in rows), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            # The session is going down; the next one republishes everything again.
            log.warning(
                "republished %d desired states; %d failed: %s", sent, len(failures), failures[0]
            )
        else:
            log.info("republished %d desired states", sent)


def _desired_topic(device_id: str) -> str:
    return str(DeviceTopic(device_id, Channel.DESIRED))


def _valid_state(device_id: str, stored: dict[str, Any]) -> DesiredState | None:
    """The stored state as a wire model, or None (logged) when it cannot be sent."""
    try:
        state = DesiredState.model_validate(stored)
    except ValidationError as exc:
        log.error("device %s: stored desired state is invalid, not republished: %s", device_id, exc)
        return None
    if state.device_id != device_id:
        log.error(
            "device %s: stored desired state names %s; not republished",
            device_id,
            state.device_id,
        )
        return None
    return state
