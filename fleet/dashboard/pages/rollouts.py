"""The rollouts section: the listing, the create form and its preview, the live view, actions.

Creating and acting go through the engine exactly as the API does
(``state.rollouts.create`` and ``state.rollouts.act``, audited there with the
session's source). The form is validated by the API's own model; a bad field gives
the form back (422) with the message beside the field, and nothing is created. The
preview runs :func:`fleet.rollout.preview.preview_rollout` and writes nothing. The live
view is one fragment (``/ui/rollouts/<id>/progress``) that refreshes itself on the
``rollout-<id>`` live topic.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from fleet.api.deps import SessionDep, StateDep
from fleet.auth import Principal
from fleet.dashboard.guard import Operator, Viewer, page_role
from fleet.dashboard.templating import Pages
from fleet.dashboard.views import rollouts as views
from fleet.errors import Conflict, InvalidInput, NotFound
from fleet.rollout.preview import preview_rollout
from fleet.rollout.spec import FailureKind, Metric
from fleet.tables import Rollout

__all__ = ["router"]

router = APIRouter(prefix="/ui")
Writer = Annotated[Principal, page_role()]  # operators and admins
PER_PAGE = 25
GATE_ROWS = 3  # empty gate rows the form offers (more after each one filled, up to 16)
ABORT_ROWS = 2
DEFAULTS = {
    "stages_kind": "waves",
    "waves": "100",
    "soak_s": "600",
    "check_interval_s": "60",
    "device_timeout_s": "3600",
    "window_timezone": "UTC",
}


def _render(
    request: Request, who: Principal, template: str, *, status_code: int = 200, **context: Any
) -> HTMLResponse:
    pages: Pages = request.app.state.pages
    return pages.render(request, who, template, nav="rollouts", status_code=status_code, **context)


async def _fields(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str) and k != "csrf_token"}


# -- the listing --------------------------------------------------------------------------


@router.get("/rollouts", include_in_schema=False)
def listing(
    request: Request,
    who: Viewer,
    session: SessionDep,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> HTMLResponse:
    rows, total = views.history(session, page, PER_PAGE)
    return _render(
        request,
        who,
        "rollouts.html",
        live=views.live_rollouts(session),
        history=rows,
        page=page,
        pages=max(1, math.ceil(total / PER_PAGE)),
        total=total,
    )


@router.get("/rollouts/live", include_in_schema=False)
def live(request: Request, who: Viewer, session: SessionDep) -> HTMLResponse:
    """The live rollouts' table, refreshed on the ``rollouts`` topic."""
    return _render(request, who, "fragments/rollouts_live.html", live=views.live_rollouts(session))


# -- creating -----------------------------------------------------------------------------


