"""Rendering pages: one Jinja2 environment per app, the same context on every page.

Every page gets ``who`` (the signed-in principal), ``csrf_token`` (forms put it in a
hidden field with ``{{ csrf_field() }}``; htmx sends it as a header from ``<body>``),
``can(role)`` to hide what the role may not do (the server refuses it anyway), and
``nav``, the active section. Autoescaping is on for every template.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from fleet.auth import Principal, Role, allows

__all__ = ["TEMPLATES_DIR", "Pages", "ago", "when"]

TEMPLATES_DIR = Path(__file__).parent / "templates"


def when(value: datetime | str | None) -> str:
    """A timestamp as 'YYYY-MM-DD HH:MM:SS' UTC, or '-'."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value.replace("T", " ")[:19]
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """How long ago, for people: '12 s ago', '5 min ago', '3 h ago', '2 d ago'."""
    if value is None:
        return "never"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    seconds = max(0.0, ((now or datetime.now(UTC)) - value).total_seconds())
    for unit, size in (("d", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


class Pages:
    """The dashboard's templates; built once per app in :func:`fleet.dashboard.install`."""

    def __init__(self, directory: Path = TEMPLATES_DIR) -> None:
        self.env = Environment(
            loader=FileSystemLoader(directory),
            autoescape=select_autoescape(default=True, default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = when
        self.env.filters["ago"] = ago
        self.env.filters["tojson_attr"] = lambda v: json.dumps(v, separators=(",", ":"))

    def render(
        self,
        request: Request,
        who: Principal | None,
        template: str,
        *,
        status_code: int = 200,
        nav: str = "",
        **context: Any,
    ) -> HTMLResponse:
        csrf = who.csrf_token if who is not None else None

        def can(role: str) -> bool:
            return who is not None and allows(who.role, Role(role))

        def csrf_field() -> Markup:
            return Markup('<input type="hidden" name="csrf_token" value="{}">').format(csrf or "")

        html = self.env.get_template(template).render(
            request=request,
            who=who,
            csrf_token=csrf or "",
            csrf_field=csrf_field,
            can=can,
            nav=nav,
            **context,
        )
        return HTMLResponse(html, status_code=status_code)
