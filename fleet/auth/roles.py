"""Three roles, ordered: each can do what the ones below it can.

- ``viewer`` reads everything but secrets;
- ``operator`` also runs the fleet day to day: rollouts, desired states, groups,
  policies, model uploads, acknowledging alerts;
- ``admin`` also manages who and what may enter: users, enrollment tokens, device
  revocation, signing keys, alert rules and webhooks.

Reading needs ``viewer`` unless a route says otherwise, writing ``operator``: a route
states only where it differs, so a new route is never open by accident.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["SAFE_METHODS", "Role", "allows", "needed_role"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Role(StrEnum):
    """What a user may do; each role includes the ones before it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def allows(held: Role, needed: Role) -> bool:
    return _RANK[held] >= _RANK[needed]


def needed_role(method: str, *, read: Role, write: Role) -> Role:
    """The role a request needs: ``read`` for safe methods, ``write`` for the rest."""
    return read if method.upper() in SAFE_METHODS else write
