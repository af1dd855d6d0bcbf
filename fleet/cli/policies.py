"""'edgefleet policies': degraded-mode fallback policies: create, list, show, assign, unassign.

``create`` reads the policy's body (``breaker`` and ``chains``, as docs/policies.md
shows) from a TOML or JSON file; the controller numbers the version and answers 422
naming the offending field. ``assign`` lists the devices that got the policy and
those that cannot take it, with the model each one lacks.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fleet.cli.connection import Connection, connected
from fleet.cli.output import JsonOpt, console, print_json, when

__all__ = ["app", "read_policy_file", "render_assignment", "render_detail"]

app = typer.Typer(no_args_is_help=True, help="Degraded-mode fallback policies for devices.")

NameArg = Annotated[str, typer.Argument(help="the policy's name")]
GroupOpt = Annotated[str | None, typer.Option(help="a group")]
DeviceOpt = Annotated[str | None, typer.Option(help="a device id")]
_BODY_KEYS = {"description", "breaker", "chains"}


def read_policy_file(path: Path, name: str) -> dict[str, Any]:
    """Policy ``name``'s body in a .toml or .json file; a readable error (BadParameter) if not."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--file"
        ) from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise typer.BadParameter(
            f"{path} is not valid {kind}: {exc}", param_hint="--file"
        ) from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path} must hold a table (an object)", param_hint="--file")
    if "version" in data:
        raise typer.BadParameter(
            f"{path}: leave 'version' out, the controller numbers versions", param_hint="--file"
        )
    if data.pop("name", name) != name:  # the NAME argument names it; the file may too
        raise typer.BadParameter(f"{path} names another policy than {name!r}", param_hint="--file")
    unknown = sorted(set(data) - _BODY_KEYS)
    if unknown:
        raise typer.BadParameter(
            f"{path}: unknown keys {', '.join(unknown)} (use description, breaker, chains)",
            param_hint="--file",
        )
    return data


