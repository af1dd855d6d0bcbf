"""Who may see a page: the API's principal, but a browser with no session is sent to sign in.

Pages use :data:`Viewer`, :data:`Operator` or :data:`AdminPage`; the role rules are
the API's (:func:`fleet.api.deps.authorize`), so a button hidden from a viewer is
also refused by the server. No page is served until an admin user exists.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request
from sqlmodel import Session

from fleet.api.deps import SessionDep, StateDep, get_principal
from fleet.auth import Principal, Role, allows, needed_role
from fleet.auth.users import has_admin
from fleet.errors import Forbidden, Unauthorized

__all__ = [
    "AdminPage",
    "NoAdmin",
    "Operator",
    "SignInNeeded",
    "Viewer",
    "page_role",
    "require_admin_exists",
]


class SignInNeeded(Exception):
    """No one is signed in: the error handler redirects to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class NoAdmin(Exception):
    """No admin user exists yet: the dashboard explains how to create one."""


def require_admin_exists(session: Session) -> None:
    if not has_admin(session):
        raise NoAdmin


def page_role(read: Role = Role.VIEWER, write: Role = Role.OPERATOR) -> Any:
    """A page dependency: signed in (else to the sign-in page) with the role the method needs."""

    async def check(request: Request, state: StateDep, session: SessionDep) -> Principal:
        require_admin_exists(session)
        try:
            who = await get_principal(request, state, session)
        except Unauthorized:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise SignInNeeded(quote(target, safe="/?=&")) from None
        needed = needed_role(request.method, read=read, write=write)
        if not allows(who.role, needed):
            raise Forbidden(f"you are a {who.role.value}: this needs the {needed.value} role")
        return who

    return Depends(check)


Viewer = Annotated[Principal, page_role()]
Operator = Annotated[Principal, page_role(read=Role.OPERATOR)]
AdminPage = Annotated[Principal, page_role(read=Role.ADMIN, write=Role.ADMIN)]
