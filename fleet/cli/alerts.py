"""'edgefleet alerts': what the controller raised for admins to see (degraded groups, so far)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fleet.cli.connection import Connection, connected
from fleet.cli.output import JsonOpt, console, print_json, when

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, help="Alerts the controller raised.")


@app.command("list")
@connected
def list_alerts(
    connection: Connection,
    show_all: Annotated[
        bool, typer.Option("--all", help="cleared alerts too, not only the open ones")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Open alerts, newest first (with --all, cleared ones too)."""
    with connection.client() as client:
        body = client.get("/api/v1/alerts", state="all" if show_all else "open", limit=limit)
    if as_json:
        print_json(body)
        return
    out = console()
    if not body["items"]:
        out.print("no open alerts" if not show_all else "no alerts")
        return
    columns = ["id", "severity", "subject", "raised", "message"]
    if show_all:
        columns.insert(1, "state")
        columns.insert(5, "cleared")
    table = Table(*columns, box=None)
    for a in body["items"]:
        row = [str(a["id"]), a["severity"], a["subject"], when(a["raised_at"]), a["message"]]
        if show_all:
            row.insert(1, a["state"])
            row.insert(5, when(a["cleared_at"]))
        table.add_row(*row)
    out.print(table)
