"""'edgefleet simulate': hands its arguments to the simulator's own command, loaded lazily.

The simulator pulls in aiomqtt; the controller's other commands should not pay for it,
and an installation without it still runs them.
"""

from __future__ import annotations

import typer

from fleet.cli.output import fail

__all__ = ["CONTEXT_SETTINGS", "simulate"]

# Every argument, --help included, goes to the simulator's command untouched.
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def simulate(ctx: typer.Context) -> None:
    """Simulate a fleet of devices against a controller (see 'edgefleet simulate --help')."""
    try:
        from fleet.simulate.cli import simulate as command
    except ImportError as exc:
        fail(f"the fleet simulator is not available in this installation: {exc}", code=2)
    sub = typer.Typer(add_completion=False)
    sub.command()(command)
    result = typer.main.get_command(sub).main(
        args=list(ctx.args), prog_name="edgefleet simulate", standalone_mode=False
    )
    if isinstance(result, int) and result:
        raise typer.Exit(result)
