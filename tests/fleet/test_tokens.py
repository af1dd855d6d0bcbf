"""Pure token checks: states, reasons, secrets, durations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fleet.errors import EnrollmentRejected
from fleet.tokens import (
    TokenState,
    TokenView,
    check_token,
    format_duration,
    hash_secret,
    new_secret,
    new_token_id,
    parse_duration,
    same_secret,
    token_state,
)

NOW = datetime(2031, 1, 1, tzinfo=UTC)


def view(**kw: object) -> TokenView:
    fields: dict[str, object] = {
        "id": "tok-1",
        "uses_left": 1,
        "expires_at": NOW + timedelta(hours=1),
        "revoked_at": None,
    }
    fields.update(kw)
    return TokenView(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("token", "state", "reason"),
    [
        (view(), TokenState.ACTIVE, None),
        (view(expires_at=None), TokenState.ACTIVE, None),
        (view(uses_left=0), TokenState.USED, "used up"),
        (view(expires_at=NOW), TokenState.EXPIRED, r"expired at 2031-01-01T00:00:00\+00:00"),
        (view(expires_at=NOW - timedelta(seconds=1)), TokenState.EXPIRED, "expired"),
        (view(revoked_at=NOW, uses_left=0, expires_at=NOW), TokenState.REVOKED, "revoked"),
        (view(uses_left=0, expires_at=NOW), TokenState.EXPIRED, "expired"),
    ],
)
def test_token_state_and_reason(token: TokenView, state: TokenState, reason: str | None) -> None:
    assert token_state(token, NOW) is state
    if reason is None:
        check_token(token, NOW)
    else:
        with pytest.raises(EnrollmentRejected, match=reason):
            check_token(token, NOW)


def test_secrets_are_prefixed_random_and_hashed() -> None:
    a, b = new_secret(), new_secret()
    assert a.startswith("eft_")
    assert a != b
    assert len(a) == 4 + 32
    assert hash_secret(a) == hash_secret(a) != hash_secret(b)
    assert len(hash_secret(a)) == 64
    assert a not in hash_secret(a)
    assert new_token_id().startswith("tok-")
    assert len(new_token_id()) <= 32
    assert same_secret(a, a)
    assert not same_secret(a, b)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("90", timedelta(seconds=90)),
        ("45s", timedelta(seconds=45)),
        (" 1.5h ", timedelta(minutes=90)),
        ("12H", timedelta(hours=12)),
        ("never", None),
        ("None", None),
    ],
)
def test_parse_duration(text: str, expected: timedelta | None) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "soon", "-5m", "0", "0h", "5y", "1h30m", "h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(days=7), "7d"),
        (timedelta(hours=36), "36h"),
        (timedelta(minutes=30), "30m"),
        (timedelta(seconds=61), "61s"),
    ],
)
def test_format_duration_round_trips(value: timedelta, text: str) -> None:
    assert format_duration(value) == text
    assert parse_duration(text) == value
