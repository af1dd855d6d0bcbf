"""Degraded-mode policies: the list, one policy in full, new versions and assignments.

Everything goes through :mod:`fleet.policy` as the API does: a new version is
validated by the agent's own model and numbered by the controller
(:func:`~fleet.policy.store.create_policy`), an assignment puts the policy in each
eligible device's signed desired state and lists the others with the model each one
lacks (:func:`~fleet.policy.assign.assign`), and both are audited with the session's
source. Operators change policies; viewers read them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from fleet.api.deps import SessionDep, StateDep
from fleet.auth import Principal
from fleet.dashboard.guard import Viewer, page_role
from fleet.dashboard.templating import Pages
from fleet.dashboard.views import policies as views
from fleet.dashboard.views.rollouts import group_names
from fleet.errors import Conflict, InvalidInput, NotFound
from fleet.policy.assign import Outcome, assign, unassign
from fleet.policy.store import create_policy
from fleet.policy.views import PolicyDetail, policy_detail
from fleet.tables import PolicyAssignment

__all__ = ["router"]

router = APIRouter(prefix="/ui")
Writer = Annotated[Principal, page_role()]  # operators and admins
DEVICES_SHOWN = 200  # assigned devices listed on a policy's page (the counts cover all)
_Body = Annotated[str, Form(max_length=200_000)]


def _render(
    request: Request, who: Principal, template: str, status_code: int = 200, **context: Any
) -> HTMLResponse:
    pages: Pages = request.app.state.pages
    return pages.render(request, who, template, nav="policies", status_code=status_code, **context)


def _message(exc: InvalidInput) -> str:
    return str(exc).removeprefix(f"invalid {exc.field}: ") if exc.field else str(exc)


def _body_error(exc: InvalidInput) -> dict[str, str]:
    """Every error of a policy's text is shown at the text, naming the field it is about."""
    where = exc.field or "body"
    if where in ("body", "description", "name"):
        return {where: _message(exc)}
    return {"body": f"{where.removeprefix('body.')}: {_message(exc)}"}


# -- the list -----------------------------------------------------------------------------


