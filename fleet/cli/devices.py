"""'edgefleet devices': list, show, tag, move, revoke; set what one runs; follow its events.

``devices list --degraded`` and ``devices show`` tell which models a device answers with
its fallbacks (degraded mode), in which breaker state, and why.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from fleet.cli.connection import Connection, connected
from fleet.cli.desired import ClearOpt, ModelOpt, desired_body, published
from fleet.cli.output import JsonOpt, console, print_json, when

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, help="Enrolled devices.")

DeviceArg = Annotated[str, typer.Argument(help="the device's id (dev-...)")]
STATUSES = ("online", "offline", "revoked")
EVENTS_POLL_S = 2.0  # how often --follow asks the controller for new events


def _since(text: str) -> str:
    """An ISO time for --since: given as one, or a duration before now."""
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


@app.command("list")
@connected
def list_devices(
    connection: Connection,
    group: Annotated[str | None, typer.Option(help="only this group")] = None,
    tag: Annotated[str | None, typer.Option(help="only devices with this tag")] = None,
    status: Annotated[str | None, typer.Option(help="online, offline or revoked")] = None,
    search: Annotated[str | None, typer.Option(help="part of a name or id")] = None,
    degraded: Annotated[
        bool,
        typer.Option(
            "--degraded", help="only degraded devices: each model its fallbacks answer, and why"
        ),
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Enrolled devices, filtered; --degraded lists the degraded ones model by model."""
    if status is not None and status not in STATUSES:
        raise typer.BadParameter("use online, offline or revoked", param_hint="--status")
    with connection.client() as client:
        page = client.get(
            "/api/v1/devices",
            group=group,
            tag=tag,
            status=status,
            q=search,
            degraded="true" if degraded else None,
            limit=limit,
            offset=offset,
        )
    if as_json:
        print_json(page)
        return
    table = _degraded_table(page["items"]) if degraded else _device_table(page["items"])
    out = console()
    out.print(table)
    shown = len(page["items"])
    if shown < page["total"]:
        out.print(f"{shown} of {page['total']} shown (use --offset {offset + shown} for more)")


def _device_table(items: list[dict[str, Any]]) -> Table:
    table = Table(
        "id", "name", "group", "status", "last seen", "agent", "in sync", "tags", box=None
    )
    for d in items:
        table.add_row(
            d["id"],
            d["name"],
            d["group"] or "-",
            d["status"],
            when(d["last_seen"]),
            d["agent_version"] or "-",
            "yes" if d["in_sync"] else "no",
            ",".join(d["tags"]),
        )
    return table


def _degraded_table(items: list[dict[str, Any]]) -> Table:
    """One row per degraded model: which breaker, since when, what opened it and why."""
    table = Table(
        "id", "name", "group", "status", "model", "breaker", "since", "kind", "reason", box=None
    )
    for d in items:
        for m in d["degraded"]:
            table.add_row(
                d["id"],
                d["name"],
                d["group"] or "-",
                d["status"],
                m["model"],
                m["breaker"],
                when(m["since"]),
                m["kind"],
                m["reason"],
            )
    return table


