"""The devices section: the list (search, filters, sort, pages) and one device in detail.

The list's state is its query string, so a filtered view is a link; the filter form
asks with htmx for just the table (``HX-Target: device-table``) and pushes the URL.
A device's page refreshes its summary and state panels when the live feed says the
device reported (topic ``device-<id>``).

Its buttons are form posts to ``/ui/devices/{id}/...`` that run the API's own route
code (:mod:`fleet.api.devices`), so the rules and the audit entries are the API's:
editing needs an operator, revoking an admin (and a ticked confirmation). A post that
works redirects back to the page (303); one that does not gives the page back with
the error beside the form, and changes nothing.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from fleet.api import devices as api
from fleet.api.audited import audit_action
from fleet.api.deps import FleetState, LinkDep, SessionDep, StateDep
from fleet.api.errors import validation_message
from fleet.api.present import device_detail, device_or_404, drift_of, reported_of, tags_of
from fleet.api.schemas import CommandCreate, DeviceUpdate
from fleet.auth import Principal, Role
from fleet.dashboard.guard import Viewer, page_role
from fleet.dashboard.templating import Pages
from fleet.dashboard.views import devices as views
from fleet.dashboard.views.fleet import DEVICE_STATUSES, has_points
from fleet.desired import desired_of
from fleet.errors import FleetError, InvalidInput
from fleet.tables import Device

__all__ = ["router"]

router = APIRouter(prefix="/ui")

Writer = Annotated[Principal, page_role()]  # operator
AdminWriter = Annotated[Principal, page_role(write=Role.ADMIN)]

TABLE_TARGET = "device-table"
NOTICES = {
    "saved": "Saved.",
    "revoked": "Revoked: the device can no longer connect.",
    "sent": "Command sent to the device.",
}
_TAG_SPLIT = re.compile(r"[\s,]+")


def _render(
    request: Request, who: Principal, template: str, status_code: int = 200, **context: Any
) -> HTMLResponse:
    pages: Pages = request.app.state.pages
    return pages.render(request, who, template, nav="devices", status_code=status_code, **context)


def _wants_table(request: Request) -> bool:
    """An htmx request for the table alone (not a history restore, which needs the page)."""
    return (
        request.headers.get("hx-request") == "true"
        and request.headers.get("hx-target") == TABLE_TARGET
        and request.headers.get("hx-history-restore-request") != "true"
    )


@router.get("/devices", include_in_schema=False)
def device_list(request: Request, who: Viewer, session: SessionDep) -> HTMLResponse:
    listing = views.parse_listing(request.query_params)
    page = views.list_devices(session, listing)
    if _wants_table(request):
        response = _render(request, who, "fragments/devices_table.html", page=page)
    else:
        response = _render(
            request,
            who,
            "devices.html",
            page=page,
            options=views.filter_options(session),
            statuses=DEVICE_STATUSES,
            sorts=views.SORTS,
            per_page=views.PER_PAGE,
        )
    response.headers["Vary"] = "HX-Request, HX-Target"
    return response


# --- one device -------------------------------------------------------------------------


def _panels(session: Session, device: Device) -> dict[str, Any]:
    """What the summary and state panels show; shared by the page and their refreshes."""
    detail = device_detail(device, tags_of(session, [device.id])[device.id])
    desired, reported = desired_of(device), reported_of(device)
    drift = drift_of(device)
    return {
        "device": detail,
        "desired": desired,
        "reported": reported,
        "general_drift": [i.message for i in drift.items if i.model is None],
        "rows": views.state_rows(
            desired,
            reported,
            drift,
            views.reported_variants(session, reported),
            views.last_updates(session, device.id),
        ),
        "policy": views.policy_state(desired, reported),
        "caps": views.capabilities(views.device_report_of(device, reported)),
    }


def _page(
    request: Request,
    who: Principal,
    session: SessionDep,
    state: StateDep,
    device_id: str,
    *,
    hours: int = 24,
    status_code: int = 200,
    **extra: Any,
) -> HTMLResponse:
    device = device_or_404(session, device_id)
    notice = NOTICES.get(request.query_params.get("done", ""))
    context: dict[str, Any] = {
        **_panels(session, device),
        "events": views.events_page(session, device.id, 1),
        "charts": views.device_charts(session, device.id, state.clock(), hours),
        "hours": hours,
        "has_points": has_points,
        "groups": views.filter_options(session).groups,
        "notice": notice,
        "form": {},
        "form_error": None,
        "action_error": None,
    }
    context.update(extra)
    return _render(request, who, "device.html", status_code=status_code, **context)


@router.get("/devices/{device_id}", include_in_schema=False)
def device_page(
    request: Request,
    who: Viewer,
    session: SessionDep,
    state: StateDep,
    device_id: str,
    hours: Annotated[str | None, Query(max_length=8)] = None,
) -> HTMLResponse:
    return _page(request, who, session, state, device_id, hours=views.parse_hours(hours))


@router.get("/devices/{device_id}/summary", include_in_schema=False)
def summary(request: Request, who: Viewer, session: SessionDep, device_id: str) -> HTMLResponse:
    device = device_or_404(session, device_id)
    return _render(request, who, "fragments/device_summary.html", **_panels(session, device))


@router.get("/devices/{device_id}/state", include_in_schema=False)
def state_panel(request: Request, who: Viewer, session: SessionDep, device_id: str) -> HTMLResponse:
    device = device_or_404(session, device_id)
    return _render(request, who, "fragments/device_state.html", **_panels(session, device))


@router.get("/devices/{device_id}/events", include_in_schema=False)
def events(
    request: Request,
    who: Viewer,
    session: SessionDep,
    device_id: str,
    page: Annotated[int, Query(ge=1, le=10_000)] = 1,
) -> HTMLResponse:
    device = device_or_404(session, device_id)
    return _render(
        request,
        who,
        "fragments/device_events.html",
        device=device,
        events=views.events_page(session, device.id, page),
    )


@router.get("/devices/{device_id}/telemetry", include_in_schema=False)
def telemetry(
    request: Request,
    who: Viewer,
    session: SessionDep,
    state: StateDep,
    device_id: str,
    hours: Annotated[str | None, Query(max_length=8)] = None,
) -> HTMLResponse:
    device = device_or_404(session, device_id)
    window = views.parse_hours(hours)
    return _render(
        request,
        who,
        "fragments/device_telemetry.html",
        device=device,
        hours=window,
        has_points=has_points,
        charts=views.device_charts(session, device.id, state.clock(), window),
    )


# --- actions ----------------------------------------------------------------------------


def _done(device_id: str, what: str) -> RedirectResponse:
    return RedirectResponse(f"/ui/devices/{device_id}?done={what}", status_code=303)


def _update_of(name: str, group: str, tags: str) -> DeviceUpdate:
    """The API's update body from the form: an empty group takes the device out of its group."""
    try:
        return DeviceUpdate.model_validate(
            {
                "name": name.strip(),
                "group": group.strip() or None,
                "tags": [t for t in _TAG_SPLIT.split(tags) if t],
            }
        )
    except ValidationError as exc:
        raise InvalidInput(validation_message(list(exc.errors()))) from None


