"""Broker passwords, hashed in the forms the brokers read; the password itself is never kept.

- ``$7$`` (PBKDF2-SHA512): Mosquitto's ``password_file``; the embedded broker and the
  artifact download check it with :func:`verify_password`.
- ``$2a$`` (bcrypt, :func:`hash_bcrypt`): ``nats-server``'s users (docs/broker.md), the
  only salted hash it reads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

import bcrypt

__all__ = ["BCRYPT_ROUNDS", "hash_bcrypt", "hash_password", "new_password", "verify_password"]

_ITERATIONS = 101  # what mosquitto_passwd writes; the password is 192 random bits anyway
_SALT_BYTES = 12
# bcrypt's least cost: nats-server checks the hash on every connect, so cost would only
# slow a reconnect storm, and no cost makes 192 random bits easier to guess.
BCRYPT_ROUNDS = 4


def new_password() -> str:
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, iterations: int = _ITERATIONS) -> str:
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def hash_bcrypt(password: str) -> str:
    """A bcrypt hash with the ``2a`` prefix, which every nats-server release accepts."""
    salt = bcrypt.gensalt(rounds=BCRYPT_ROUNDS, prefix=b"2a")
    return bcrypt.hashpw(password.encode(), salt).decode("ascii")


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
