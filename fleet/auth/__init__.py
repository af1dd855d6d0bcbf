"""Who may do what: users, roles, API tokens, browser sessions and sign-in limits.

The decisions are pure (:mod:`.roles`, :mod:`.limits`); the rest are thin shells on
the database. The API's dependencies (:mod:`fleet.api.deps`) turn a request into a
:class:`Principal` with these, and every route states the role it needs.
"""

from fleet.auth.principal import Principal, Via
from fleet.auth.roles import Role, allows, needed_role

__all__ = ["Principal", "Role", "Via", "allows", "needed_role"]
