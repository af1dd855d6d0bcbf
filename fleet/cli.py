"""``edgefleet``: run the fleet controller and manage devices, groups and enrollment tokens."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from fleet.client import DEFAULT_URL, ClientError, FleetClient, read_admin_token
from fleet.config import DEFAULT_DATA_DIR, FleetSettings

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
tokens_app = typer.Typer(no_args_is_help=True, help="Enrollment tokens: create, list, revoke.")
devices_app = typer.Typer(no_args_is_help=True, help="Enrolled devices.")
groups_app = typer.Typer(no_args_is_help=True, help="Groups of devices.")
models_app = typer.Typer(no_args_is_help=True, help="The model registry: push, list, show, yank.")
keys_app = typer.Typer(
    no_args_is_help=True,
    help="TUF signing keys: init, rotate, status (on the data folder); sign (anywhere); "
    "staged and import (through the API) for keys kept offline.",
)
app.add_typer(tokens_app, name="tokens")
app.add_typer(devices_app, name="devices")
app.add_typer(groups_app, name="groups")
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")

UrlOpt = Annotated[
    str,
    typer.Option("--url", envvar="EDGEFLEET_URL", help="the controller's API"),
]
AdminTokenOpt = Annotated[
    str | None,
    typer.Option(
        "--admin-token",
        envvar=["EDGEFLEET_ADMIN_TOKEN", "EDGEFLEET_FLEET_ADMIN_TOKEN"],
        help="admin token (default: read <data-dir>/admin-token)",
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
JsonOpt = Annotated[bool, typer.Option("--json", help="print the API's JSON")]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _console() -> Console:
    # Wide when piped, so ids and URLs are never cut; the terminal's width otherwise.
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


@contextmanager
def _client(
    ctx: typer.Context, url: str, admin_token: str | None, data_dir: Path
) -> Iterator[FleetClient]:
    """A client for ``url``; an API failure becomes one red line and exit status 1.

    Tests put a ready ``httpx.Client`` in ``ctx.obj["http"]`` (an in-process app).
    """
    token = admin_token or read_admin_token(data_dir)
    http = ctx.obj.get("http") if isinstance(ctx.obj, dict) else None
    try:
        with FleetClient(url, token, http=http) as client:
            yield client
    except ClientError as exc:
        _fail(str(exc))


# --- serve ----------------------------------------------------------------------------------


def _settings(overrides: dict[str, Any]) -> FleetSettings:
    from pydantic import ValidationError

    try:
        return FleetSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        _fail(f"invalid setting {where}: {first['msg']}", code=2)


@app.command()
def serve(
    data_dir: Annotated[
        Path | None, typer.Option(help="SQLite file, admin token, broker auth files")
    ] = None,
    db: Annotated[
        str | None,
        typer.Option("--db", help="database URL (default sqlite:///<data-dir>/fleet.db)"),
    ] = None,
    host: Annotated[str | None, typer.Option(help="address to bind (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="API port (default 8000)")] = None,
    public_url: Annotated[
        str | None, typer.Option(help="how devices reach this API (default http://host:port)")
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(help="external MQTT broker, mqtt://host:port (default: embedded broker)"),
    ] = None,
    broker_public_url: Annotated[
        str | None, typer.Option(help="the broker URL devices are told (default: --broker)")
    ] = None,
    broker_host: Annotated[
        str | None, typer.Option(help="embedded broker's address (default 127.0.0.1)")
    ] = None,
    broker_port: Annotated[
        int | None, typer.Option(help="embedded broker's port (default 1883)")
    ] = None,
    broker_auth_dir: Annotated[
        Path | None, typer.Option(help="where to write the broker's password and ACL files")
    ] = None,
    broker_pid_file: Annotated[
        Path | None, typer.Option(help="pid file of the broker to SIGHUP after auth changes")
    ] = None,
    broker_ca_file: Annotated[
        Path | None, typer.Option(help="the broker's CA certificate, handed to devices")
    ] = None,
    manage_broker_auth: Annotated[
        bool | None,
        typer.Option(
            "--manage-broker-auth/--no-manage-broker-auth",
            help="write the broker's password and ACL files (default on)",
            show_default=False,
        ),
    ] = None,
    telemetry_interval: Annotated[
        float | None, typer.Option(help="seconds between telemetry samples (told to devices)")
    ] = None,
    heartbeat_interval: Annotated[
        float | None, typer.Option(help="seconds between heartbeats (told to devices)")
    ] = None,
    retention_days: Annotated[
        float | None, typer.Option(help="days of telemetry and events to keep")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the fleet controller: REST API, enrollment, MQTT link (and embedded broker)."""
    import uvicorn
    from sqlalchemy import make_url

    from fleet.app import admin_token_path, create_app, preflight
    from fleet.errors import ConfigError, FleetError

    if log_level.lower() not in {"debug", "info", "warning", "error", "critical"}:
        raise typer.BadParameter(f"unknown level {log_level!r}", param_hint="--log-level")
    settings = _settings(
        {
            "data_dir": data_dir,
            "database_url": db,
            "host": host,
            "port": port,
            "public_url": public_url,
            "broker_url": broker,
            "broker_public_url": broker_public_url,
            "embedded_broker_host": broker_host,
            "embedded_broker_port": broker_port,
            "broker_auth_dir": broker_auth_dir,
            "broker_pid_file": broker_pid_file,
            "broker_ca_file": broker_ca_file,
            "manage_broker_auth": manage_broker_auth,
            "telemetry_interval_s": telemetry_interval,
            "heartbeat_interval_s": heartbeat_interval,
            "retention_days": retention_days,
        }
    )
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        preflight(settings)  # folders, database and migrations, admin token: fail plainly here
    except ConfigError as exc:
        _fail(str(exc), code=2)
    except FleetError as exc:  # the database is down: worth a retry, not a settings change
        _fail(str(exc), code=1)
    database = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
    token_source = (
        "EDGEFLEET_FLEET_ADMIN_TOKEN"
        if settings.admin_token is not None
        else str(admin_token_path(settings.data_dir))
    )
    broker_kind = "external" if settings.broker_url else "embedded"
    typer.echo(f"edgefleet controller: API on http://{settings.host}:{settings.port}")
    typer.echo(f"  devices enroll at {settings.resolved_public_url}/api/v1/enroll")
    typer.echo(f"  MQTT broker ({broker_kind}): {settings.resolved_broker_url}")
    typer.echo(f"  database: {database}")
    typer.echo(f"  admin token: {token_source}")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=10,
    )


