"""Signature and freshness checks: bytes and keys in, a verdict or a typed error out.

Pure on purpose (no network, no disk, the clock passed in), like python-tuf's
trusted metadata set: the controller's enrollment route and its tests call the same
function, and a failure says exactly which check failed.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from models.device import DeviceReport
from models.wire import EnrollmentRequest, b64, enrollment_proof

__all__ = [
    "ENROLLMENT_MAX_SKEW",
    "TrustError",
    "public_key_b64",
    "sign_enrollment",
    "verify_enrollment",
]

ENROLLMENT_MAX_SKEW = timedelta(minutes=5)


class TrustError(ValueError):
    """A signature, key or timestamp that does not verify; never retry the same bytes."""


def _b64(value: str, what: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise TrustError(f"{what} is not valid base64") from None
    if len(raw) != size:
        raise TrustError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def verify_enrollment(
    request: EnrollmentRequest, now: datetime, max_skew: timedelta = ENROLLMENT_MAX_SKEW
) -> bytes:
    """Check the request's proof of key possession and freshness; return the raw public key."""
    key = _b64(request.public_key, "public_key", 32)
    signature = _b64(request.signature, "signature", 64)
    skew = abs(now - request.timestamp)
    if skew > max_skew:
        raise TrustError(
            f"timestamp is {skew.total_seconds():.0f} s away from the controller's clock "
            f"(at most {max_skew.total_seconds():.0f} s allowed): check the device's clock"
        )
    proof = enrollment_proof(request.token, request.public_key, request.timestamp)
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature, proof)
    except InvalidSignature:
        raise TrustError("signature does not match public_key") from None
    return key


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """The public half of ``key`` as the wire carries it: base64 of the raw 32 bytes."""
    return b64(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def sign_enrollment(
    key: Ed25519PrivateKey,
    token: str,
    *,
    name: str,
    agent_version: str,
    device: DeviceReport,
    now: datetime,
) -> EnrollmentRequest:
    """The enrollment request a device holding ``key`` sends at ``now``, signed."""
    public_key = public_key_b64(key)
    return EnrollmentRequest(
        token=token,
        public_key=public_key,
        timestamp=now,
        signature=b64(key.sign(enrollment_proof(token, public_key, now))),
        name=name,
        agent_version=agent_version[:64],
        device=device,
    )
