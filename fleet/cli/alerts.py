"""'edgefleet alerts': what the controller raised, the rules that raise it, the webhook.

``list`` and ``ack`` read and acknowledge alerts; ``rules`` shows the rule set and
``rules set`` changes one rule (only the parameters named change, the others keep
what they were); ``webhook`` shows, sets, clears and tests the webhook alerts are
posted to. docs/alerts.md describes every rule and its parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fleet.cli.connection import AdminTokenOpt, Connection, DataDirOpt, UrlOpt, connected
from fleet.cli.output import JsonOpt, console, fail, print_json, when
from fleet.client import DEFAULT_URL
from fleet.config import DEFAULT_DATA_DIR

__all__ = ["app", "parse_params"]

app = typer.Typer(no_args_is_help=True, help="Alerts the controller raised, and their rules.")
rules_app = typer.Typer(help="The alert rules (with no command: list them).")
webhook_app = typer.Typer(help="The webhook alerts are posted to (with no command: show it).")
app.add_typer(rules_app, name="rules")
app.add_typer(webhook_app, name="webhook")


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``["minutes=30", "gate_failures=false"]`` as ``{"minutes": 30, ...}``.

    A value that reads as JSON (a number, true, false) is that; any other is text, and
    the controller says which parameter it refuses.
    """
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--param")
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    return params


def _own(
    ctx: typer.Context, url: str, admin_token: str | None, data_dir: Path
) -> Connection | None:
    """A group's connection when it runs alone; None before one of its commands.

    A group's callback also runs before its commands; typer gives one function one
    context, which :func:`connected` takes, so the groups declare its options here.
    """
    if ctx.invoked_subcommand is not None:
        return None
    http = ctx.obj.get("http") if isinstance(ctx.obj, dict) else None
    return Connection(url=url, admin_token=admin_token, data_dir=data_dir, http=http)


