"""Broker passwords in Mosquitto's own ``$7$`` form (PBKDF2-SHA512), which both brokers read.

The controller never stores a device's broker password, only this hash; Mosquitto
reads the same line from its ``password_file`` and the embedded broker verifies it
with :func:`verify_password`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

__all__ = ["hash_password", "new_password", "verify_password"]

_ITERATIONS = 101  # what mosquitto_passwd writes; the password is 192 random bits anyway
_SALT_BYTES = 12


def new_password() -> str:
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, iterations: int = _ITERATIONS) -> str:
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches ``encoded``; False for any malformed hash."""
    try:
        _, kind, iterations, salt_b64, digest_b64 = encoded.split("$")
        if kind != "7":
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(digest_b64, validate=True)
        rounds = int(iterations)
    except (ValueError, binascii.Error):
        return False
    if not 1 <= rounds <= 1_000_000:
        return False
    actual = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, rounds)
    return hmac.compare_digest(actual, expected)
