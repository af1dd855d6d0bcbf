"""The pure parts of who may do what: roles and sign-in limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fleet.auth import Role, allows, needed_role
from fleet.auth.limits import SignInLimits, wait_before_next

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
LIMITS = SignInLimits(per_name=3, per_address=5, window=timedelta(minutes=5))


@pytest.mark.parametrize(
    ("held", "needed", "ok"),
    [
        (Role.VIEWER, Role.VIEWER, True),
        (Role.VIEWER, Role.OPERATOR, False),
        (Role.VIEWER, Role.ADMIN, False),
        (Role.OPERATOR, Role.VIEWER, True),
        (Role.OPERATOR, Role.OPERATOR, True),
        (Role.OPERATOR, Role.ADMIN, False),
        (Role.ADMIN, Role.VIEWER, True),
        (Role.ADMIN, Role.OPERATOR, True),
        (Role.ADMIN, Role.ADMIN, True),
    ],
)
def test_each_role_includes_the_ones_below(held: Role, needed: Role, ok: bool) -> None:
    assert allows(held, needed) is ok


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "get"])
def test_safe_methods_need_the_read_role(method: str) -> None:
    assert needed_role(method, read=Role.VIEWER, write=Role.ADMIN) is Role.VIEWER


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "post"])
def test_other_methods_need_the_write_role(method: str) -> None:
    assert needed_role(method, read=Role.VIEWER, write=Role.ADMIN) is Role.ADMIN


def ago(*minutes: float) -> list[datetime]:
    return [NOW - timedelta(minutes=m) for m in sorted(minutes, reverse=True)]


def test_sign_in_is_allowed_under_the_limits() -> None:
    assert wait_before_next(ago(1, 2), ago(1, 2, 3, 4), NOW, LIMITS) is None


def test_too_many_failures_for_a_name_wait_until_the_oldest_leaves_the_window() -> None:
    wait = wait_before_next(ago(4, 2, 1), [], NOW, LIMITS)
    assert wait == timedelta(minutes=1)  # the failure 4 min ago leaves the 5-min window


def test_too_many_failures_from_an_address_also_wait() -> None:
    wait = wait_before_next([], ago(4.5, 3, 2, 1, 0.5), NOW, LIMITS)
    assert wait == timedelta(seconds=30)


def test_failures_older_than_the_window_do_not_count() -> None:
    assert wait_before_next(ago(9, 8, 7, 1), [], NOW, LIMITS) is None


def test_the_longer_wait_wins_and_is_never_under_a_second() -> None:
    wait = wait_before_next(ago(4, 2, 1), ago(4.999, 3, 2, 1, 0.5), NOW, LIMITS)
    assert wait == timedelta(minutes=1)
    almost = wait_before_next(ago(4.99999, 2, 1), [], NOW, LIMITS)
    assert almost == timedelta(seconds=1)