def _list_page(
    request: Request,
    who: Principal,
    session: Session,
    form: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    return _render(
        request,
        who,
        "policies.html",
        status_code=status_code,
        policies=views.policy_rows(session),
        assigned=views.assignments_by_policy(session),
        form=form or {},
        errors=errors or {},
    )


@router.get("/policies", include_in_schema=False)
def policies(request: Request, who: Viewer, session: SessionDep) -> HTMLResponse:
    return _list_page(request, who, session)


def _create(
    session: Session, state: StateDep, who: Principal, name: str, description: str, text: str
) -> int:
    body = views.policy_body(text, name)
    row = create_policy(
        session,
        name=name,
        description=description.strip() or str(body.get("description", "")),
        breaker=body.get("breaker", {}),
        chains=body.get("chains", {}),
        actor=who.name,
        source=who.source,
        now=state.clock(),
    )
    session.commit()
    return row.version


@router.post("/policies", include_in_schema=False)
def new_policy(
    request: Request,
    who: Writer,
    session: SessionDep,
    state: StateDep,
    body: _Body = "",
    name: Annotated[str, Form(max_length=64)] = "",
    description: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """Version 1 of a new policy (or the next version, if the name exists)."""
    name = name.strip()
    try:
        version = _create(session, state, who, name, description, body)
    except InvalidInput as exc:
        session.rollback()
        form = {"name": name, "body": body, "description": description}
        return _list_page(request, who, session, form, _body_error(exc), 422)
    return RedirectResponse(f"/ui/policies/{name}?version={version}", status_code=303)


# -- one policy ---------------------------------------------------------------------------


def _editable(detail: PolicyDetail) -> str:
    """The version's body as JSON to start the next version from."""
    body = {"description": detail.description, **{k: detail.body[k] for k in ("breaker", "chains")}}
    return json.dumps(body, indent=2)


def _policy_page(
    request: Request,
    who: Principal,
    session: Session,
    name: str,
    version: int | None = None,
    *,
    form: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    outcome: Outcome | None = None,
    undone: bool = False,
    status_code: int = 200,
) -> HTMLResponse:
    detail = policy_detail(session, name, version)
    latest = detail.versions[-1].version
    shown = [d for d in detail.devices if d.status != "enforcing"][:DEVICES_SHOWN]
    return _render(
        request,
        who,
        "policy.html",
        status_code=status_code,
        p=detail,
        latest=latest,
        chains=views.chain_views(detail.body),
        body_json=json.dumps(detail.body, indent=2, sort_keys=True),
        counts=views.status_counts(detail.devices),
        devices=shown,
        groups=group_names(session),
        form={"body": _editable(detail), "version": str(latest)} | (form or {}),
        errors=errors or {},
        outcome=outcome,
        undone=undone,
    )


@router.get("/policies/{name}", include_in_schema=False)
def policy(
    request: Request,
    who: Viewer,
    session: SessionDep,
    name: str,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> HTMLResponse:
    return _policy_page(request, who, session, name, version)


@router.post("/policies/{name}/versions", include_in_schema=False)
def new_version(
    request: Request,
    who: Writer,
    session: SessionDep,
    state: StateDep,
    name: str,
    body: _Body = "",
    description: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """The next version, from the text typed; the page again with the error when refused."""
    try:
        version = _create(session, state, who, name, description, body)
    except InvalidInput as exc:
        session.rollback()
        form = {"body": body, "description": description}
        return _policy_page(
            request, who, session, name, form=form, errors=_body_error(exc), status_code=422
        )
    return RedirectResponse(f"/ui/policies/{name}?version={version}", status_code=303)


@router.post("/policies/{name}/assign", include_in_schema=False)
async def assign_policy(
    request: Request,
    who: Writer,
    session: SessionDep,
    state: StateDep,
    name: str,
    group: Annotated[str, Form(max_length=64)] = "",
    device: Annotated[str, Form(max_length=63)] = "",
    version: Annotated[str, Form(max_length=12)] = "",
) -> Response:
    """Assign a version to a group or a device; the page shows what it did to each device."""
    form = {"group": group, "device": device, "version": version}
    group, device = group.strip(), device.strip()
    status = 422
    if bool(group) == bool(device):
        errors = {"assign": "choose a group or type a device id (one of them)"}
    elif version and not version.isdigit():
        errors = {"assign": f"{version!r} is not a version number"}
    else:
        scope: Literal["group", "device"] = "group" if group else "device"
        try:
            outcome = await assign(
                state.desired, state.engine, name=name,
                version=int(version) if version else None, scope=scope,
                target=group or device, actor=who.name, source=who.source, now=state.clock(),
            )  # fmt: skip
        except (NotFound, Conflict) as exc:
            errors, status = {"assign": str(exc)}, exc.status
        else:
            session.expire_all()
            return await run_in_threadpool(
                _policy_page, request, who, session, name, outcome=outcome
            )
    return await run_in_threadpool(
        _policy_page, request, who, session, name, form=form, errors=errors, status_code=status
    )


@router.post("/policies/{name}/unassign", include_in_schema=False)
async def unassign_policy(
    request: Request,
    who: Writer,
    session: SessionDep,
    state: StateDep,
    name: str,
    scope: Annotated[Literal["group", "device"], Form()],
    target: Annotated[str, Form(max_length=128)],
) -> Response:
    """Remove one of this policy's assignments; its devices get their group's policy, or none."""
    row = session.get(PolicyAssignment, (scope, target))
    if row is None or row.policy != name:
        raise NotFound(f"policy {name!r} is not assigned to {scope} {target!r}")
    outcome = await unassign(
        state.desired, state.engine, scope=scope, target=target, actor=who.name,
        now=state.clock(), source=who.source,
    )  # fmt: skip
    session.expire_all()
    return await run_in_threadpool(
        _policy_page, request, who, session, name, outcome=outcome, undone=True
    )