def _form_page(
    request: Request,
    who: Principal,
    session: Session,
    form: dict[str, str],
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    parsed = views.parse_form(form)
    gate_rows = max(GATE_ROWS, max(parsed.gate_rows, default=-2) + 2)
    abort_rows = max(ABORT_ROWS, max(parsed.abort_rows, default=-2) + 2)
    return _render(
        request,
        who,
        "rollout_new.html",
        status_code=status_code,
        form=form,
        errors=errors or {},
        choices=views.change_choices(session),
        groups=views.group_names(session),
        gate_rows=range(min(gate_rows, 16)),
        abort_rows=range(min(abort_rows, 16)),
        metrics=[m.value for m in Metric],
        failures=["any", *(k.value for k in FailureKind)],
    )


@router.get("/rollouts/new", include_in_schema=False)
def new(
    request: Request,
    who: Operator,
    session: SessionDep,
    model: Annotated[str, Query(max_length=128)] = "",
    version: Annotated[str, Query(max_length=128)] = "",
    policy: Annotated[str, Query(max_length=64)] = "",
) -> HTMLResponse:
    """The form; ``?model=&version=`` or ``?policy=`` choose the change beforehand."""
    form = dict(DEFAULTS)
    if model and version:
        form["change"] = f"model|{model}|{version}"
    elif policy:
        form["change"] = f"policy|{policy}|{version}"
    return _form_page(request, who, session, form)


def _message(exc: InvalidInput) -> str:
    return str(exc).removeprefix(f"invalid {exc.field}: ") if exc.field else str(exc)


@router.post("/rollouts/preview", include_in_schema=False)
async def preview(
    request: Request, who: Writer, session: SessionDep, state: StateDep
) -> HTMLResponse:
    """Stages and ineligible devices for the form as it is; creates nothing."""
    form = await _fields(request)
    parsed = views.parse_form(form)
    spec, errors = views.validate_form(parsed)
    result = None
    if spec is not None:
        try:
            result = await run_in_threadpool(preview_rollout, session, spec, state.clock())
        except InvalidInput as exc:
            errors = {views.form_field(exc.field, parsed): _message(exc)}
    return _render(request, who, "fragments/rollout_preview.html", preview=result, errors=errors)


@router.post("/rollouts", include_in_schema=False)
async def create(request: Request, who: Writer, session: SessionDep, state: StateDep) -> Response:
    """Start the rollout and show it; the form again with the errors when it cannot."""
    form = await _fields(request)
    parsed = views.parse_form(form)
    spec, errors = views.validate_form(parsed)
    status = 422
    if spec is not None:
        try:
            rollout_id = await state.rollouts.create(spec, who.name, who.source)
        except InvalidInput as exc:
            errors = {views.form_field(exc.field, parsed): _message(exc)}
        except Conflict as exc:
            errors, status = {"form": str(exc)}, 409
        else:
            return RedirectResponse(f"/ui/rollouts/{rollout_id}", status_code=303)
    return _form_page(request, who, session, form, errors, status)


# -- one rollout --------------------------------------------------------------------------


def _rollout(session: Session, rollout_id: str) -> Rollout:
    row = session.get(Rollout, rollout_id)
    if row is None:
        raise NotFound(f"no rollout {rollout_id!r}")
    return row


def _progress(session: Session, rollout_id: str) -> dict[str, Any]:
    detail = views.rollout_progress(session, _rollout(session, rollout_id))
    failed, failed_total = views.failed_devices(session, rollout_id)
    return {
        "r": detail,
        "stages": views.stage_rows(detail),
        "gates": views.gate_views(detail),
        "spec_gates": detail.spec.get("gates", []),
        "actions": views.actions_for(detail.status, detail.phase),
        "failed": failed,
        "failed_total": failed_total,
        "states": views.DEVICE_STATES,
    }


@router.get("/rollouts/{rollout_id}", include_in_schema=False)
def show(request: Request, who: Viewer, session: SessionDep, rollout_id: str) -> HTMLResponse:
    context = _progress(session, rollout_id)
    spec = json.dumps(context["r"].spec, indent=2, sort_keys=True)
    return _render(request, who, "rollout.html", spec_json=spec, action_error="", **context)


@router.get("/rollouts/{rollout_id}/progress", include_in_schema=False)
def progress(request: Request, who: Viewer, session: SessionDep, rollout_id: str) -> HTMLResponse:
    return _render(
        request, who, "fragments/rollout_progress.html", **_progress(session, rollout_id)
    )


@router.post("/rollouts/{rollout_id}/{action}", include_in_schema=False)
async def act(
    request: Request,
    who: Writer,
    session: SessionDep,
    state: StateDep,
    rollout_id: str,
    action: Literal["pause", "resume", "approve", "abort"],
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """Pause, resume, approve the next stage or abort; back to the rollout."""
    try:
        await state.rollouts.act(rollout_id, action, who.name, reason.strip(), who.source)
    except Conflict as exc:
        session.expire_all()
        context = _progress(session, rollout_id)
        spec = json.dumps(context["r"].spec, indent=2, sort_keys=True)
        return _render(
            request, who, "rollout.html", status_code=409, spec_json=spec,
            action_error=str(exc), **context,
        )  # fmt: skip
    return RedirectResponse(f"/ui/rollouts/{rollout_id}", status_code=303)