@router.post("/devices/{device_id}/edit", include_in_schema=False)
def edit(
    request: Request,
    who: Writer,
    session: SessionDep,
    state: StateDep,
    device_id: str,
    name: Annotated[str, Form(max_length=200)] = "",
    group: Annotated[str, Form(max_length=200)] = "",
    tags: Annotated[str, Form(max_length=4000)] = "",
) -> Response:
    """Rename, regroup, retag: the API's PATCH, audited as ``device.update``."""
    try:
        api.update_device(device_id, _update_of(name, group, tags), session, state, who)
    except InvalidInput as exc:
        session.rollback()
        form = {"name": name, "group": group, "tags": tags}
        return _page(
            request, who, session, state, device_id, status_code=422, form=form, form_error=str(exc)
        )
    return _done(device_id, "saved")


@router.post("/devices/{device_id}/command", include_in_schema=False)
async def command(
    request: Request,
    who: Writer,
    session: SessionDep,
    state: StateDep,
    link: LinkDep,
    device_id: str,
    kind: Annotated[str, Form(max_length=32)] = "",
) -> Response:
    """A one-off command (report, reconcile, flush) through the API's route code."""
    try:
        body = CommandCreate.model_validate({"kind": kind})
    except ValidationError:
        problem = "choose a command: report, reconcile or flush"
        return await run_in_threadpool(
            _page, request, who, session, state, device_id, status_code=422, action_error=problem
        )
    try:
        await api.send_command(device_id, body, state, link)
    except FleetError as exc:
        return await run_in_threadpool(
            _page,
            request,
            who,
            session,
            state,
            device_id,
            status_code=exc.status,
            action_error=str(exc),
        )
    await run_in_threadpool(_audit_command, session, who, state, device_id, body.kind)
    return _done(device_id, "sent")


def _audit_command(
    session: Session, who: Principal, state: FleetState, device_id: str, kind: str
) -> None:
    """The API does not audit commands; a person's command from the dashboard is recorded."""
    audit_action(session, who, state.clock(), "device.command", f"device:{device_id}", kind=kind)
    session.commit()


@router.post("/devices/{device_id}/revoke", include_in_schema=False)
async def revoke(
    request: Request,
    who: AdminWriter,
    session: SessionDep,
    state: StateDep,
    link: LinkDep,
    device_id: str,
    confirm: Annotated[str, Form(max_length=8)] = "",
) -> Response:
    """Revoke for good (admins only, confirmed): the API's route, audited ``device.revoke``."""
    await run_in_threadpool(device_or_404, session, device_id)
    if confirm != "yes":
        problem = "tick the box to confirm: revoking cannot be undone"
        return await run_in_threadpool(
            _page, request, who, session, state, device_id, status_code=400, action_error=problem
        )
    await api.revoke_device(device_id, state, link, who)
    return _done(device_id, "revoked")
