"""What the commands print: tables, JSON, times, sizes, and each failure as one red line.

Exit statuses: 0 done, 1 the controller (or the data folder) refused or failed, 2 a
usage or configuration problem the operator must fix first.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from fleet.config import FleetSettings
from fleet.errors import ConfigError, FleetError

__all__ = [
    "JsonOpt",
    "console",
    "fail",
    "fleet_errors",
    "print_json",
    "settings_from",
    "size",
    "when",
]

JsonOpt = Annotated[bool, typer.Option("--json", help="print the API's JSON")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def fleet_errors() -> Iterator[None]:
    """A controller error becomes one red line: status 2 for configuration problems, else 1."""
    try:
        yield
    except ConfigError as exc:
        fail(str(exc), code=2)
    except FleetError as exc:
        fail(str(exc))


def settings_from(overrides: dict[str, Any]) -> FleetSettings:
    """Settings from the flags given (None: not given); an invalid one exits with status 2."""
    from pydantic import ValidationError

    try:
        return FleetSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        fail(f"invalid setting {where}: {first['msg']}", code=2)


def console() -> Console:
    """Wide when piped, so ids and URLs are never cut; the terminal's width otherwise."""
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def when(value: str | None) -> str:
    """An API timestamp as 'YYYY-MM-DD HH:MM:SS', or '-'."""
    return "-" if value is None else value.replace("T", " ")[:19]


def size(n: int) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 2.0 MiB, 3.1 GiB."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
