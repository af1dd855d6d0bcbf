"""The fleet overview: the first page after signing in.

The page is built from fragments, each also served on its own route, so a panel can
refresh itself when the live feed says its data changed (``devices``, ``rollouts``,
``alerts``) without reloading the page. The charts arrive in a second request, so the
page itself answers at once however much telemetry there is.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlmodel import Session

from fleet import alerts
from fleet.api.deps import SessionDep, StateDep
from fleet.dashboard.guard import Viewer
from fleet.dashboard.templating import Pages
from fleet.dashboard.views import fleet
from fleet.rollout.plan import RolloutStatus
from fleet.rollout.views import RolloutSummary, rollout_summaries
from fleet.tables import Alert

__all__ = ["router"]

router = APIRouter(prefix="/ui")

RECENT_ALERTS = 8
CHART_HOURS = 24
CHART_BUCKET_S = 900


def _render(request: Request, who: Any, template: str, **context: Any) -> HTMLResponse:
    pages: Pages = request.app.state.pages
    return pages.render(request, who, template, nav="overview", **context)


def _live_rollouts(session: Session) -> list[RolloutSummary]:
    return rollout_summaries(session, RolloutStatus.ACTIVE.value) + rollout_summaries(
        session, RolloutStatus.PAUSED.value
    )


def _recent_alerts(session: Session) -> list[Alert]:
    return alerts.list_alerts(session, "open", RECENT_ALERTS)


@router.get("/", include_in_schema=False)
def overview(request: Request, who: Viewer, session: SessionDep) -> HTMLResponse:
    return _render(
        request,
        who,
        "overview.html",
        counts=fleet.status_counts(session),
        models=fleet.fleet_models(session),
        rollouts=_live_rollouts(session),
        alerts=_recent_alerts(session),
    )


@router.get("/overview/counts", include_in_schema=False)
def counts(request: Request, who: Viewer, session: SessionDep) -> HTMLResponse:
    return _render(
        request, who, "fragments/overview_counts.html", counts=fleet.status_counts(session)
    )


@router.get("/overview/models", include_in_schema=False)
def models(request: Request, who: Viewer, session: SessionDep) -> HTMLResponse:
    return _render(
        request, who, "fragments/overview_models.html", models=fleet.fleet_models(session)
    )


@router.get("/overview/rollouts", include_in_schema=False)
def rollouts(request: Request, who: Viewer, session: SessionDep) -> HTMLResponse:
    return _render(
        request, who, "fragments/overview_rollouts.html", rollouts=_live_rollouts(session)
    )


@router.get("/overview/alerts", include_in_schema=False)
def recent_alerts(request: Request, who: Viewer, session: SessionDep) -> HTMLResponse:
    return _render(request, who, "fragments/overview_alerts.html", alerts=_recent_alerts(session))


@router.get("/overview/charts", include_in_schema=False)
def charts(request: Request, who: Viewer, session: SessionDep, state: StateDep) -> HTMLResponse:
    specs = fleet.fleet_charts(session, state.clock(), CHART_HOURS, CHART_BUCKET_S)
    return _render(
        request,
        who,
        "fragments/overview_charts.html",
        charts=specs,
        hours=CHART_HOURS,
        bucket_min=CHART_BUCKET_S // 60,
    )