@app.command("create")
@connected
def create(
    connection: Connection,
    name: NameArg,
    file: Annotated[Path, typer.Option("--file", "-f", help="the body: .toml or .json")],
    description: Annotated[
        str | None, typer.Option(help="what it is for (overrides the file's)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Store a new version of a policy (version 1 for a new name)."""
    body = read_policy_file(file, name)
    if description is not None:
        body["description"] = description
    with connection.client() as client:
        detail = client.post("/api/v1/policies", {"name": name, **body})
    if as_json:
        print_json(detail)
        return
    console().print(f"created policy {detail['name']} version {detail['version']}")
    console().print(render_detail(detail))


@app.command("list")
@connected
def list_policies(connection: Connection, as_json: JsonOpt = False) -> None:
    """The latest version of each policy, and how many devices have it and enforce it."""
    with connection.client() as client:
        rows = client.get("/api/v1/policies")
    if as_json:
        print_json(rows)
        return
    table = Table("name", "version", "assigned to", "devices", "enforcing", "created", box=None)
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['version']} (of {r['versions']})",
            str(r["assignments"]),
            str(r["devices_assigned"]),
            str(r["devices_enforcing"]),
            when(r["created_at"]),
        )
    console().print(table)


def render_detail(detail: dict[str, Any]) -> Table:
    """One policy version: its chains, its assignments and each device's status."""
    out = Table.grid(padding=(0, 1))
    out.add_row(
        Text.assemble((f"{detail['name']} ", "bold"), f"version {detail['version']}  ",
                      (detail["digest"][:12], "dim"))
    )  # fmt: skip
    if detail["description"]:
        out.add_row(escape(detail["description"]))
    body = detail["body"]
    breaker = body.get("breaker", {})
    out.add_row(
        f"breaker: opens at {breaker.get('failure_rate_threshold')}% failures "
        f"(at least {breaker.get('minimum_calls')} of the last {breaker.get('sliding_window')}"
        f" calls), stays open {breaker.get('wait_in_open')} s"
    )
    for served, chain in body.get("chains", {}).items():
        steps = [served, *(_tier(t) for t in chain.get("tiers", [])), "503"]
        out.add_row(Text(f"  {' -> '.join(steps)}"))
    versions = ", ".join(str(v["version"]) for v in detail["versions"])
    out.add_row(f"versions: {versions}")
    if detail["assignments"]:
        assignments = Table("assigned to", "version", "by", "at", box=None)
        for a in detail["assignments"]:
            assignments.add_row(
                f"{a['scope']} {a['target']}", str(a["version"]), a["assigned_by"],
                when(a["assigned_at"]),
            )  # fmt: skip
        out.add_row(assignments)
    else:
        out.add_row("not assigned")
    if detail["devices"]:
        devices = Table("device", "group", "version", "status", "why", box=None)
        for d in detail["devices"]:
            devices.add_row(
                d["device_id"], d["group"] or "-", str(d["version"]), d["status"],
                escape("; ".join(d["reasons"])),
            )  # fmt: skip
        out.add_row(devices)
    return out


def _tier(tier: dict[str, Any]) -> str:
    when_ = f" [{','.join(tier['when'])}]" if tier.get("when") else ""
    if tier.get("kind") == "model":
        return f"{tier['model']}{' (cpu)' if tier.get('device') == 'cpu' else ''}{when_}"
    if tier.get("kind") == "cache":
        return f"cache ({tier['embedder']}){when_}"
    return f"rules ({len(tier.get('rules', []))}){when_}"


@app.command("show")
@connected
def show(
    connection: Connection,
    name: NameArg,
    version: Annotated[int | None, typer.Option(help="this version (default: the latest)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A policy's chains, versions, assignments and each assigned device's status."""
    with connection.client() as client:
        detail = client.get(f"/api/v1/policies/{name}", version=version)
    if as_json:
        print_json(detail)
        return
    console().print(render_detail(detail))


def _target(group: str | None, device: str | None) -> dict[str, str]:
    if (group is None) == (device is None):
        raise typer.BadParameter("give exactly one of --group and --device", param_hint="--group")
    return {"group": group} if group is not None else {"device": device or ""}


def render_assignment(result: dict[str, Any], verb: str) -> Table:
    """Which devices got a new desired state, which were left, and why."""
    out = Table.grid(padding=(0, 1))
    out.add_row(
        f"{verb} {result['policy']} version {result['version']} "
        f"({result['scope']} {result['target']})"
    )
    published = {d["device_id"]: d for d in result["desired"]}
    devices = Table("device", "result", "detail", box=None)
    for device_id in result["updated"]:
        sent = published.get(device_id)
        detail = (
            f"desired state v{sent['version']}"
            + ("" if sent["published"] else " (stored; published when the broker is back)")
            if sent
            else ""
        )
        devices.add_row(device_id, "updated", detail)
    for device_id in result["unchanged"]:
        devices.add_row(device_id, "unchanged", "its desired state already has it")
    for item in result["ineligible"]:
        devices.add_row(
            item["device"], Text("ineligible", style="red"), escape("; ".join(item["reasons"]))
        )
    for item in result["skipped"]:
        devices.add_row(item["device"], "skipped", escape("; ".join(item["reasons"])))
    out.add_row(devices)
    return out


@app.command("assign")
@connected
def assign(
    connection: Connection,
    name: NameArg,
    version: Annotated[int | None, typer.Option(help="this version (default: the latest)")] = None,
    group: GroupOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give a policy to a group or a device; devices lacking a model it names are listed."""
    body: dict[str, Any] = {**_target(group, device), "version": version}
    with connection.client() as client:
        result = client.post(f"/api/v1/policies/{name}/assign", body)
    if as_json:
        print_json(result)
        return
    console().print(render_assignment(result, "assigned"))


@app.command("unassign")
@connected
def unassign(
    connection: Connection,
    group: GroupOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a group's or device's policy; its devices get their group's policy, or none."""
    scope, target = next(iter(_target(group, device).items()))
    with connection.client() as client:
        result = client.delete(f"/api/v1/policies/assignments/{scope}/{target}")
    if as_json:
        print_json(result)
        return
    console().print(render_assignment(result, "unassigned"))
