"""'edgefleet groups': list, create and delete groups; set what every device in one runs."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fleet.cli.connection import Connection, connected
from fleet.cli.desired import ClearOpt, ModelOpt, desired_body, published
from fleet.cli.output import JsonOpt, console, print_json

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, help="Groups of devices.")

GroupArg = Annotated[str, typer.Argument(help="the group")]


@app.command("list")
@connected
def list_groups(connection: Connection, as_json: JsonOpt = False) -> None:
    """Every group, with its device count."""
    with connection.client() as client:
        groups = client.get("/api/v1/groups")
    if as_json:
        print_json(groups)
        return
    table = Table("name", "devices", "description", box=None)
    for g in groups:
        table.add_row(g["name"], str(g["devices"]), g["description"])
    console().print(table)


@app.command("create")
@connected
def create(
    connection: Connection,
    name: Annotated[str, typer.Argument(help="letters, digits, '.', '_' and '-'")],
    description: Annotated[str, typer.Option(help="what the group is")] = "",
) -> None:
    """Create a group."""
    with connection.client() as client:
        client.post("/api/v1/groups", {"name": name, "description": description})
    typer.echo(f"created group {name}")


@app.command("delete")
@connected
def delete(connection: Connection, name: GroupArg) -> None:
    """Delete an empty group."""
    with connection.client() as client:
        client.delete(f"/api/v1/groups/{name}")
    typer.echo(f"deleted group {name}")


@app.command("desired")
@connected
def desired(
    connection: Connection,
    name: GroupArg,
    model: ModelOpt = None,
    clear: ClearOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Set which models every device in a group runs."""
    body = desired_body(model, clear)
    with connection.client() as client:
        result = client.put(f"/api/v1/groups/{name}/desired", body)
    if as_json:
        print_json(result)
        return
    for device in result["devices"]:
        typer.echo(published(device))
    typer.echo(f"{len(result['devices'])} device(s) in {name} updated")
