"""The models section: the registry's models, their versions and variants, and who runs them.

Reads only: the registry (:mod:`fleet.api.models`), the TUF repository's status and
targets (is each artifact signed?), and the devices' reports counted in SQL. A model
that devices report but the registry never held (one bundled with the agent) still
has a page, saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlmodel import Session

from fleet import alerts
from fleet.alerts.params import TufExpiryParams
from fleet.api.deps import FleetState, SessionDep, StateDep
from fleet.api.models import artifact_public, list_models
from fleet.auth import Principal
from fleet.dashboard.guard import Viewer
from fleet.dashboard.templating import Pages
from fleet.dashboard.views import models as views
from fleet.dashboard.views.fleet import FleetModel, fleet_models
from fleet.errors import FleetError, NotFound
from fleet.registry.registration import by_version, rows_of
from models.values import MODEL_NAME

__all__ = ["router"]

router = APIRouter(prefix="/ui")


def _render(request: Request, who: Principal, template: str, **context: Any) -> HTMLResponse:
    pages: Pages = request.app.state.pages
    return pages.render(request, who, template, nav="models", **context)


def _tuf(state: FleetState, session: Session) -> dict[str, Any]:
    """The repository's roles, or why they cannot be read (the page still shows the rest)."""
    tuf = state.tuf
    rule = alerts.load_rules(session, alerts.defaults_of(state.settings))[
        alerts.RuleKind.TUF_EXPIRY
    ]
    params = rule.params
    assert isinstance(params, TufExpiryParams)
    try:
        return {
            "roles": views.role_views(tuf.status(), state.clock(), params.days),
            "staged_targets": tuf.staged_targets_version(),
            "staged_root": tuf.staged_root_version(),
            "tuf_error": None,
        }
    except FleetError as exc:
        return {"roles": [], "staged_targets": None, "staged_root": None, "tuf_error": str(exc)}


def _nowhere(_path: str) -> bool:
    return False


@router.get("/models", include_in_schema=False)
def model_list(request: Request, who: Viewer, session: SessionDep, state: StateDep) -> HTMLResponse:
    running: dict[str, int] = {}
    for m in fleet_models(session):
        running[m.name] = running.get(m.name, 0) + m.devices
    summaries = list_models(session)
    registered = {s.name for s in summaries}
    return _render(
        request,
        who,
        "models.html",
        models=summaries,
        running=running,
        unregistered=sorted((n, c) for n, c in running.items() if n not in registered),
        **_tuf(state, session),
    )


@router.get("/models/{name}", include_in_schema=False)
def model_page(
    request: Request, who: Viewer, session: SessionDep, state: StateDep, name: str
) -> HTMLResponse:
    if not MODEL_NAME.match(name):
        raise NotFound(f"no model {name!r}")
    running = fleet_models(session, name)
    try:
        rows = rows_of(session, name)
    except NotFound:
        if not running:
            raise
        rows = []
    public_url = state.settings.resolved_public_url
    groups = [
        [artifact_public(r, public_url) for r in sorted(g, key=lambda r: r.variant)]
        for g in by_version(rows)
    ]
    tuf = state.tuf
    staged: Callable[[str], bool] = tuf.has_target
    try:
        published = {path: t.hashes.get("sha256", "") for path, t in tuf.targets().items()}
        tuf_error = None
    except FleetError as exc:  # no signatures to show; the registry's rows still are
        published, tuf_error = {}, str(exc)
        staged = _nowhere
    versions = views.version_views(groups, published, staged, running)
    known = {v.version for v in versions}
    others: list[FleetModel] = [m for m in running if m.version not in known]
    return _render(
        request,
        who,
        "model.html",
        name=name,
        versions=versions,
        others=others,
        devices=sum(m.devices for m in running),
        tuf_error=tuf_error,
    )
