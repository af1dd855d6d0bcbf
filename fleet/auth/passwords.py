"""Users' passwords: argon2id through argon2-cffi, never stored or logged in clear.

A wrong name costs as much as a wrong password (:func:`verify` against a dummy hash),
so timing does not tell which names exist. Hashes made with weaker parameters than
today's are upgraded at the next successful sign-in (:func:`needs_rehash`).
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from fleet.errors import InvalidInput

__all__ = ["MIN_LENGTH", "check_strength", "hash_password", "needs_rehash", "verify"]

MIN_LENGTH = 12
MAX_LENGTH = 1024  # argon2 takes any length; this bounds the work one request can ask for

_HASHER = PasswordHasher()  # argon2id with RFC 9106's low-memory profile
_DUMMY = _HASHER.hash("not a password of anyone's")


def check_strength(password: str) -> None:
    """Refuse passwords too short to resist guessing, or too long to hash cheaply."""
    if len(password) < MIN_LENGTH:
        raise InvalidInput(f"use at least {MIN_LENGTH} characters", field="password")
    if len(password) > MAX_LENGTH:
        raise InvalidInput(f"use at most {MAX_LENGTH} characters", field="password")


def hash_password(password: str) -> str:
    check_strength(password)
    return _HASHER.hash(password)


def verify(encoded: str | None, password: str) -> bool:
    """True when ``password`` matches; ``encoded`` None checks a dummy to spend equal time."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        return _HASHER.verify(encoded or _DUMMY, password) and encoded is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(encoded: str) -> bool:
    return _HASHER.check_needs_rehash(encoded)
