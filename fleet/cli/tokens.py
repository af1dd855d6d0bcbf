"""'edgefleet tokens': create, list and revoke enrollment tokens."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fleet.cli.connection import Connection, connected
from fleet.cli.output import JsonOpt, console, print_json, when

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, help="Enrollment tokens: create, list, revoke.")


def _expires_in_s(text: str) -> float | None:
    from fleet.tokens import parse_duration

    try:
        duration = parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expires") from None
    return None if duration is None else duration.total_seconds()


@app.command("create")
@connected
def create(
    connection: Connection,
    group: Annotated[str | None, typer.Option(help="put enrolled devices in this group")] = None,
    uses: Annotated[int, typer.Option(min=1, help="how many devices may enroll with it")] = 1,
    expires: Annotated[str, typer.Option(help="30m, 24h, 7d ... or never")] = "24h",
    note: Annotated[str, typer.Option(help="a reminder of what it is for")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Create an enrollment token; its secret is printed once, with the agent command."""
    body = {"group": group, "uses": uses, "expires_in_s": _expires_in_s(expires), "note": note}
    with connection.client() as client:
        token = client.post("/api/v1/tokens", body)
    if as_json:
        print_json(token)
        return
    uses_text = f"{token['uses_total']} use" + ("s" if token["uses_total"] != 1 else "")
    expiry = when(token["expires_at"]) if token["expires_at"] else "never"
    typer.echo(
        f"created {token['id']} (group {token['group'] or '-'}, {uses_text}, expires {expiry})"
    )
    typer.echo(f"secret (shown only now): {token['secret']}")
    typer.echo("enroll a device with:")
    typer.echo(f"  edgefleet-agent serve --fleet {token['fleet_url']} --token {token['secret']}")


@app.command("list")
@connected
def list_tokens(connection: Connection, as_json: JsonOpt = False) -> None:
    """Every enrollment token, newest first (secrets are never shown again)."""
    with connection.client() as client:
        tokens = client.get("/api/v1/tokens")
    if as_json:
        print_json(tokens)
        return
    table = Table("id", "state", "group", "uses left", "expires", "note", box=None)
    for t in tokens:
        table.add_row(
            t["id"],
            t["state"],
            t["group"] or "-",
            f"{t['uses_left']}/{t['uses_total']}",
            when(t["expires_at"]) if t["expires_at"] else "never",
            t["note"],
        )
    console().print(table)


@app.command("revoke")
@connected
def revoke(
    connection: Connection,
    token_id: Annotated[str, typer.Argument(help="the token's id (tok-...)")],
) -> None:
    """Revoke a token: no further device can enroll with it."""
    with connection.client() as client:
        client.delete(f"/api/v1/tokens/{token_id}")
    typer.echo(f"revoked {token_id}")