# --- tokens ---------------------------------------------------------------------------------


def _expires_in_s(text: str) -> float | None:
    from fleet.tokens import parse_duration

    try:
        duration = parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expires") from None
    return None if duration is None else duration.total_seconds()


def _since(text: str) -> str:
    """An ISO time for ``--since``: given as one, or a duration before now."""
    from datetime import UTC, datetime

    from fleet.tokens import parse_duration

    try:
        return datetime.fromisoformat(text).isoformat()
    except ValueError:
        pass
    try:
        ago = parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    if ago is None:
        raise typer.BadParameter("give a time or a duration", param_hint="--since")
    return (datetime.now(UTC) - ago).isoformat()


def _when(value: str | None) -> str:
    return "-" if value is None else value.replace("T", " ")[:19]


@tokens_app.command("create")
def tokens_create(
    ctx: typer.Context,
    group: Annotated[str | None, typer.Option(help="put enrolled devices in this group")] = None,
    uses: Annotated[int, typer.Option(min=1, help="how many devices may enroll with it")] = 1,
    expires: Annotated[str, typer.Option(help="30m, 24h, 7d ... or never")] = "24h",
    note: Annotated[str, typer.Option(help="a reminder of what it is for")] = "",
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Create an enrollment token; its secret is printed once, with the agent command."""
    body = {"group": group, "uses": uses, "expires_in_s": _expires_in_s(expires), "note": note}
    with _client(ctx, url, admin_token, data_dir) as client:
        token = client.post("/api/v1/tokens", body)
    if as_json:
        _print_json(token)
        return
    uses_text = f"{token['uses_total']} use" + ("s" if token["uses_total"] != 1 else "")
    expiry = _when(token["expires_at"]) if token["expires_at"] else "never"
    typer.echo(
        f"created {token['id']} (group {token['group'] or '-'}, {uses_text}, expires {expiry})"
    )
    typer.echo(f"secret (shown only now): {token['secret']}")
    typer.echo("enroll a device with:")
    typer.echo(f"  edgefleet-agent serve --fleet {token['fleet_url']} --token {token['secret']}")


@tokens_app.command("list")
def tokens_list(
    ctx: typer.Context,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Every enrollment token, newest first (secrets are never shown again)."""
    with _client(ctx, url, admin_token, data_dir) as client:
        tokens = client.get("/api/v1/tokens")
    if as_json:
        _print_json(tokens)
        return
    table = Table("id", "state", "group", "uses left", "expires", "note", box=None)
    for t in tokens:
        table.add_row(
            t["id"],
            t["state"],
            t["group"] or "-",
            f"{t['uses_left']}/{t['uses_total']}",
            _when(t["expires_at"]) if t["expires_at"] else "never",
            t["note"],
        )
    _console().print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    ctx: typer.Context,
    token_id: Annotated[str, typer.Argument(help="the token's id (tok-...)")],
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Revoke a token: no further device can enroll with it."""
    with _client(ctx, url, admin_token, data_dir) as client:
        client.delete(f"/api/v1/tokens/{token_id}")
    typer.echo(f"revoked {token_id}")


# --- devices --------------------------------------------------------------------------------


@devices_app.command("list")
def devices_list(
    ctx: typer.Context,
    group: Annotated[str | None, typer.Option(help="only this group")] = None,
    tag: Annotated[str | None, typer.Option(help="only devices with this tag")] = None,
    status: Annotated[str | None, typer.Option(help="online, offline or revoked")] = None,
    search: Annotated[str | None, typer.Option(help="part of a name or id")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Enrolled devices, filtered."""
    if status is not None and status not in {"online", "offline", "revoked"}:
        raise typer.BadParameter("use online, offline or revoked", param_hint="--status")
    with _client(ctx, url, admin_token, data_dir) as client:
        page = client.get(
            "/api/v1/devices",
            group=group,
            tag=tag,
            status=status,
            q=search,
            limit=limit,
            offset=offset,
        )
    if as_json:
        _print_json(page)
        return
    table = Table(
        "id", "name", "group", "status", "last seen", "agent", "in sync", "tags", box=None
    )
    for d in page["items"]:
        table.add_row(
            d["id"],
            d["name"],
            d["group"] or "-",
            d["status"],
            _when(d["last_seen"]),
            d["agent_version"] or "-",
            "yes" if d["in_sync"] else "no",
            ",".join(d["tags"]),
        )
    console = _console()
    console.print(table)
    shown = len(page["items"])
    if shown < page["total"]:
        console.print(f"{shown} of {page['total']} shown (use --offset {offset + shown} for more)")


@devices_app.command("show")
def devices_show(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="the device's id (dev-...)")],
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """One device: identity, state, what it should run, what it runs, and the drift."""
    with _client(ctx, url, admin_token, data_dir) as client:
        d = client.get(f"/api/v1/devices/{device_id}")
    if as_json:
        _print_json(d)
        return
    report = d["device_report"] or {}
    hardware = ", ".join(
        str(x)
        for x in (report.get("arch"), report.get("jetson_model"), report.get("os"))
        if x is not None
    )
    rows = [
        ("id", d["id"]),
        ("name", d["name"]),
        ("group", d["group"] or "-"),
        ("tags", ", ".join(d["tags"]) or "-"),
        ("status", d["status"]),
        ("last seen", _when(d["last_seen"])),
        ("enrolled", _when(d["enrolled_at"])),
        ("revoked", _when(d["revoked_at"])),
        ("agent", d["agent_version"] or "-"),
        ("hardware", hardware or "-"),
        ("desired version", str(d["desired_version"] or "-")),
        ("applied version", str(d["applied_version"] or "-")),
        ("telemetry dropped", str(d["telemetry_dropped"])),
    ]
    table = Table(box=None, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    console = _console()
    console.print(table)
    desired = (d["desired"] or {}).get("models", [])
    wanted = ", ".join(
        m["name"] + (f"@{m['version']}" if m.get("version") else "") for m in desired
    )
    running = ", ".join(
        f"{m['name']}@{m.get('version') or '?'} ({m['state']})"
        for m in (d["reported"] or {}).get("models", [])
    )
    console.print(f"desired models: {wanted or '-'}")
    console.print(f"running models: {running or '-'}")
    drift = d["drift"]
    if not drift["managed"]:
        console.print("drift: none (no desired state set)")
    elif drift["in_sync"]:
        console.print("drift: in sync")
    else:
        console.print("drift:")
        for item in drift["items"]:
            console.print(f"  - {item['kind']}: {item['message']}")


@devices_app.command("revoke")
def devices_revoke(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="the device's id (dev-...)")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Revoke a device for good: it is cut off the broker at once and cannot re-enroll its key."""
    if not yes:
        typer.confirm(f"revoke {device_id}? this cannot be undone", abort=True)
    with _client(ctx, url, admin_token, data_dir) as client:
        client.post(f"/api/v1/devices/{device_id}/revoke")
    typer.echo(f"revoked {device_id}")


def _desired_body(model: list[str] | None, clear: bool) -> dict[str, Any]:
    if not model and not clear:
        raise typer.BadParameter("give at least one --model NAME[@VERSION], or --clear")
    if model and clear:
        raise typer.BadParameter("--clear runs no models: drop the --model options")
    models = []
    for spec in model or []:
        name, _, rest = spec.partition("@")
        version, _, variant = rest.partition(":")
        if not name:
            raise typer.BadParameter(
                f"{spec!r} is not NAME[@VERSION[:VARIANT]]", param_hint="--model"
            )
        models.append({"name": name, "version": version or None, "variant": variant or None})
    return {"models": models}


def _published(result: dict[str, Any]) -> str:
    state = "published" if result["published"] else "stored; publishes when the broker is back"
    return f"{result['device_id']}: desired version {result['version']} {state}"


ModelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        "-m",
        help="NAME, NAME@VERSION or NAME@VERSION:VARIANT to run (repeatable); a registered "
        "model is sent as its signed target",
    ),
]
ClearOpt = Annotated[bool, typer.Option("--clear", help="run no models at all")]


@devices_app.command("desired")
def devices_desired(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="the device's id (dev-...)")],
    model: ModelOpt = None,
    clear: ClearOpt = False,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Set which models a device runs (its desired state); it reconciles on receipt."""
    body = _desired_body(model, clear)
    with _client(ctx, url, admin_token, data_dir) as client:
        result = client.put(f"/api/v1/devices/{device_id}/desired", body)
    if as_json:
        _print_json(result)
        return
    typer.echo(_published(result))


@devices_app.command("events")
def devices_events(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="the device's id (dev-...)")],
    kind: Annotated[
        str | None, typer.Option(help="only this kind, e.g. update_progress, update_rolled_back")
    ] = None,
    since: Annotated[str, typer.Option(help="ISO time or a duration ago: 30m, 2h, 1d")] = "1h",
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new events (Ctrl-C stops)")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """A device's events, oldest first: update progress, health results, rollbacks, refusals."""
    start = _since(since)
    seen: set[str] = set()
    with _client(ctx, url, admin_token, data_dir) as client:
        while True:
            params: dict[str, Any] = {"since": start, "limit": 1000}
            if kind is not None:
                params["kind"] = kind
            body = client.request("GET", f"/api/v1/devices/{device_id}/events", params=params)
            for event in reversed(body["items"]):
                if event["id"] in seen:
                    continue
                seen.add(event["id"])
                if as_json:
                    typer.echo(json.dumps(event))
                else:
                    typer.echo(f"{event['ts']}  {event['severity']:<7}  {event['message']}")
            if not follow:
                return
            time.sleep(2.0)  # polling the controller for new events