@app.command("show")
@connected
def show(connection: Connection, device_id: DeviceArg, as_json: JsonOpt = False) -> None:
    """One device: identity, state, what it should run, what it runs, and the drift."""
    with connection.client() as client:
        d = client.get(f"/api/v1/devices/{device_id}")
    if as_json:
        print_json(d)
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
        ("last seen", when(d["last_seen"])),
        ("enrolled", when(d["enrolled_at"])),
        ("revoked", when(d["revoked_at"])),
        ("agent", d["agent_version"] or "-"),
        ("hardware", hardware or "-"),
        ("desired version", str(d["desired_version"] or "-")),
        ("applied version", str(d["applied_version"] or "-")),
        ("telemetry dropped", str(d["telemetry_dropped"])),
    ]
    table = Table(box=None, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    out = console()
    out.print(table)
    desired = (d["desired"] or {}).get("models", [])
    wanted = ", ".join(
        m["name"] + (f"@{m['version']}" if m.get("version") else "") for m in desired
    )
    running = ", ".join(
        f"{m['name']}@{m.get('version') or '?'} ({m['state']})"
        for m in (d["reported"] or {}).get("models", [])
    )
    out.print(f"desired models: {wanted or '-'}")
    out.print(f"running models: {running or '-'}")
    policy = d["policy"]
    enforced = f"{policy['name']} v{policy['version']}" if policy else "-"
    out.print(f"fallback policy: {enforced}")
    if d["degraded"]:
        out.print("degraded:")
        for m in d["degraded"]:
            out.print(
                f"  - {m['model']}: breaker {m['breaker']} since {when(m['since'])}, "
                f"{m['kind']}: {m['reason']}"
            )
    else:
        out.print("degraded: no")
    drift = d["drift"]
    if not drift["managed"]:
        out.print("drift: none (no desired state set)")
    elif drift["in_sync"]:
        out.print("drift: in sync")
    else:
        out.print("drift:")
        for item in drift["items"]:
            out.print(f"  - {item['kind']}: {item['message']}")


@app.command("revoke")
@connected
def revoke(
    connection: Connection,
    device_id: DeviceArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
) -> None:
    """Revoke a device for good: it is cut off the broker at once and cannot re-enroll its key."""
    if not yes:
        typer.confirm(f"revoke {device_id}? this cannot be undone", abort=True)
    with connection.client() as client:
        client.post(f"/api/v1/devices/{device_id}/revoke")
    typer.echo(f"revoked {device_id}")


@app.command("desired")
@connected
def desired(
    connection: Connection,
    device_id: DeviceArg,
    model: ModelOpt = None,
    clear: ClearOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Set which models a device runs (its desired state); it reconciles on receipt."""
    body = desired_body(model, clear)
    with connection.client() as client:
        result = client.put(f"/api/v1/devices/{device_id}/desired", body)
    if as_json:
        print_json(result)
        return
    typer.echo(published(result))


@app.command("events")
@connected
def events(
    connection: Connection,
    device_id: DeviceArg,
    kind: Annotated[
        str | None, typer.Option(help="only this kind, e.g. update_progress, update_rolled_back")
    ] = None,
    since: Annotated[str, typer.Option(help="ISO time or a duration ago: 30m, 2h, 1d")] = "1h",
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new events (Ctrl-C stops)")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """A device's events, oldest first: update progress, health results, rollbacks, refusals."""
    params: dict[str, Any] = {"since": _since(since), "limit": 1000, "kind": kind}
    seen: set[str] = set()
    with connection.client() as client:
        while True:
            body = client.get(f"/api/v1/devices/{device_id}/events", **params)
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
            time.sleep(EVENTS_POLL_S)  # polling the controller for new events


@app.command("tag")
@connected
def tag(
    connection: Connection,
    device_id: DeviceArg,
    tags: Annotated[list[str], typer.Argument(help="tags to add (or remove, with --remove)")],
    remove: Annotated[bool, typer.Option("--remove", help="remove these tags instead")] = False,
) -> None:
    """Add tags to a device (or remove them with --remove)."""
    with connection.client() as client:
        current = set(client.get(f"/api/v1/devices/{device_id}")["tags"])
        wanted = current - set(tags) if remove else current | set(tags)
        updated = client.patch(f"/api/v1/devices/{device_id}", {"tags": sorted(wanted)})
    typer.echo(f"{device_id}: tags {', '.join(updated['tags']) or '(none)'}")


@app.command("move")
@connected
def move(
    connection: Connection,
    device_id: DeviceArg,
    group: Annotated[str | None, typer.Argument(help="the group; leave out for none")] = None,
) -> None:
    """Move a device into a group (or out of any group)."""
    with connection.client() as client:
        client.patch(f"/api/v1/devices/{device_id}", {"group": group})
    typer.echo(f"{device_id}: group {group or '(none)'}")
