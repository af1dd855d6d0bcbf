"""The options every API command takes (--url, --token, --data-dir), declared once.

A command decorated with :func:`connected` gets those options appended to its own and
is called with a :class:`Connection` as its first argument, so no command repeats them
and a new command group (``edgefleet rollouts ...``) gets them by the same decorator.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Concatenate, ParamSpec, cast

import httpx
import typer

from fleet.cli.output import fail
from fleet.client import DEFAULT_URL, ClientError, FleetClient, read_admin_token
from fleet.config import DEFAULT_DATA_DIR

__all__ = ["Connection", "DataDirOpt", "connected"]

P = ParamSpec("P")

UrlOpt = Annotated[
    str,
    typer.Option("--url", envvar="EDGEFLEET_URL", help="the controller's API"),
]
AdminTokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        "--admin-token",
        envvar=["EDGEFLEET_TOKEN", "EDGEFLEET_ADMIN_TOKEN", "EDGEFLEET_FLEET_ADMIN_TOKEN"],
        help="your API token (edgefleet users token create), or the controller's admin "
        "token (default: read <data-dir>/admin-token)",
        show_default=False,
    ),
]
DataDirOpt = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="EDGEFLEET_FLEET_DATA_DIR",
        help="the controller's data folder (holds the admin token)",
    ),
]


@dataclass(frozen=True)
class Connection:
    """Which controller to talk to, and with which admin token."""

    url: str
    admin_token: str | None  # None: read the one in data_dir
    data_dir: Path
    http: httpx.Client | None = None  # tests hand in an in-process app's client

    @contextmanager
    def client(self) -> Iterator[FleetClient]:
        """A client of the controller; an API failure becomes one red line and exit status 1."""
        token = self.admin_token or read_admin_token(self.data_dir)
        try:
            with FleetClient(self.url, token, http=self.http) as client:
                yield client
        except ClientError as exc:
            fail(str(exc))


_KEYWORD = inspect.Parameter.KEYWORD_ONLY
_CONTEXT = inspect.Parameter("ctx", _KEYWORD, annotation=typer.Context)
_OPTIONS = [
    inspect.Parameter("url", _KEYWORD, default=DEFAULT_URL, annotation=UrlOpt),
    inspect.Parameter("admin_token", _KEYWORD, default=None, annotation=AdminTokenOpt),
    inspect.Parameter("data_dir", _KEYWORD, default=DEFAULT_DATA_DIR, annotation=DataDirOpt),
]


def connected(command: Callable[Concatenate[Connection, P], None]) -> Callable[..., None]:
    """Give ``command`` the connection options; it is called with a :class:`Connection` first.

    typer reads a command's parameters from its signature, so the wrapper shows typer the
    command's own parameters (less the connection) followed by the shared options.
    """
    own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]
    parameters = [_CONTEXT, *(p.replace(kind=_KEYWORD) for p in own), *_OPTIONS]

    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        ctx: typer.Context = kwargs.pop("ctx")
        http = ctx.obj.get("http") if isinstance(ctx.obj, dict) else None
        connection = Connection(
            url=kwargs.pop("url"),
            admin_token=kwargs.pop("admin_token"),
            data_dir=kwargs.pop("data_dir"),
            http=http,
        )
        cast(Callable[..., None], command)(connection, **kwargs)

    run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in parameters}
    return run