@devices_app.command("tag")
def devices_tag(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="the device's id (dev-...)")],
    tags: Annotated[list[str], typer.Argument(help="tags to add (or remove, with --remove)")],
    remove: Annotated[bool, typer.Option("--remove", help="remove these tags instead")] = False,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Add tags to a device (or remove them with --remove)."""
    with _client(ctx, url, admin_token, data_dir) as client:
        current = set(client.get(f"/api/v1/devices/{device_id}")["tags"])
        wanted = current - set(tags) if remove else current | set(tags)
        updated = client.patch(f"/api/v1/devices/{device_id}", {"tags": sorted(wanted)})
    typer.echo(f"{device_id}: tags {', '.join(updated['tags']) or '(none)'}")


@devices_app.command("move")
def devices_move(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="the device's id (dev-...)")],
    group: Annotated[str | None, typer.Argument(help="the group; leave out for none")] = None,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Move a device into a group (or out of any group)."""
    with _client(ctx, url, admin_token, data_dir) as client:
        client.patch(f"/api/v1/devices/{device_id}", {"group": group})
    typer.echo(f"{device_id}: group {group or '(none)'}")


# --- groups ---------------------------------------------------------------------------------


@groups_app.command("list")
def groups_list(
    ctx: typer.Context,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Every group, with its device count."""
    with _client(ctx, url, admin_token, data_dir) as client:
        groups = client.get("/api/v1/groups")
    if as_json:
        _print_json(groups)
        return
    table = Table("name", "devices", "description", box=None)
    for g in groups:
        table.add_row(g["name"], str(g["devices"]), g["description"])
    _console().print(table)


@groups_app.command("create")
def groups_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="letters, digits, '.', '_' and '-'")],
    description: Annotated[str, typer.Option(help="what the group is")] = "",
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Create a group."""
    with _client(ctx, url, admin_token, data_dir) as client:
        client.post("/api/v1/groups", {"name": name, "description": description})
    typer.echo(f"created group {name}")


@groups_app.command("delete")
def groups_delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the group")],
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Delete an empty group."""
    with _client(ctx, url, admin_token, data_dir) as client:
        client.delete(f"/api/v1/groups/{name}")
    typer.echo(f"deleted group {name}")


@groups_app.command("desired")
def groups_desired(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the group")],
    model: ModelOpt = None,
    clear: ClearOpt = False,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Set which models every device in a group runs."""
    body = _desired_body(model, clear)
    with _client(ctx, url, admin_token, data_dir) as client:
        result = client.put(f"/api/v1/groups/{name}/desired", body)
    if as_json:
        _print_json(result)
        return
    for device in result["devices"]:
        typer.echo(_published(device))
    typer.echo(f"{len(result['devices'])} device(s) in {name} updated")


# --- status, version, simulate ----------------------------------------------------------------


# --- models ---------------------------------------------------------------------------------


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # not reached


@models_app.command("push")
def models_push(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="GGUF or ONNX file")
    ],
    name: Annotated[str, typer.Option(help="model name: lower-case letters, digits, ._-")],
    version: Annotated[str, typer.Option(help="version, e.g. 1.0.0")],
    variant: Annotated[
        str | None, typer.Option(help="variant, e.g. Q4_K_M (default: 'default')")
    ] = None,
    model_format: Annotated[
        str | None,
        typer.Option("--format", help="gguf or onnx (default: from the file's first bytes)"),
    ] = None,
    card: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, readable=True, help="model card (Markdown)"),
    ] = None,
    context_length: Annotated[
        int | None, typer.Option(min=1, help="the longest context it supports")
    ] = None,
    licence: Annotated[str | None, typer.Option(help="licence, e.g. an SPDX id")] = None,
    quantization: Annotated[
        str | None, typer.Option(help="quantization (default: the variant)")
    ] = None,
    metadata_file: Annotated[
        Path | None,
        typer.Option(
            "--metadata",
            exists=True,
            dir_okay=False,
            readable=True,
            help="JSON: ram_bytes, vram_bytes, runtime, golden_prompts "
            '([{"prompt", "expect", "max_tokens"}]), ... (docs/updates.md)',
        ),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Upload a model file to the registry, streaming it with a progress bar."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    card_text = None
    if card is not None:
        try:
            card_text = card.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"cannot read the model card {card}: {exc}")
    metadata: dict[str, Any] = {}
    if metadata_file is not None:
        try:
            metadata = json.loads(metadata_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            _fail(f"cannot read the metadata file {metadata_file}: {exc}")
        if not isinstance(metadata, dict):
            _fail(f"{metadata_file} must hold a JSON object")
    options = {
        "quantization": quantization or variant,
        "context_length": context_length,
        "licence": licence,
    }
    metadata.update({k: v for k, v in options.items() if v is not None})
    params = {"variant": variant, "format": model_format, "filename": file.name}
    path = f"/api/v1/models/{name}/versions/{version}"
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with _client(ctx, url, admin_token, data_dir) as client:
        with progress:
            task = progress.add_task(f"pushing {file.name}", total=file.stat().st_size)
            created, artifact = client.upload(
                path,
                file,
                params=params,
                metadata={k: v for k, v in metadata.items() if v is not None},
                progress=lambda n: progress.advance(task, n),
            )
        if card_text is not None:
            client.request(
                "PUT",
                f"{path}/card",
                params={"variant": artifact["variant"]},
                content=card_text.encode(),
                headers={"Content-Type": "text/markdown; charset=utf-8"},
            )
    if as_json:
        _print_json(artifact)
        return
    what = "pushed" if created else "already registered (identical content)"
    typer.echo(
        f"{what}: {artifact['name']} {artifact['version']} ({artifact['variant']}, "
        f"{artifact['format']}, {_size(artifact['size_bytes'])}) sha256 {artifact['sha256']}"
    )


@models_app.command("list")
def models_list(
    ctx: typer.Context,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Every model, with its latest version that is not yanked."""
    with _client(ctx, url, admin_token, data_dir) as client:
        models = client.get("/api/v1/models")
    if as_json:
        _print_json(models)
        return
    table = Table("name", "latest", "variants", "versions", "updated", box=None)
    for m in models:
        table.add_row(
            m["name"],
            m["latest_version"] or "- (all yanked)",
            ", ".join(m["latest_variants"]) or "-",
            str(m["versions"]),
            _when(m["updated_at"]),
        )
    _console().print(table)


@models_app.command("show")
def models_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the model")],
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """A model's versions and variants, newest first."""
    with _client(ctx, url, admin_token, data_dir) as client:
        versions = client.get(f"/api/v1/models/{name}")
    if as_json:
        _print_json(versions)
        return
    table = Table("version", "variant", "format", "size", "sha256", "uploaded", "yanked", box=None)
    for v in versions:
        for a in v["artifacts"]:
            yanked = f"yes: {a['yank_reason']}" if a["yanked"] else "no"
            table.add_row(
                a["version"],
                a["variant"],
                a["format"],
                _size(a["size_bytes"]),
                a["sha256"][:16],
                _when(a["created_at"]),
                yanked,
            )
    _console().print(table)


@models_app.command("yank")
def models_yank(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the model")],
    version: Annotated[str, typer.Argument(help="the version to withdraw")],
    reason: Annotated[str, typer.Option(help="why, shown to admins")],
    variant: Annotated[
        str | None, typer.Option(help="only this variant (default: all of them)")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Withdraw a version: never offered as latest again, still downloadable for rollbacks."""
    body = {"reason": reason, "variant": variant}
    with _client(ctx, url, admin_token, data_dir) as client:
        result = client.post(f"/api/v1/models/{name}/versions/{version}/yank", body)
    variants = ", ".join(a["variant"] for a in result["artifacts"] if a["yanked"])
    typer.echo(f"yanked {name} {version} ({variants})")


# --- keys -----------------------------------------------------------------------------------
#
# init, rotate and status work on the controller's data folder directly (they need its
# private keys; the repository locks its folder, so a running controller is fine); sign
# needs no controller at all (the offline machine); staged and import go through the API.

KeyFileOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--key",
        exists=True,
        dir_okay=False,
        help="a PKCS#8 PEM private key (repeat for several)",
    ),
]
OfflineDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--offline-dir",
        file_okay=False,
        help="write the new root (and targets) private keys here instead of the data folder",
    ),
]


@contextmanager
def _fleet_errors() -> Iterator[None]:
    """A repository or key failure becomes one red line (2 for configuration problems)."""
    from fleet.errors import ConfigError, FleetError

    try:
        yield
    except ConfigError as exc:
        _fail(str(exc), code=2)
    except FleetError as exc:
        _fail(str(exc))


def _repository(data_dir: Path) -> Any:
    from fleet.app import open_repository

    return open_repository(_settings({"data_dir": data_dir}))


@keys_app.command("init")
def keys_init(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    root_keys: Annotated[int, typer.Option(min=1, help="how many root keys")] = 1,
    root_threshold: Annotated[
        int, typer.Option(min=1, help="root signatures needed for a new root")
    ] = 1,
    targets_keys: Annotated[int, typer.Option(min=1, help="how many targets keys")] = 1,
    targets_threshold: Annotated[
        int, typer.Option(min=1, help="targets signatures needed for new targets")
    ] = 1,
    offline_dir: OfflineDirOpt = None,
    offline_targets: Annotated[
        bool, typer.Option(help="keep the targets keys in --offline-dir too")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="replace an existing repository (devices need the new root)")
    ] = False,
) -> None:
    """Create the TUF repository and a key for every role (before the first `serve`)."""
    from fleet.tables import utc_now

    if offline_targets and offline_dir is None:
        raise typer.BadParameter("needs --offline-dir", param_hint="--offline-targets")
    repo = _repository(data_dir)
    offline = ("root", "targets") if offline_targets else ("root",)
    with _fleet_errors():
        result = repo.init(
            utc_now(),
            root_keys=root_keys,
            root_threshold=root_threshold,
            targets_keys=targets_keys,
            targets_threshold=targets_threshold,
            offline_dir=offline_dir,
            offline_roles=offline,
            force=force,
        )
    typer.echo(f"created the TUF repository in {repo.path}")
    for role, keyids in result.keyids.items():
        typer.echo(f"  {role}: {', '.join(k[:16] for k in keyids)}")
    if result.offline_files:
        count = len(result.offline_files)
        typer.echo(f"offline private keys ({count}), move them off this machine:")
        for path in result.offline_files:
            typer.echo(f"  {path}")
    else:
        typer.echo("every key is online: move root offline with `edgefleet keys rotate root "
                   "--offline-dir DIR`")  # fmt: skip


@keys_app.command("rotate")
def keys_rotate(
    role: Annotated[str, typer.Argument(help="root, targets, snapshot, timestamp or director")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    root_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--root-key",
            exists=True,
            dir_okay=False,
            help="an offline root key (PEM) to sign the new root with; repeat for several",
        ),
    ] = None,
    keys: Annotated[
        int | None, typer.Option("--keys", min=1, help="how many new keys (default: as now)")
    ] = None,
    threshold: Annotated[
        int | None, typer.Option(min=1, help="signatures needed (default: as now)")
    ] = None,
    offline_dir: OfflineDirOpt = None,
) -> None:
    """Replace a role's keys through a new root, signed by old and new root keys."""
    from fleet.registry.keys import load_signers
    from fleet.tables import utc_now

    repo = _repository(data_dir)
    with _fleet_errors():
        signers = load_signers(root_key or [])
        change = repo.rotate(
            role, utc_now(), signers=signers, keys=keys, threshold=threshold,
            offline_dir=offline_dir,
        )  # fmt: skip
    typer.echo(f"new {role} keys: {', '.join(k[:16] for k in change.keyids)}")
    if offline_dir is not None:
        for path in change.key_files:
            typer.echo(f"  private key: {path} (move it off this machine)")
    if change.published:
        typer.echo(f"published root v{change.version}")
    else:
        typer.echo(
            f"root v{change.version} staged: it still needs signatures ({change.missing}); "
            "`edgefleet keys staged root`, sign it with `edgefleet keys sign`, then "
            "`edgefleet keys import`"
        )


@keys_app.command("sign")
def keys_sign(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="TUF metadata (JSON) to sign")
    ],
    key: KeyFileOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write here (default: in place)")
    ] = None,
) -> None:
    """Add signatures to a metadata file: the offline-signing tool, no controller needed."""
    from tuf.api.metadata import Metadata
    from tuf.api.serialization import DeserializationError
    from tuf.api.serialization.json import JSONSerializer

    from fleet.registry.keys import load_signers

    if not key:
        raise typer.BadParameter("give at least one --key", param_hint="--key")
    with _fleet_errors():
        signers = load_signers(key)
    try:
        md: Metadata[Any] = Metadata.from_bytes(file.read_bytes())
    except OSError as exc:
        _fail(f"cannot read {file}: {exc}")
    except DeserializationError as exc:
        _fail(f"{file} is not TUF metadata: {exc.__cause__ or exc}")
    for signer in signers:
        md.sign(signer, append=True)
    target = output or file
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_bytes(md.to_bytes(JSONSerializer(compact=False)))
        tmp.replace(target)
    except OSError as exc:
        _fail(f"cannot write {target}: {exc}")
    ids = ", ".join(s.public_key.keyid[:16] for s in signers)
    typer.echo(
        f"signed {md.signed.type} v{md.signed.version} with {len(signers)} key(s) ({ids}); "
        f"{len(md.signatures)} signature(s) in {target}"
    )


@keys_app.command("status")
def keys_status(data_dir: DataDirOpt = DEFAULT_DATA_DIR, as_json: JsonOpt = False) -> None:
    """Roles, key ids, thresholds, versions and expiries; which keys are on this controller."""
    repo = _repository(data_dir)
    with _fleet_errors():
        roles = repo.status()
        staged = {"targets": repo.staged_targets_version(), "root": repo.staged_root_version()}
    if as_json:
        _print_json(
            {
                "roles": [
                    {
                        "role": r.role,
                        "version": r.version,
                        "expires": r.expires.isoformat() if r.expires else None,
                        "keyids": list(r.keyids),
                        "threshold": r.threshold,
                        "online": list(r.online),
                    }
                    for r in roles
                ],
                "staged": staged,
            }
        )
        return
    table = Table("role", "version", "expires", "threshold", "keys (online marked *)", box=None)
    for r in roles:
        keys = " ".join(f"{k[:12]}{'*' if k in r.online else ''}" for k in r.keyids)
        expires = r.expires.strftime("%Y-%m-%d %H:%M") if r.expires else "- (in root)"
        version = "-" if r.version is None else str(r.version)
        table.add_row(r.role, version, expires, f"{r.threshold} of {len(r.keyids)}", keys)
    _console().print(table)
    for role, version in staged.items():
        if version is not None:
            typer.echo(f"staged {role} v{version}: waiting for offline signatures")


@keys_app.command("staged")
def keys_staged(
    ctx: typer.Context,
    role: Annotated[str, typer.Argument(help="targets or root")] = "targets",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write here (default: ROLE.json)")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Download the next targets (or a staged root), unsigned, to sign offline."""
    if role not in {"targets", "root"}:
        raise typer.BadParameter("targets or root", param_hint="ROLE")
    with _client(ctx, url, admin_token, data_dir) as client:
        body = client.request("GET", f"/api/v1/tuf/staged/{role}.json")
    target = output or Path(f"{role}.json")
    try:
        target.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        _fail(f"cannot write {target}: {exc}")
    typer.echo(f"wrote {role} v{body['signed']['version']} to {target}: sign it offline")


@keys_app.command("import")
def keys_import(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="signed targets or root JSON")
    ],
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Publish targets or root metadata signed offline."""
    try:
        data = file.read_bytes()
        role = json.loads(data)["signed"]["_type"]
    except OSError as exc:
        _fail(f"cannot read {file}: {exc}")
    except (ValueError, KeyError, TypeError):
        _fail(f"{file} is not TUF metadata")
    if role not in {"targets", "root"}:
        _fail(f"{file} is {role} metadata: only targets and root are imported")
    with _client(ctx, url, admin_token, data_dir) as client:
        result = client.request(
            "PUT", f"/api/v1/tuf/{role}", content=data, headers={"Content-Type": "application/json"}
        )
    typer.echo(f"published {result['role']} v{result['version']}")


@app.command()
def status(
    ctx: typer.Context,
    url: UrlOpt = DEFAULT_URL,
    admin_token: AdminTokenOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """The controller's versions, database, MQTT link and device counts."""
    with _client(ctx, url, admin_token, data_dir) as client:
        s = client.get("/api/v1/status")
    if as_json:
        _print_json(s)
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


@app.command()
def version() -> None:
    """Print the installed edgefleet version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("edgefleet"))


@app.command(
    "simulate",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def simulate(ctx: typer.Context) -> None:
    """Simulate a fleet of devices against a controller (see `edgefleet simulate --help`)."""
    try:
        from fleet.simulate.cli import simulate as command
    except ImportError as exc:
        _fail(f"the fleet simulator is not available in this installation: {exc}", code=2)
    sub = typer.Typer(add_completion=False)
    sub.command()(command)
    result = typer.main.get_command(sub).main(
        args=list(ctx.args), prog_name="edgefleet simulate", standalone_mode=False
    )
    if isinstance(result, int) and result:
        raise typer.Exit(result)


def main() -> None:
    app()
