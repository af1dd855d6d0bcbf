"""``edgefleet``: the fleet controller's command line."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.command()
def version() -> None:
    """Print the installed edgefleet version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("edgefleet"))


@app.command()
def serve() -> None:
    """Run the fleet controller (not built yet: see the fleet-link issue)."""
    typer.secho("the fleet controller is not implemented yet", fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(1)


def main() -> None:
    app()
