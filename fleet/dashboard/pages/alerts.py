"""Alerts: open ones first, then the history; operators acknowledge; admins tune the rules.

Acknowledging, the rules and the webhook go through :mod:`fleet.alerts`, as the API
does (``POST /api/v1/alerts/<id>/acknowledge``, ``PUT .../rules/<kind>``,
``PUT|DELETE .../webhook``, ``POST .../webhook/test``), audited there. The open
alerts refresh themselves on the ``alerts`` live topic.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlmodel import Session

from fleet import alerts
from fleet.alerts.params import kind_of
from fleet.api.deps import FleetState, SessionDep, StateDep
from fleet.auth import Principal, Role, allows
from fleet.dashboard.guard import Viewer, page_role
from fleet.dashboard.templating import Pages
from fleet.dashboard.views import alerts as views
from fleet.errors import Conflict, InvalidInput, NotFound

__all__ = ["router"]

router = APIRouter(prefix="/ui")
Writer = Annotated[Principal, page_role()]  # operators acknowledge
AdminWrite = Annotated[Principal, page_role(write=Role.ADMIN)]  # admins tune
PER_PAGE = 50
OPEN_SHOWN = 500


def _open(session: Session) -> dict[str, Any]:
    """The newest open alerts, and how many are open."""
    return {
        "open_alerts": alerts.list_alerts(session, "open", OPEN_SHOWN),
        "open_total": views.open_count(session),
    }


def _page(
    request: Request,
    who: Principal,
    session: Session,
    state: FleetState,
    *,
    page: int = 1,
    errors: dict[str, str] | None = None,
    notice: str = "",
    status_code: int = 200,
) -> HTMLResponse:
    cleared, total = views.cleared_page(session, page, PER_PAGE)
    admin = allows(who.role, Role.ADMIN)
    rules = list(alerts.load_rules(session, alerts.defaults_of(state.settings)).values())
    webhook = None
    if admin:
        try:
            webhook = alerts.get_webhook(session)
        except NotFound:
            webhook = None
    pages: Pages = request.app.state.pages
    return pages.render(
        request,
        who,
        "alerts.html",
        nav="alerts",
        status_code=status_code,
        **_open(session),
        cleared=cleared,
        page=page,
        pages=max(1, math.ceil(total / PER_PAGE)),
        total=total,
        rules=[(rule, views.param_fields(rule)) for rule in rules],
        webhook=webhook,
        errors=errors or {},
        notice=notice,
        badge=views.severity_badge,
    )


@router.get("/alerts", include_in_schema=False)
def alerts_page(
    request: Request,
    who: Viewer,
    session: SessionDep,
    state: StateDep,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> HTMLResponse:
    return _page(request, who, session, state, page=page)


@router.get("/alerts/open", include_in_schema=False)
def open_alerts(request: Request, who: Viewer, session: SessionDep) -> HTMLResponse:
    """The open alerts' table, refreshed on the ``alerts`` topic."""
    pages: Pages = request.app.state.pages
    return pages.render(
        request,
        who,
        "fragments/alerts_open.html",
        **_open(session),
        badge=views.severity_badge,
    )


@router.post("/alerts/{alert_id}/acknowledge", include_in_schema=False)
def acknowledge(
    request: Request, alert_id: int, who: Writer, session: SessionDep, state: StateDep
) -> Response:
    """Acknowledge an open alert: an event clears, a condition stays open while it holds."""
    try:
        alerts.acknowledge(session, alert_id, actor=who.name, now=state.clock(), source=who.source)
    except Conflict as exc:
        session.rollback()
        return _page(request, who, session, state, errors={"ack": str(exc)}, status_code=409)
    return RedirectResponse("/ui/alerts", status_code=303)


def _save_rule(
    request: Request,
    who: Principal,
    session: Session,
    state: FleetState,
    kind: str,
    form: dict[str, str],
) -> Response:
    defaults = alerts.defaults_of(state.settings)
    current = alerts.load_rules(session, defaults)[kind_of(kind)]  # 404 for an unknown kind
    try:
        alerts.set_rule(
            session, kind, enabled=form.get("enabled") == "on",
            overrides=views.overrides_of(form, current), actor=who.name, now=state.clock(),
            defaults=defaults, source=who.source,
        )  # fmt: skip
    except (InvalidInput, Conflict) as exc:
        session.rollback()
        errors = {f"rule-{kind}": str(exc).removeprefix("invalid ")}
        return _page(request, who, session, state, errors=errors, status_code=exc.status)
    return RedirectResponse("/ui/alerts#rules", status_code=303)


@router.post("/alerts/rules/{kind}", include_in_schema=False)
async def set_rule(
    request: Request, kind: str, who: AdminWrite, session: SessionDep, state: StateDep
) -> Response:
    """Replace a rule's settings: enabled, and the parameters typed (blank: the default)."""
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    return await run_in_threadpool(_save_rule, request, who, session, state, kind, form)


@router.post("/alerts/webhook", include_in_schema=False)
def set_webhook(
    request: Request,
    who: AdminWrite,
    session: SessionDep,
    state: StateDep,
    url: Annotated[str, Form(max_length=2000)] = "",
    secret: Annotated[str, Form(max_length=256)] = "",
) -> Response:
    """Set (or replace) the webhook; a bad URL or secret is shown beside the form."""
    try:
        settings = alerts.WebhookSettings.model_validate(
            {"url": url.strip(), "secret": secret or None}
        )
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = str(error["loc"][0]) if error["loc"] else "url"
        message = f"{field}: {error['msg']}"
        return _page(request, who, session, state, errors={"webhook": message}, status_code=422)
    alerts.set_webhook(session, settings, actor=who.name, now=state.clock(), source=who.source)
    return RedirectResponse("/ui/alerts#webhook", status_code=303)


@router.post("/alerts/webhook/delete", include_in_schema=False)
def delete_webhook(who: AdminWrite, session: SessionDep, state: StateDep) -> Response:
    alerts.delete_webhook(session, actor=who.name, now=state.clock(), source=who.source)
    return RedirectResponse("/ui/alerts#webhook", status_code=303)


@router.post("/alerts/webhook/test", include_in_schema=False)
async def test_webhook(
    request: Request, who: AdminWrite, session: SessionDep, state: StateDep
) -> Response:
    """Post a test alert to the webhook now and say how it went."""
    attempt = await alerts.send_test(state.engine, state.settings, state.clock())
    notice = (
        f"the test alert was delivered (HTTP {attempt.status})"
        if attempt.delivered
        else f"the test alert was not delivered: {attempt.error or f'HTTP {attempt.status}'}"
    )
    return await run_in_threadpool(lambda: _page(request, who, session, state, notice=notice))
