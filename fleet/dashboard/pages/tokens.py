"""Enrollment tokens: operators see them, admins create (the secret shown once) and revoke."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from fleet.api.deps import SessionDep, StateDep
from fleet.auth import Principal, Role
from fleet.dashboard.guard import Operator, page_role
from fleet.dashboard.templating import Pages
from fleet.dashboard.views import tokens as views
from fleet.dashboard.views.rollouts import group_names
from fleet.errors import InvalidInput

__all__ = ["router"]

router = APIRouter(prefix="/ui")
AdminWrite = Annotated[Principal, page_role(read=Role.OPERATOR, write=Role.ADMIN)]


def _render(
    request: Request, who: Principal, template: str, status_code: int = 200, **context: Any
) -> HTMLResponse:
    pages: Pages = request.app.state.pages
    return pages.render(request, who, template, nav="tokens", status_code=status_code, **context)


def _listing(
    request: Request,
    who: Principal,
    session: Session,
    state: StateDep,
    form: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    return _render(
        request,
        who,
        "tokens.html",
        status_code=status_code,
        tokens=views.list_tokens(session, state.clock()),
        groups=group_names(session),
        form=form or {"uses": "1", "expires": "24h"},
        errors=errors or {},
    )


@router.get("/tokens", include_in_schema=False)
def tokens(request: Request, who: Operator, session: SessionDep, state: StateDep) -> HTMLResponse:
    return _listing(request, who, session, state)


@router.post("/tokens", include_in_schema=False)
def create(
    request: Request,
    who: AdminWrite,
    session: SessionDep,
    state: StateDep,
    group: Annotated[str, Form(max_length=64)] = "",
    uses: Annotated[str, Form(max_length=16)] = "1",
    expires: Annotated[str, Form(max_length=32)] = "24h",
    note: Annotated[str, Form(max_length=400)] = "",
) -> Response:
    """Make a token and show its secret, once, with the agent's command."""
    form = {"group": group, "uses": uses, "expires": expires, "note": note}
    body, errors = views.parse_token_form(group, uses, expires, note)
    if body is not None:
        try:
            token, secret = views.create_token(session, body, who, state.clock())
        except InvalidInput as exc:
            errors = {exc.field or "form": str(exc).removeprefix(f"invalid {exc.field}: ")}
        else:
            session.commit()
            response = _render(
                request,
                who,
                "token_created.html",
                status_code=201,
                token=token,
                secret=secret,
                fleet_url=state.settings.resolved_public_url,
            )
            response.headers["Cache-Control"] = "no-store"  # the secret must not be kept
            return response
    return _listing(request, who, session, state, form, errors, 422)


@router.post("/tokens/{token_id}/revoke", include_in_schema=False)
def revoke(
    token_id: str, who: AdminWrite, session: SessionDep, state: StateDep
) -> RedirectResponse:
    views.revoke_token(session, token_id, who, state.clock())
    session.commit()
    return RedirectResponse("/ui/tokens", status_code=303)
