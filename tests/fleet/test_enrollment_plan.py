"""What an enrollment request does (``fleet.tokens.plan_enrollment``): every case, pure.

A table names each case and its outcome; then every consistent combination of token,
request and existing devices is checked against the rules the decision must keep,
so no combination slips between the table's rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from fleet.errors import EnrollmentRejected
from fleet.tokens import (
    Enrollment,
    EnrollmentAction,
    TokenState,
    TokenView,
    plan_enrollment,
    token_state,
)

NOW = datetime(2031, 1, 1, tzinfo=UTC)
HW = "hw-0123456789"
OTHER_HW = "hw-9876543210"
ENROLL, REPLAY, REFLASH = EnrollmentAction.ENROLL, EnrollmentAction.REPLAY, EnrollmentAction.REFLASH


@dataclass(frozen=True)
class Dev:
    id: str
    token_id: str | None = "tok-1"
    hardware_id: str | None = None
    revoked_at: datetime | None = None


def token(state: TokenState = TokenState.ACTIVE, token_id: str = "tok-1") -> TokenView:
    return TokenView(
        id=token_id,
        uses_left=0 if state is TokenState.USED else 1,
        expires_at=NOW - timedelta(seconds=1) if state is TokenState.EXPIRED else None,
        revoked_at=NOW if state is TokenState.REVOKED else None,
    )


ACTIVE, USED, EXPIRED, REVOKED = (token(s) for s in TokenState)
ANOTHER_USED = token(TokenState.USED, "tok-2")
ANOTHER_ACTIVE = token(TokenState.ACTIVE, "tok-2")
LIVE = Dev("dev-a")
LIVE_HW = Dev("dev-a", hardware_id=HW)
GONE_HW = Dev("dev-a", hardware_id=HW, revoked_at=NOW)
OTHER_LIVE_HW = Dev("dev-b", hardware_id=HW)


def plan(
    tok: TokenView | None,
    hardware_id: str | None = None,
    by_key: Dev | None = None,
    by_hardware: Dev | None = None,
) -> Enrollment:
    return plan_enrollment(
        tok, NOW, hardware_id=hardware_id, by_key=by_key, by_hardware=by_hardware
    )


@pytest.mark.parametrize(
    ("tok", "hardware_id", "by_key", "by_hardware", "expected"),
    [
        # a new device: needs a token it may spend
        (ACTIVE, None, None, None, Enrollment(ENROLL)),
        (ACTIVE, HW, None, None, Enrollment(ENROLL)),
        # a replay: the key is known; the token it enrolled with may be spent since
        (ACTIVE, None, LIVE, None, Enrollment(REPLAY, "dev-a")),
        (USED, None, LIVE, None, Enrollment(REPLAY, "dev-a")),
        (EXPIRED, None, LIVE, None, Enrollment(REPLAY, "dev-a")),
        (ANOTHER_ACTIVE, None, LIVE, None, Enrollment(REPLAY, "dev-a")),
        (USED, HW, LIVE_HW, LIVE_HW, Enrollment(REPLAY, "dev-a")),
        (USED, None, LIVE_HW, None, Enrollment(REPLAY, "dev-a")),  # an agent without the id
        (ACTIVE, HW, LIVE, None, Enrollment(REPLAY, "dev-a")),  # adopts the hardware id
        # a re-flash: a new key from known hardware; spends a use
        (ACTIVE, HW, None, LIVE_HW, Enrollment(REFLASH, "dev-a")),
        (ANOTHER_ACTIVE, HW, None, LIVE_HW, Enrollment(REFLASH, "dev-a")),
    ],
)
def test_accepted(
    tok: TokenView,
    hardware_id: str | None,
    by_key: Dev | None,
    by_hardware: Dev | None,
    expected: Enrollment,
) -> None:
    assert plan(tok, hardware_id, by_key, by_hardware) == expected


@pytest.mark.parametrize(
    ("tok", "hardware_id", "by_key", "by_hardware", "reason"),
    [
        (None, None, None, None, "unknown enrollment token"),
        (None, None, LIVE, None, "unknown enrollment token"),
        (None, HW, None, LIVE_HW, "unknown enrollment token"),
        (USED, None, None, None, "tok-1 is used up"),
        (EXPIRED, HW, None, None, "tok-1 expired at"),
        (REVOKED, None, None, None, "tok-1 was revoked"),
        (ANOTHER_USED, None, LIVE, None, "tok-2 is used up"),  # another token must be valid
        (ACTIVE, None, Dev("dev-a", revoked_at=NOW), None, "device dev-a, which was revoked"),
        (ACTIVE, HW, GONE_HW, GONE_HW, "device dev-a, which was revoked"),
        # a re-flash spends a use: the token must have one
        (USED, HW, None, LIVE_HW, "tok-1 is used up"),
        (EXPIRED, HW, None, LIVE_HW, "tok-1 expired"),
        (REVOKED, HW, None, LIVE_HW, "tok-1 was revoked"),
        # revoked hardware stays revoked, whatever the token
        (ACTIVE, HW, None, GONE_HW, "device dev-a with this hardware was revoked"),
        (USED, HW, None, GONE_HW, "device dev-a with this hardware was revoked"),
        # a key on other hardware than its device's: a cloned disk
        (ACTIVE, OTHER_HW, LIVE_HW, None, "device dev-a, which runs on other hardware"),
        # the key of one device, the hardware of another
        (ACTIVE, HW, LIVE, OTHER_LIVE_HW, "this hardware to device dev-b"),
    ],
)
def test_refused(
    tok: TokenView | None,
    hardware_id: str | None,
    by_key: Dev | None,
    by_hardware: Dev | None,
    reason: str,
) -> None:
    with pytest.raises(EnrollmentRejected, match=reason):
        plan(tok, hardware_id, by_key, by_hardware)


def test_only_a_replay_spends_nothing() -> None:
    assert Enrollment(ENROLL).spends_use
    assert Enrollment(REFLASH, "dev-a").spends_use
    assert not Enrollment(REPLAY, "dev-a").spends_use


def test_the_revoked_hardware_reason_says_what_an_operator_can_do() -> None:
    with pytest.raises(EnrollmentRejected) as caught:
        plan(ACTIVE, HW, None, GONE_HW)
    assert str(caught.value) == (
        "device dev-a with this hardware was revoked, and revoked devices stay revoked: "
        "this board cannot enroll again"
    )


# --- every consistent combination ------------------------------------------------------

TOKENS = [None, *(token(s, i) for s in TokenState for i in ("tok-1", "tok-2"))]
DEVICE_HW = [None, HW, OTHER_HW]


def _devices(device_id: str) -> list[Dev]:
    return [
        Dev(device_id, token_id="tok-1", hardware_id=hw, revoked_at=revoked)
        for hw in DEVICE_HW
        for revoked in (None, NOW)
    ]


def _worlds() -> list[tuple[TokenView | None, str | None, Dev | None, Dev | None]]:
    """Every request against every state of the database that could hold it.

    ``by_hardware`` is whichever device has the request's hardware id (ids are unique):
    the key's own device when it has that id, else possibly another one.
    """
    found = []
    for tok, hardware_id, by_key in itertools.product(
        TOKENS, [None, HW], [None, *_devices("dev-a")]
    ):
        if hardware_id is None:
            candidates: list[Dev | None] = [None]
        elif by_key is not None and by_key.hardware_id == hardware_id:
            candidates = [by_key]
        else:
            others = [d for d in _devices("dev-b") if d.hardware_id == hardware_id]
            candidates = [None, *others]
        found += [(tok, hardware_id, by_key, other) for other in candidates]
    return found


WORLDS = _worlds()


def test_the_combinations_are_many() -> None:
    assert len(WORLDS) > 100


@pytest.mark.parametrize(("tok", "hardware_id", "by_key", "by_hardware"), WORLDS)
def test_every_combination_keeps_the_rules(
    tok: TokenView | None, hardware_id: str | None, by_key: Dev | None, by_hardware: Dev | None
) -> None:
    try:
        got = plan(tok, hardware_id, by_key, by_hardware)
    except EnrollmentRejected:
        got = None
    if tok is None:
        assert got is None  # an unknown token does nothing
        return
    usable = token_state(tok, NOW) is TokenState.ACTIVE
    if by_key is not None:
        # a known key is that device again, or nothing: it never becomes another device
        revoked = by_key.revoked_at is not None
        another_has_the_hardware = by_hardware is not None and by_hardware.id != by_key.id
        cloned = hardware_id is not None and by_key.hardware_id not in (None, hardware_id)
        token_ok = usable or tok.id == by_key.token_id
        replays = token_ok and not (revoked or another_has_the_hardware or cloned)
        assert got == (Enrollment(REPLAY, by_key.id) if replays else None)
        return
    if by_hardware is not None:
        # a new key on known hardware: that device re-flashed, if live and the token is
        live = by_hardware.revoked_at is None
        assert got == (Enrollment(REFLASH, by_hardware.id) if live and usable else None)
        return
    assert got == (Enrollment(ENROLL) if usable else None)  # a stranger: a new device


@pytest.mark.parametrize(("tok", "by_key"), [(w[0], w[2]) for w in WORLDS if w[1] is None])
def test_without_a_hardware_id_nothing_changes(tok: TokenView | None, by_key: Dev | None) -> None:
    """The rules before hardware ids: a known key replays, an unknown one enrolls anew."""
    try:
        got = plan(tok, None, by_key, None)
    except EnrollmentRejected:
        got = None
    if got is not None:
        assert got.action is (ENROLL if by_key is None else REPLAY)
