"""The fleet overview: the first page after signing in.

The page is built from fragments, each also served on its own route, so a panel can
refresh itself when the live feed says its data changed (``devices``, ``rollouts``,
``alerts``) without reloading the page. The model versions (a scan of every device's
report) and the charts (a day of the fleet's telemetry) arrive in requests of their own,
so the page itself answers first.
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


def _settled(request: Request) -> fleet.SettledBuckets:
    """The app's one copy of settled chart buckets, made on first use."""
    settled: fleet.SettledBuckets | None = getattr(request.app.state, "fleet_chart_buckets", None)
    if settled is None:
        settled = request.app.state.fleet_chart_buckets = fleet.SettledBuckets()
    return settled


@router.get("/", include_in_schema=False)
def overview(request: Request, who: Viewer, session: SessionDep) -> HTMLResponse:
    return _render(
        request,
        who,
        "overview.html",
        counts=fleet.status_counts(session),
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
    specs = fleet.fleet_charts(
        session, state.clock(), CHART_HOURS, CHART_BUCKET_S, _settled(request)
    )
    return _render(
        request,
        who,
        "fragments/overview_charts.html",
        charts=specs,
        hours=CHART_HOURS,
        bucket_min=CHART_BUCKET_S // 60,
    )
