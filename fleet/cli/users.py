"""'edgefleet users': people who use the dashboard, the API and the CLI, and their tokens.

The first admin is made with the controller's admin token (read from the data folder
on the controller's host): ``edgefleet users create alice --admin``.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from fleet.cli.connection import Connection, connected
from fleet.cli.output import JsonOpt, console, fail, print_json, when

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, help="Users and their API tokens.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens for the CLI and scripts.")
app.add_typer(token_app, name="token")

ROLES = ("viewer", "operator", "admin")
PasswordStdinOpt = Annotated[
    bool, typer.Option("--password-stdin", help="read the password from standard input")
]


def _password(from_stdin: bool, prompt: str = "password") -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            fail("no password on standard input")
        return password
    text: str = typer.prompt(prompt, hide_input=True, confirmation_prompt=True)
    return text


def _role(role: str | None, admin: bool) -> str:
    if admin:
        if role not in (None, "admin"):
            fail("--admin and --role disagree: give one of them")
        return "admin"
    if role is not None and role not in ROLES:
        raise typer.BadParameter(f"choose one of {', '.join(ROLES)}", param_hint="--role")
    return role or "viewer"


def _show(user: dict[str, object]) -> str:
    state = " (disabled)" if user["disabled"] else ""
    return f"{user['name']}: {user['role']}{state}"


@app.command("create")
@connected
def create(
    connection: Connection,
    name: Annotated[str, typer.Argument(help="lower-case letters, digits, . _ @ -")],
    admin: Annotated[bool, typer.Option("--admin", help="make an admin")] = False,
    role: Annotated[str | None, typer.Option(help="viewer (default), operator or admin")] = None,
    password_stdin: PasswordStdinOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a user; asks for the password (at least 12 characters) twice."""
    body = {"name": name, "role": _role(role, admin), "password": _password(password_stdin)}
    with connection.client() as client:
        user = client.post("/api/v1/users", body)
    if as_json:
        print_json(user)
        return
    typer.echo(f"created {_show(user)}; sign in at {connection.url.rstrip('/')}/ui/")


@app.command("list")
@connected
def list_users(connection: Connection, as_json: JsonOpt = False) -> None:
    """Every user, with their role."""
    with connection.client() as client:
        users = client.get("/api/v1/users")
    if as_json:
        print_json(users)
        return
    table = Table("name", "role", "state", "created", "by", box=None)
    for u in users:
        state = "disabled" if u["disabled"] else "active"
        table.add_row(u["name"], u["role"], state, when(u["created_at"]), u["created_by"])
    console().print(table)


@app.command("set")
@connected
def set_user(
    connection: Connection,
    name: str,
    role: Annotated[str | None, typer.Option(help="viewer, operator or admin")] = None,
    password: Annotated[bool, typer.Option("--password", help="set a new password")] = False,
    password_stdin: PasswordStdinOpt = False,
    disable: Annotated[
        bool | None, typer.Option("--disable/--enable", help="stop or allow signing in")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a user's role, password or state; their browser sessions end."""
    body: dict[str, object] = {}
    if role is not None:
        body["role"] = _role(role, admin=False)
    if password or password_stdin:
        body["password"] = _password(password_stdin, f"new password for {name}")
    if disable is not None:
        body["disabled"] = disable
    if not body:
        fail("nothing to change: give --role, --password or --disable/--enable")
    with connection.client() as client:
        user = client.patch(f"/api/v1/users/{name}", body)
    if as_json:
        print_json(user)
        return
    typer.echo(f"updated {_show(user)}")


@token_app.command("create")
@connected
def token_create(
    connection: Connection,
    name: Annotated[str, typer.Option(help="what it is for: laptop, ci ...")],
    user: Annotated[str | None, typer.Option(help="admins: for this user")] = None,
    expires: Annotated[str, typer.Option(help="30d, 12w ... or never")] = "90d",
    as_json: JsonOpt = False,
) -> None:
    """Create an API token; its secret is printed once."""
    from fleet.tokens import parse_duration

    try:
        duration = parse_duration(expires)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expires") from None
    body = {
        "name": name,
        "user": user,
        "expires_in_s": None if duration is None else duration.total_seconds(),
    }
    with connection.client() as client:
        token = client.post("/api/v1/api-tokens", body)
    if as_json:
        print_json(token)
        return
    expiry = when(token["expires_at"]) if token["expires_at"] else "never"
    typer.echo(f"created token {token['id']} for {token['user']} (expires {expiry})")
    typer.echo(f"secret (shown only now): {token['secret']}")
    typer.echo("use it with:  export EDGEFLEET_TOKEN=<secret>")


@token_app.command("list")
@connected
def token_list(
    connection: Connection,
    everyone: Annotated[bool, typer.Option("--all", help="admins: everyone's")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Your API tokens (never their secrets)."""
    with connection.client() as client:
        tokens = client.get("/api/v1/api-tokens", all=everyone)
    if as_json:
        print_json(tokens)
        return
    table = Table("id", "user", "name", "state", "expires", "last used", box=None)
    for t in tokens:
        table.add_row(
            str(t["id"]),
            t["user"],
            t["name"],
            "revoked" if t["revoked"] else "active",
            when(t["expires_at"]) if t["expires_at"] else "never",
            when(t["last_used_at"]) if t["last_used_at"] else "never",
        )
    console().print(table)


@token_app.command("revoke")
@connected
def token_revoke(connection: Connection, token_id: int, as_json: JsonOpt = False) -> None:
    """Revoke an API token at once."""
    with connection.client() as client:
        token = client.delete(f"/api/v1/api-tokens/{token_id}")
    if as_json:
        print_json(token)
        return
    typer.echo(f"revoked token {token['id']} ({token['name']}) of {token['user']}")
