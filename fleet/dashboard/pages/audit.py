"""The audit log: who did what, when, from where and why; filtered and paged, read-only.

There is deliberately no write route here (nor in the API): entries are written only
by the services whose actions they record, in the same transaction as the action.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from fleet.api.deps import SessionDep
from fleet.dashboard.guard import Viewer
from fleet.dashboard.templating import Pages
from fleet.dashboard.views.audit import AuditFilter, audit_page, subject_link

__all__ = ["router"]

router = APIRouter(prefix="/ui")
PER_PAGE = 50


@router.get("/audit", include_in_schema=False)
def audit(
    request: Request,
    who: Viewer,
    session: SessionDep,
    actor: Annotated[str, Query(max_length=64)] = "",
    action: Annotated[str, Query(max_length=48)] = "",
    subject: Annotated[str, Query(max_length=160)] = "",
    before: Annotated[int | None, Query(ge=1)] = None,
    after: Annotated[int | None, Query(ge=0)] = None,
) -> HTMLResponse:
    wanted = AuditFilter(actor.strip(), action.strip(), subject.strip())
    page = audit_page(session, wanted, before=before, after=after, limit=PER_PAGE)
    kept = {k: v for k, v in vars(wanted).items() if v}

    def link(**key: int) -> str:
        return "/ui/audit?" + urlencode({**kept, **key})

    pages: Pages = request.app.state.pages
    return pages.render(
        request,
        who,
        "audit.html",
        nav="audit",
        page=page,
        wanted=wanted,
        older=link(before=page.older) if page.older is not None else None,
        newer=link(after=page.newer) if page.newer is not None else None,
        subject_link=subject_link,
    )