@app.command("list")
@connected
def list_alerts(
    connection: Connection,
    show_all: Annotated[
        bool, typer.Option("--all", help="cleared alerts too, not only the open ones")
    ] = False,
    kind: Annotated[str | None, typer.Option(help="only this kind, e.g. device_offline")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Open alerts, newest first (with --all, cleared ones too)."""
    with connection.client() as client:
        body = client.alerts(state="all" if show_all else "open", kind=kind, limit=limit)
    if as_json:
        print_json(body)
        return
    out = console()
    if not body["items"]:
        out.print("no open alerts" if not show_all else "no alerts")
        return
    columns = ["id", "severity", "kind", "subject", "raised", "ack", "message"]
    if show_all:
        columns.insert(1, "state")
        columns.insert(6, "cleared")
    table = Table(*columns, box=None)
    for a in body["items"]:
        acked = a["acknowledged_by"] or "-"
        row = [str(a["id"]), a["severity"], a["kind"], a["subject"], when(a["raised_at"])]
        row += [acked, a["message"]]
        if show_all:
            row.insert(1, a["state"])
            row.insert(6, when(a["cleared_at"]))
        table.add_row(*row)
    out.print(table)


@app.command("ack")
@connected
def acknowledge(
    connection: Connection,
    alert_id: Annotated[int, typer.Argument(help="the alert's id (alerts list)")],
    as_json: JsonOpt = False,
) -> None:
    """Acknowledge an alert: an event (rollout_failed) clears, a condition stays open."""
    with connection.client() as client:
        body = client.acknowledge_alert(alert_id)
    if as_json:
        print_json(body)
        return
    then = "cleared" if body["state"] == "cleared" else "stays open while its condition holds"
    console().print(
        f"acknowledged alert {body['id']} ({body['kind']} {body['subject']}) as "
        f"{body['acknowledged_by']}: {then}"
    )


def _params_text(rule: dict[str, Any]) -> str:
    overrides = rule["overrides"]
    return " ".join(
        f"{k}={json.dumps(v)}{'*' if k in overrides else ''}" for k, v in rule["params"].items()
    )


def _rules_table(items: list[dict[str, Any]]) -> Table:
    table = Table("kind", "enabled", "params (* set by an admin)", "updated", "by", box=None)
    for rule in items:
        table.add_row(
            rule["kind"] + (" (event)" if rule["event"] else ""),
            "yes" if rule["enabled"] else "no",
            _params_text(rule),
            when(rule["updated_at"]),
            rule["updated_by"] or "-",
        )
    return table


@rules_app.callback(invoke_without_command=True)
def rules(
    ctx: typer.Context,
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """The alert rules: enabled or not, their parameters (* set by an admin)."""
    connection = _own(ctx, url, admin_token, data_dir)
    if connection is None:
        return
    with connection.client() as client:
        body = client.alert_rules()
    if as_json:
        print_json(body)
        return
    console().print(_rules_table(body["items"]))


@rules_app.command("set")
@connected
def set_rule(
    connection: Connection,
    kind: Annotated[str, typer.Argument(help="the rule, e.g. device_offline")],
    enabled: Annotated[
        bool | None, typer.Option("--enable/--disable", help="default: as it is")
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="KEY=VALUE, repeatable, e.g. minutes=30"),
    ] = None,
    reset: Annotated[
        bool, typer.Option("--reset", help="drop the parameters set before: defaults again")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Enable, disable or tune one rule; parameters not named keep what they were."""
    changes = parse_params(param or [])
    with connection.client() as client:
        current = next((r for r in client.alert_rules()["items"] if r["kind"] == kind), None)
        if current is None:
            known = ", ".join(r["kind"] for r in client.alert_rules()["items"])
            fail(f"no alert rule {kind!r} (the rules: {known})")
        overrides = {} if reset else dict(current["overrides"])
        overrides.update(changes)
        on = current["enabled"] if enabled is None else enabled
        body = client.set_alert_rule(kind, enabled=on, params=overrides)
    if as_json:
        print_json(body)
        return
    console().print(_rules_table([body]))


def _show_webhook(body: dict[str, Any]) -> None:
    out = console()
    out.print(f"url: {body['url']}")
    out.print(f"signed: {'yes' if body['secret_set'] else 'no'}")
    out.print(f"set by {body['updated_by']} at {when(body['updated_at'])}")
    if body["pending"]:
        out.print(
            f"owed: {body['pending']} alert change(s), the oldest since "
            f"{when(body['oldest_pending_at'])}, tried {body['attempts']} time(s)"
            + (f"; last error: {body['last_error']}" if body["last_error"] else "")
        )
    else:
        out.print("owed: nothing, every alert change was delivered")


@webhook_app.callback(invoke_without_command=True)
def webhook(
    ctx: typer.Context,
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """The webhook alert changes are posted to, and what it is still owed."""
    connection = _own(ctx, url, admin_token, data_dir)
    if connection is None:
        return
    with connection.client() as client:
        body = client.alert_webhook()
    if as_json:
        print_json(body)
        return
    _show_webhook(body)


@webhook_app.command("set")
@connected
def set_webhook(
    connection: Connection,
    hook_url: Annotated[
        str, typer.Argument(metavar="URL", help="http:// or https:// URL that takes a POST")
    ],
    secret: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_WEBHOOK_SECRET",
            help="HMAC-SHA256 key for X-Edgefleet-Signature (16 to 256 characters)",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Post every alert raised, cleared or acknowledged to URL (signed with --secret)."""
    with connection.client() as client:
        body = client.set_alert_webhook(hook_url, secret=secret)
    if as_json:
        print_json(body)
        return
    signed = " (signed)" if body["secret_set"] else ""
    console().print(f"alerts are posted to {body['url']}{signed}")


@webhook_app.command("clear")
@connected
def clear_webhook(connection: Connection, as_json: JsonOpt = False) -> None:
    """Stop posting alerts; what was not delivered yet is dropped."""
    with connection.client() as client:
        body = client.delete_alert_webhook()
    if as_json:
        print_json(body)
        return
    console().print(f"webhook removed; {body['dropped']} undelivered alert change(s) dropped")


@webhook_app.command("test")
@connected
def try_webhook(connection: Connection, as_json: JsonOpt = False) -> None:
    """Post a test alert now; exit status 1 when the webhook did not take it."""
    with connection.client() as client:
        body = client.test_alert_webhook()
    if as_json:
        print_json(body)
    elif body["delivered"]:
        console().print(f"delivered (HTTP {body['status']})")
    if not body["delivered"]:
        fail(f"not delivered: {body['error']}")
