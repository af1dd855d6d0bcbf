"""Enrollment: prove possession of the device key, present a token, get an identity.

The pure half (:func:`models.trust.sign_enrollment`, :func:`explain_rejection`) builds
the request and turns the controller's refusal into a message saying what to do; the I/O half
(:func:`enroll`) posts it with httpx and persists the result. A refusal is
:class:`~agent.link.errors.EnrollmentRejected` (never retried as is); no answer is
:class:`~agent.link.errors.LinkUnavailable` (the link retries with backoff).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl

import httpx
from pydantic import ValidationError

from agent.files import atomic_write
from agent.link.errors import EnrollmentRejected, LinkUnavailable
from agent.link.identity import Identity, StateDir
from models.device import DeviceReport
from models.paths import ENROLL_PATH
from models.trust import sign_enrollment
from models.wire import EnrollmentRequest, EnrollmentResponse, utc_now

__all__ = [
    "device_name",
    "enroll",
    "error_reason",
    "explain_rejection",
    "os_error",
    "token_advice",
    "transport_reason",
]

log = logging.getLogger(__name__)

_NEW_TOKEN = "create a new one with `edgefleet tokens create` and start again with --token"  # noqa: S105 - advice, not a secret


def device_name(device: DeviceReport) -> str:
    """The human name a device enrolls under: its hostname, cut to what the wire allows."""
    return (device.hostname.strip() or "edgefleet-device")[:128]


def error_reason(body: bytes) -> str:
    """The controller's reason from a FastAPI-style error body, or its first bytes."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300].decode("utf-8", "replace").strip()
    if isinstance(data, dict):
        for key in ("detail", "message", "reason", "error"):
            value = data.get(key)
            if isinstance(value, str):
                return value
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return str(value["message"])
            if isinstance(value, list) and value:  # FastAPI's 422: a list of problems
                parts = []
                for item in value[:3]:
                    if isinstance(item, dict):
                        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                        parts.append(f"{where}: {item.get('msg', '')}" if where else item["msg"])
                    else:
                        parts.append(str(item))
                return "; ".join(parts)
    return body[:300].decode("utf-8", "replace").strip()


def token_advice(reason: str, new_token: str = _NEW_TOKEN) -> str | None:
    """What to do about a refused token (unknown, used, expired, revoked); None if not that."""
    lowered = reason.lower()
    if "used" in lowered:
        return f"each token enrolls a limited number of devices: {new_token}"
    if any(word in lowered for word in ("expired", "revoked", "unknown", "invalid", "token")):
        return new_token
    return None


def explain_rejection(status: int, body: bytes, fleet_url: str) -> str:
    """A message for the operator: what the controller said, and what to do about it."""
    reason = error_reason(body) or f"HTTP {status}"
    lowered = reason.lower()
    if status == 404:
        hint = f"check --fleet: {fleet_url} has no {ENROLL_PATH} endpoint"
    elif status == 422:
        hint = (
            "the controller could not read this agent's request: check that the agent and "
            "controller versions match"
        )
    elif any(word in lowered for word in ("clock", "timestamp", "skew")):
        hint = "set this device's clock (enable NTP), then start again"
    else:
        hint = token_advice(reason) or f"ask the fleet admin, or {_NEW_TOKEN}"
    return f"enrollment refused by {fleet_url} (HTTP {status}): {reason}; {hint}"


def os_error(exc: BaseException) -> OSError | None:
    """The OS error (TLS errors are OS errors too) under an httpx error, if there is one."""
    cause: BaseException | None = exc
    for _ in range(8):  # down the chain
        if cause is None:
            break
        if isinstance(cause, OSError) and (cause.errno or cause.strerror):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def transport_reason(exc: BaseException) -> str:
    """Why a request got no answer, in words: the OS or TLS error under httpx's, if any."""
    cause = os_error(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):  # errno 1: not "not permitted"
        return f"the TLS certificate is not trusted ({cause.verify_message})"
    if isinstance(cause, ssl.SSLError):
        return f"TLS failed ({cause.reason or cause})"
    if cause is not None:
        # asyncio says "Connect call failed (addr)"; the errno's own words are clearer
        errno = cause.errno
        text = os.strerror(errno) if errno and errno > 0 else str(cause.strerror or cause)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


async def request_enrollment(
    client: httpx.AsyncClient, fleet_url: str, request: EnrollmentRequest
) -> EnrollmentResponse:
    """POST the request; the response, or a typed error saying whether to retry."""
    url = fleet_url + ENROLL_PATH
    try:
        response = await client.post(url, json=request.model_dump(mode="json"))
    except httpx.HTTPError as exc:
        reason = transport_reason(exc)
        raise LinkUnavailable(f"controller unreachable at {fleet_url}: {reason}") from None
    status = response.status_code
    if status in (408, 429) or status >= 500:
        raise LinkUnavailable(f"controller {fleet_url} answered HTTP {status}; will retry")
    if 300 <= status < 400:
        raise EnrollmentRejected(
            f"{url} redirects (HTTP {status}) to {response.headers.get('location', '?')}: "
            "pass the final URL with --fleet",
            status=status,
        )
    if status >= 400:
        message = explain_rejection(status, response.content, fleet_url)
        raise EnrollmentRejected(message, status=status)
    try:
        return EnrollmentResponse.model_validate_json(response.content)
    except ValidationError as exc:
        raise LinkUnavailable(
            f"controller {fleet_url} sent an unreadable enrollment response "
            f"({exc.error_count()} errors); will retry"
        ) from None


async def enroll(
    state: StateDir,
    fleet_url: str,
    token: str,
    device: DeviceReport,
    *,
    agent_version: str,
    timeout_s: float = 15.0,
    transport: httpx.AsyncBaseTransport | None = None,
    hardware_id: str | None = None,
) -> Identity:
    """Enroll this device once and save its identity; raises on refusal or no answer.

    ``hardware_id`` (:mod:`agent.hardware_id`) lets the controller know a re-flashed board.
    """
    key = await asyncio.to_thread(state.device_key)
    now = utc_now()
    request = sign_enrollment(
        key, token, name=device_name(device), agent_version=agent_version, device=device, now=now
    )
    if hardware_id is not None:  # not part of the proof: it only names the board
        request = request.model_copy(update={"hardware_id": hardware_id})
    async with httpx.AsyncClient(
        timeout=timeout_s, transport=transport, follow_redirects=False
    ) as client:
        response = await request_enrollment(client, fleet_url, request)
    identity = Identity.from_response(fleet_url, response, now)
    if response.tuf_root is not None:
        root = response.tuf_root.encode()
        await asyncio.to_thread(atomic_write, state.enrollment_root_path, root)
    await asyncio.to_thread(state.save_identity, identity)
    log.info("enrolled with %s as device %s", fleet_url, identity.device_id)
    return identity
