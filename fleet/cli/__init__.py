"""edgefleet: run the fleet controller and manage devices, groups, models, keys and tokens.

One module per command group; each builds its own typer app and this package mounts
it. A new group (rollouts, say) is a new module here with an 'app', added below.
API commands take the connection options from :mod:`fleet.cli.connection`.
"""

from __future__ import annotations

import typer

from fleet.cli import (
    alerts,
    devices,
    groups,
    images,
    keys,
    models,
    policies,
    rollouts,
    tokens,
    users,
)
from fleet.cli.serve import serve
from fleet.cli.simulate import CONTEXT_SETTINGS, simulate
from fleet.cli.status import status, version

__all__ = ["app", "main"]

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Run the edgefleet fleet controller; manage its devices, groups, models, keys "
    "and enrollment tokens.",
)
app.command()(serve)
app.add_typer(tokens.app, name="tokens")
app.add_typer(devices.app, name="devices")
app.add_typer(groups.app, name="groups")
app.add_typer(models.app, name="models")
app.add_typer(keys.app, name="keys")
app.add_typer(rollouts.app, name="rollouts")
app.add_typer(policies.app, name="policies")
app.add_typer(alerts.app, name="alerts")
app.add_typer(users.app, name="users")
app.add_typer(images.app, name="images")
app.command()(status)
app.command()(version)
app.command(context_settings=CONTEXT_SETTINGS, add_help_option=False)(simulate)


def main() -> None:
    app()
