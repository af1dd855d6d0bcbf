"""Users (admins only) and everyone's own account: password and API tokens.

Every change goes through :mod:`fleet.auth.users` and :mod:`fleet.auth.api_tokens`,
which audit it with the session's source and end a user's sessions when their role,
password or state changes. A refused change (the last enabled admin, a name taken,
a short password) gives the page back with the reason beside the form, nothing
changed. Changing your own password ends every session of yours, this one too: the
page sends you to sign in again with the new one.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from fleet.api.deps import FleetState, SessionDep, StateDep
from fleet.auth import Principal, Role
from fleet.auth.api_tokens import create_token, list_tokens, revoke_token
from fleet.auth.passwords import MIN_LENGTH, verify
from fleet.auth.users import create_user, update_user
from fleet.dashboard.guard import AdminPage, Viewer, page_role
from fleet.dashboard.templating import Pages
from fleet.dashboard.views.users import api_token_state, token_expiry, user_rows
from fleet.errors import Conflict, InvalidInput, NotFound
from fleet.tables import User

__all__ = ["router"]

router = APIRouter(prefix="/ui")
Anyone = Annotated[Principal, page_role(write=Role.VIEWER)]  # your own account
_Text = Annotated[str, Form(max_length=1024)]


def _render(
    request: Request, who: Principal, template: str, status_code: int = 200, **context: Any
) -> HTMLResponse:
    pages: Pages = request.app.state.pages
    return pages.render(request, who, template, status_code=status_code, **context)


def _message(exc: InvalidInput) -> str:
    return str(exc).removeprefix(f"invalid {exc.field}: ") if exc.field else str(exc)


# -- users (admins) -----------------------------------------------------------------------


def _users_page(
    request: Request,
    who: Principal,
    session: Session,
    *,
    form: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    return _render(
        request,
        who,
        "users.html",
        status_code=status_code,
        nav="users",
        users=user_rows(session),
        roles=[r.value for r in Role],
        form=form or {"role": Role.VIEWER.value},
        errors=errors or {},
        min_length=MIN_LENGTH,
    )


@router.get("/users", include_in_schema=False)
def users(request: Request, who: AdminPage, session: SessionDep) -> HTMLResponse:
    return _users_page(request, who, session)


@router.post("/users", include_in_schema=False)
def add_user(
    request: Request,
    who: AdminPage,
    session: SessionDep,
    state: StateDep,
    name: Annotated[str, Form(max_length=64)] = "",
    password: _Text = "",
    role: Annotated[Role, Form()] = Role.VIEWER,
) -> Response:
    form = {"name": name, "role": role.value}
    try:
        create_user(
            session, name=name.strip(), password=password, role=role,
            actor=who.name, source=who.source, now=state.clock(),
        )  # fmt: skip
    except InvalidInput as exc:
        session.rollback()
        errors = {exc.field or "name": _message(exc)}
        return _users_page(request, who, session, form=form, errors=errors, status_code=422)
    except Conflict as exc:
        session.rollback()
        errors = {"name": str(exc)}
        return _users_page(request, who, session, form=form, errors=errors, status_code=409)
    session.commit()
    return RedirectResponse("/ui/users", status_code=303)


def _change(
    request: Request, who: Principal, session: Session, state: FleetState, name: str, **change: Any
) -> Response:
    """Apply one change to a user; the page again with the reason when it is refused."""
    try:
        update_user(session, name, actor=who.name, source=who.source, now=state.clock(), **change)
    except (InvalidInput, Conflict) as exc:
        session.rollback()
        message = _message(exc) if isinstance(exc, InvalidInput) else str(exc)
        status = 422 if isinstance(exc, InvalidInput) else 409
        errors = {f"user-{name}": message}
        return _users_page(request, who, session, errors=errors, status_code=status)
    session.commit()
    if who.name == name and who.user_id is not None:  # your own role or state: sign in again
        return RedirectResponse("/ui/login?next=/ui/users", status_code=303)
    return RedirectResponse("/ui/users", status_code=303)


@router.post("/users/{name}/role", include_in_schema=False)
def set_role(
    request: Request,
    who: AdminPage,
    session: SessionDep,
    state: StateDep,
    name: str,
    role: Annotated[Role, Form()],
) -> Response:
    return _change(request, who, session, state, name, role=role)


@router.post("/users/{name}/state", include_in_schema=False)
def set_state(
    request: Request,
    who: AdminPage,
    session: SessionDep,
    state: StateDep,
    name: str,
    disabled: Annotated[bool, Form()],
) -> Response:
    return _change(request, who, session, state, name, disabled=disabled)


@router.post("/users/{name}/password", include_in_schema=False)
def reset_password(
    request: Request,
    who: AdminPage,
    session: SessionDep,
    state: StateDep,
    name: str,
    password: _Text = "",
) -> Response:
    return _change(request, who, session, state, name, password=password)


# -- my account ---------------------------------------------------------------------------


def _me(session: Session, who: Principal) -> User:
    user = session.get(User, who.user_id) if who.user_id is not None else None
    if user is None:
        raise NotFound("the admin token has no account: sign in as a user")
    return user


def _account_page(
    request: Request,
    who: Principal,
    session: Session,
    *,
    errors: dict[str, str] | None = None,
    created: tuple[str, str] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    user = _me(session, who)
    now = request.app.state.fleet.clock()
    response = _render(
        request,
        who,
        "account.html",
        status_code=status_code,
        nav="account",
        user=user,
        tokens=[(row, api_token_state(row, now)) for row, _ in list_tokens(session, user)],
        errors=errors or {},
        created=created,
        min_length=MIN_LENGTH,
    )
    if created is not None:
        response.headers["Cache-Control"] = "no-store"  # the page holds a secret
    return response


@router.get("/account", include_in_schema=False)
def account(request: Request, who: Viewer, session: SessionDep) -> HTMLResponse:
    return _account_page(request, who, session)


@router.post("/account/password", include_in_schema=False)
def change_password(
    request: Request,
    who: Anyone,
    session: SessionDep,
    state: StateDep,
    current: _Text = "",
    new: _Text = "",
    confirm: _Text = "",
) -> Response:
    """Your own password; every session of yours ends, so you sign in again with it."""
    user = _me(session, who)
    errors: dict[str, str] = {}
    if not verify(user.password_hash, current):
        errors["current"] = "the current password is wrong"
    elif new != confirm:
        errors["confirm"] = "the two new passwords differ"
    else:
        try:
            update_user(
                session, user.name, password=new, actor=who.name, source=who.source,
                now=state.clock(),
            )  # fmt: skip
        except InvalidInput as exc:
            session.rollback()
            errors["new"] = _message(exc)
    if errors:
        status = 403 if "current" in errors else 422
        return _account_page(request, who, session, errors=errors, status_code=status)
    session.commit()
    return RedirectResponse("/ui/login?next=/ui/account", status_code=303)


@router.post("/account/tokens", include_in_schema=False)
def new_token(
    request: Request,
    who: Anyone,
    session: SessionDep,
    state: StateDep,
    name: Annotated[str, Form(max_length=64)] = "",
    expires: Annotated[str, Form(max_length=32)] = "90d",
) -> Response:
    """A new API token of yours; its secret is on this answer only."""
    user = _me(session, who)
    now = state.clock()
    try:
        if not name.strip():
            raise InvalidInput("name the token (what it is for: laptop, ci)", field="token_name")
        expires_at = token_expiry(expires, now)
    except InvalidInput as exc:
        errors = {exc.field or "token_name": _message(exc)}
        return _account_page(request, who, session, errors=errors, status_code=422)
    row, secret = create_token(
        session, user, name=name.strip(), expires_at=expires_at, actor=who.name,
        source=who.source, now=now,
    )  # fmt: skip
    session.commit()
    return _account_page(request, who, session, created=(row.name, secret), status_code=201)


@router.post("/account/tokens/{token_id}/revoke", include_in_schema=False)
def drop_token(token_id: int, who: Anyone, session: SessionDep, state: StateDep) -> Response:
    """Revoke one of your own tokens (anyone else's is not found)."""
    revoke_token(
        session, token_id, owner=_me(session, who), actor=who.name, source=who.source,
        now=state.clock(),
    )  # fmt: skip
    session.commit()
    return RedirectResponse("/ui/account", status_code=303)
