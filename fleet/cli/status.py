"""'edgefleet status' and 'edgefleet version'."""

from __future__ import annotations

import typer

from fleet.cli.connection import Connection, connected
from fleet.cli.output import JsonOpt, print_json

__all__ = ["status", "version"]


@connected
def status(connection: Connection, as_json: JsonOpt = False) -> None:
    """The controller's versions, database, MQTT link and device counts."""
    with connection.client() as client:
        s = client.get("/api/v1/status")
    if as_json:
        print_json(s)
        return
    link, devices, database = s["link"], s["devices"], s["database"]
    broker = "embedded" if link["embedded_broker"] else "external"
    state = "connected" if link["connected"] else "DISCONNECTED"
    typer.echo(f"edgefleet {s['version']} (wire schema {s['wire_schema_version']})")
    typer.echo(f"broker: {link['broker_url']} ({broker}, {state})")
    typer.echo(
        f"messages: {link['received']} received, {link['stored']} stored, "
        f"{link['duplicates']} duplicates, {link['rejected']} rejected"
    )
    typer.echo(f"database: {database['dialect']} at revision {database['revision']}")
    typer.echo(
        f"devices: {devices['total']} ({devices['online']} online, "
        f"{devices['offline']} offline, {devices['revoked']} revoked)"
    )


def version() -> None:
    """Print the installed edgefleet version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("edgefleet"))
