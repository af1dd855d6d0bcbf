"""'edgefleet tokens': create (one, or a batch into a CSV file), list and revoke tokens.

A batch for flashing many devices is one API call and one file: ``--count 100 --out
tokens.csv`` writes ``index,token_id,secret,group,expires_at`` (index from 1), owner-only,
and never replaces a file unless ``--force``, so a second run cannot silently discard
secrets already handed to a flashing station. Without ``--out`` the CSV goes to stdout.
``edgefleet-agent provision --tokens FILE --index N`` reads the file.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fleet.cli.connection import Connection, connected
from fleet.cli.output import JsonOpt, console, fail, print_json, when

__all__ = ["CSV_HEADER", "app", "tokens_csv"]

app = typer.Typer(no_args_is_help=True, help="Enrollment tokens: create, list, revoke.")


def _expires_in_s(text: str) -> float | None:
    from fleet.tokens import parse_duration

    try:
        duration = parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expires") from None
    return None if duration is None else duration.total_seconds()


CSV_HEADER = ("index", "token_id", "secret", "group", "expires_at")


def tokens_csv(batch: dict[str, Any]) -> str:
    """The batch as provisioning reads it: one row per token, numbered from 1."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for index, token in enumerate(batch["tokens"], start=1):
        writer.writerow(
            (index, token["id"], token["secret"], token["group"] or "", token["expires_at"] or "")
        )
    return out.getvalue()


def _check_out(out: Path, force: bool) -> None:
    """Refuse before any token is made: a file in the way, or no folder to write into."""
    if out.exists() and not force:
        fail(f"{out} exists: pass --force to replace it, or choose another --out", code=2)
    if not out.parent.is_dir():
        fail(f"no folder {out.parent} to write {out.name} into", code=2)


def _write_out(out: Path, text: str, force: bool, count: int) -> None:
    from fleet.files import atomic_write

    try:
        atomic_write(out, text.encode(), exclusive=not force)  # 0600: it holds secrets
    except FileExistsError:
        fail(
            f"{out} appeared while the tokens were made; the {count} new tokens' secrets "
            "are lost: revoke them (edgefleet tokens list) and try again"
        )
    except OSError as exc:
        fail(f"cannot write {out}: {exc}; the {count} new tokens' secrets are lost")


@app.command("create")
@connected
def create(
    connection: Connection,
    group: Annotated[str | None, typer.Option(help="put enrolled devices in this group")] = None,
    uses: Annotated[int, typer.Option(min=1, help="how many devices may enroll with each")] = 1,
    expires: Annotated[str, typer.Option(help="30m, 24h, 7d ... or never")] = "24h",
    note: Annotated[str, typer.Option(help="a reminder of what it is for")] = "",
    count: Annotated[
        int, typer.Option(min=1, max=10_000, help="how many tokens: one per device to flash")
    ] = 1,
    out: Annotated[
        Path | None,
        typer.Option(help="write the tokens as CSV here (mode 0600), for provisioning"),
    ] = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out file")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create enrollment tokens; secrets are printed (or written to --out) once, never again."""
    body = {"group": group, "uses": uses, "expires_in_s": _expires_in_s(expires), "note": note}
    if count == 1 and out is None:
        _create_one(connection, body, as_json)
        return
    if out is not None:
        _check_out(out, force)
    with connection.client() as client:
        batch = client.post("/api/v1/tokens/batch", {**body, "count": count})
    if out is not None:
        _write_out(out, tokens_csv(batch), force, count)
    if as_json:
        print_json(batch)
    elif out is None:
        typer.echo(tokens_csv(batch), nl=False)
    _summary(batch, uses, out)


def _summary(batch: dict[str, Any], uses: int, out: Path | None) -> None:
    """One line on stderr, so stdout stays the CSV (or the JSON) a script reads."""
    tokens = batch["tokens"]
    first = tokens[0]
    expiry = when(first["expires_at"]) if first["expires_at"] else "never"
    each = f"{uses} use" + ("s" if uses != 1 else "") + " each"
    where = f" into {out} (mode 0600)" if out is not None else ""
    typer.echo(
        f"created {len(tokens)} tokens (group {first['group'] or '-'}, {each}, "
        f"expire {expiry}){where}",
        err=True,
    )
    if out is not None:
        typer.echo(
            f"provision a device with: edgefleet-agent provision TARGET --fleet "
            f"{batch['fleet_url']} --tokens {out} --index N",
            err=True,
        )


def _create_one(connection: Connection, body: dict[str, Any], as_json: bool) -> None:
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
