"""'edgefleet rollouts': create a staged rollout, follow it, pause, resume, approve, abort.

``create`` builds the API's rollout spec from short options (or reads a whole spec from
``--spec file.json``); the controller validates it against the fleet and answers 422
naming the field. The option parsers are pure, so they are tested without a controller.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fleet.cli.connection import Connection, connected
from fleet.cli.output import JsonOpt, console, fail, print_json, when

__all__ = [
    "app",
    "parse_abort",
    "parse_canary",
    "parse_change",
    "parse_gate",
    "parse_policy",
    "parse_window",
    "render_status",
]

app = typer.Typer(
    no_args_is_help=True, help="Staged rollouts of a model version or a fallback policy."
)

RolloutArg = Annotated[str, typer.Argument(help="the rollout's id (ro-...)")]
WATCH_POLL_S = 2.0  # how often --watch asks the controller
_FINAL = {"completed", "aborted"}
_GATE_KEYS = {
    "max_increase": "max_increase_percent",
    "max_decrease": "max_decrease_percent",
    "max": "max_value",
    "min": "min_value",
    "window": "window_s",
    "min_samples": "min_samples",
    "insufficient": "on_insufficient_data",
    "failures": "max_consecutive_failures",
}


def _number(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number", param_hint=option) from None
    if not math.isfinite(value):
        raise typer.BadParameter(f"{text!r} is not a finite number", param_hint=option)
    return value


def _whole(text: str, option: str) -> int:
    value = _number(text, option)
    if value != int(value):
        raise typer.BadParameter(f"{text!r}: a count is a whole number", param_hint=option)
    return int(value)


def parse_canary(text: str) -> dict[str, Any]:
    """``5`` devices or ``2%`` of the target."""
    if text.endswith("%"):
        return {"percent": _number(text[:-1], "--canary")}
    return {"count": _whole(text, "--canary")}


def parse_gate(text: str) -> dict[str, Any]:
    """``p95_latency_ms:max_increase=20,window=300,min_samples=5,insufficient=wait``."""
    metric, _, rest = text.partition(":")
    gate: dict[str, Any] = {"metric": metric.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in _GATE_KEYS:
            known = ", ".join(_GATE_KEYS)
            raise typer.BadParameter(f"{part!r}: use key=value with {known}", param_hint="--gate")
        field = _GATE_KEYS[key]
        gate[field] = value if key == "insufficient" else _number(value, "--gate")
    return gate


def parse_abort(text: str) -> dict[str, Any]:
    """``health_check_failed:10%,min=5`` or ``any:3`` (a count)."""
    failure, _, rest = text.partition(":")
    rule: dict[str, Any] = {"failure": failure.strip() or "any"}
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if not parts:
        raise typer.BadParameter("give a threshold: kind:10% or kind:3", param_hint="--abort")
    threshold, *options = parts
    if threshold.endswith("%"):
        rule["threshold_percent"] = _number(threshold[:-1], "--abort")
    else:
        rule["threshold_count"] = _whole(threshold, "--abort")
    for option in options:
        key, sep, value = option.partition("=")
        if key != "min" or not sep:
            raise typer.BadParameter(f"{option!r}: the only option is min=N", param_hint="--abort")
        rule["min_devices"] = _whole(value, "--abort")
    return rule


def parse_policy(text: str) -> dict[str, Any]:
    """``edge-default:2``, or ``edge-default``: the latest, fixed when the rollout is created."""
    name, sep, version = text.partition(":")
    change: dict[str, Any] = {"kind": "policy", "policy": name.strip()}
    if sep:
        number = _whole(version, "--policy")
        if number < 1:
            raise typer.BadParameter(f"{version!r}: versions start at 1", param_hint="--policy")
        change["version"] = number
    return change


def parse_change(model: str | None, version: str | None, policy: str | None) -> dict[str, Any]:
    """The change: ``--model`` with ``--version``, or ``--policy``, never both."""
    if policy is not None:
        if model is not None or version is not None:
            raise typer.BadParameter(
                "--policy rolls out a fallback policy: leave out --model and --version",
                param_hint="--policy",
            )
        return parse_policy(policy)
    if model is None or version is None:
        raise typer.BadParameter(
            "give --model and --version, or --policy (or --spec)", param_hint="--model"
        )
    return {"model": model, "version": version}


def parse_window(text: str) -> dict[str, Any]:
    """``02:00-05:00`` or ``22:00-04:00@Europe/Berlin`` (for devices that report no zone)."""
    hours, _, zone = text.partition("@")
    start, sep, end = hours.partition("-")
    if not sep:
        raise typer.BadParameter("use HH:MM-HH:MM[@Zone]", param_hint="--window")
    window = {"start": start.strip(), "end": end.strip()}
    if zone:
        window["timezone"] = zone.strip()
    return window


def _spec_from_options(
    change: dict[str, Any],
    groups: list[str],
    tags: list[str],
    devices: list[str],
    arch: list[str],
    canary: str | None,
    waves: str | None,
    exponential: str | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "change": change,
        "target": {"groups": groups, "tags": tags, "devices": devices},
        **{k: v for k, v in options.items() if v is not None},
    }
    if arch:
        spec["target"]["facts"] = {"arch": arch}
    if canary is not None:
        spec["canary"] = parse_canary(canary)
    if waves is not None and exponential is not None:
        raise typer.BadParameter("choose --waves or --exponential", param_hint="--exponential")
    if waves is not None:
        spec["stages"] = {
            "kind": "waves",
            "percents": [_number(p, "--waves") for p in waves.split(",") if p.strip()],
        }
    if exponential is not None:
        parts = exponential.split(",")
        if len(parts) != 3:
            raise typer.BadParameter("use START,FACTOR,MAX per minute", param_hint="--exponential")
        start, factor, cap = (_number(p, "--exponential") for p in parts)
        spec["stages"] = {
            "kind": "exponential",
            "start_per_minute": int(start),
            "factor": factor,
            "max_per_minute": int(cap),
        }
    return spec


@app.command("create")
@connected
def create(
    connection: Connection,
    model: Annotated[str | None, typer.Option(help="the model to roll out")] = None,
    version: Annotated[
        str | None, typer.Option(help="its version (variants chosen per device)")
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(help="a fallback policy to roll out instead: NAME or NAME:VERSION"),
    ] = None,
    group: Annotated[list[str] | None, typer.Option(help="target this group (repeatable)")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="target devices with this tag")] = None,
    device: Annotated[list[str] | None, typer.Option(help="target this device")] = None,
    arch: Annotated[list[str] | None, typer.Option(help="only devices of this arch")] = None,
    canary: Annotated[str | None, typer.Option(help="first stage: N devices or P%")] = None,
    waves: Annotated[str | None, typer.Option(help="cumulative percents, e.g. 10,50,100")] = None,
    exponential: Annotated[
        str | None, typer.Option(help="START,FACTOR,MAX devices per minute, after the canary")
    ] = None,
    soak: Annotated[float | None, typer.Option(help="seconds each stage soaks")] = None,
    approval: Annotated[bool, typer.Option(help="each stage waits for `approve`")] = False,
    max_concurrent: Annotated[int | None, typer.Option(help="devices updating at once")] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds a device may take")] = None,
    window: Annotated[str | None, typer.Option(help="HH:MM-HH:MM[@Zone], device-local")] = None,
    gate: Annotated[
        list[str] | None, typer.Option(help="METRIC:max_increase=20,window=300,...")
    ] = None,
    abort: Annotated[list[str] | None, typer.Option(help="KIND:10%,min=5 or KIND:3")] = None,
    name: Annotated[str, typer.Option(help="a name for people")] = "",
    spec_file: Annotated[
        Path | None, typer.Option("--spec", help="a whole rollout spec as JSON instead")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a staged rollout; the controller checks it against the fleet first."""
    if spec_file is not None:
        try:
            spec = json.loads(spec_file.read_text())
        except (OSError, ValueError) as exc:
            fail(f"cannot read the spec {spec_file}: {exc}")
    else:
        change = parse_change(model, version, policy)
        options = {
            "name": name or None,
            "soak_s": soak,
            "approval": approval or None,
            "max_concurrent": max_concurrent,
            "device_timeout_s": timeout,
            "maintenance_window": parse_window(window) if window else None,
            "gates": [parse_gate(g) for g in gate or []] or None,
            "abort_rules": [parse_abort(a) for a in abort or []] or None,
        }
        spec = _spec_from_options(
            change,
            group or [],
            tag or [],
            device or [],
            arch or [],
            canary,
            waves,
            exponential,
            options,
        )
    with connection.client() as client:
        detail = client.post("/api/v1/rollouts", spec)
    if as_json:
        print_json(detail)
        return
    console().print(render_status(detail))


@app.command("list")
@connected
def list_rollouts(
    connection: Connection,
    status: Annotated[str | None, typer.Option(help="active, paused, completed, aborted")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Rollouts, newest first."""
    with connection.client() as client:
        rows = client.get("/api/v1/rollouts", status=status)
    if as_json:
        print_json(rows)
        return
    table = Table("id", "name", "change", "status", "stage", "devices", "created", box=None)
    for r in rows:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r["devices"].items()))
        table.add_row(
            r["id"],
            r["name"] or "-",
            _change_label(r),
            r["status"],
            f"{r['stage'] + 1}/{r['stages']} {r['stage_name']} ({r['phase']})",
            counts,
            when(r["created_at"]),
        )
    console().print(table)


def _change_label(rollout: dict[str, Any]) -> str:
    """``gemma3 2.0`` or ``policy edge-default v2`` (a controller before policies: the model)."""
    return str(rollout.get("change") or f"{rollout['model']} {rollout['version']}")


def render_status(detail: dict[str, Any]) -> Group:
    """A rollout's progress per stage, its failures, latest gate checks and audit trail."""
    head = Text.assemble(
        (f"{detail['id']} ", "bold"),
        f"{_change_label(detail)}  ",
        (detail["status"], "green" if detail["status"] == "completed" else "yellow"),
        f"  stage {detail['stage'] + 1}/{detail['stages']} {detail['stage_name']}",
        f" ({detail['phase']})",
    )
    parts: list[Any] = [head]
    if detail["reason"]:
        parts.append(Text(detail["reason"], style="red"))
    stages = Table(
        "stage", "quota", "progress", "updated", "updating", "failed", "timed out",
        "rolled back", box=None,
    )  # fmt: skip
    for stage in detail["stage_progress"]:
        counts = stage["devices"]
        done = sum(counts.get(s, 0) for s in ("updated", "failed", "timed_out", "rolled_back"))
        total = max(sum(counts.values()), 1)
        stages.add_row(
            stage["name"],
            str(stage["quota"]),
            ProgressBar(total=total, completed=done, width=24),
            str(counts.get("updated", 0)),
            str(counts.get("updating", 0) + counts.get("queued", 0)),
            str(counts.get("failed", 0)),
            str(counts.get("timed_out", 0)),
            str(counts.get("rolled_back", 0)),
        )
    parts.append(stages)
    overall = ", ".join(f"{n} {s}" for s, n in sorted(detail["devices"].items()))
    parts.append(Text(f"devices: {overall}"))
    checks = detail["gate_checks"][: len(detail["spec"].get("gates", [])) or 0]
    for check in checks:
        ev = check["evidence"]
        parts.append(
            Text(
                f"gate {check['gate']} {ev.get('metric')}: "
                f"{check['verdict']} -> {check['decision']}"
                f"  updated {ev.get('updated', {}).get('value')}"
                f" baseline {ev.get('baseline', {}).get('value')}"
                f" control {ev.get('control', {}).get('value')}"
                + (f"  ({'; '.join(check['reasons'])})" if check["reasons"] else "")
            )
        )
    for entry in detail["audit"][:5]:
        parts.append(
            Text(
                f"{when(entry['at'])} {entry['actor']}: {entry['action']} {entry['reason']}",
                style="dim",
            )
        )
    return Group(*parts)


@app.command("status")
@connected
def status(
    connection: Connection,
    rollout_id: RolloutArg,
    watch: Annotated[bool, typer.Option(help="follow it live until it ends")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A rollout's progress per stage, gate checks with their evidence, and audit trail."""
    with connection.client() as client:
        detail = client.get(f"/api/v1/rollouts/{rollout_id}")
        if as_json:
            print_json(detail)
            return
        if not watch:
            console().print(render_status(detail))
            return
        with Live(render_status(detail), console=console(), refresh_per_second=2) as live:
            while detail["status"] not in _FINAL:
                time.sleep(WATCH_POLL_S)
                detail = client.get(f"/api/v1/rollouts/{rollout_id}")
                live.update(render_status(detail))


@app.command("devices")
@connected
def devices(
    connection: Connection,
    rollout_id: RolloutArg,
    state: Annotated[str | None, typer.Option(help="only devices in this state")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Each device's stage, variant (a model's) and state in the rollout, with why (in order)."""
    with connection.client() as client:
        rows = client.get(f"/api/v1/rollouts/{rollout_id}/devices", state=state)
    if as_json:
        print_json(rows)
        return
    table = Table("device", "stage", "state", "variant", "since", "detail", box=None)
    for row in rows:
        stage = "-" if row["stage"] is None else str(row["stage"])
        variant = f"{row['variant']} ({row['placement']})" if row["variant"] else "-"
        table.add_row(
            row["device_id"], stage, row["state"], variant, when(row["since"]), row["detail"]
        )
    console().print(table)


ReasonOpt = Annotated[str, typer.Option(help="why, for the audit log")]
ACTIONS = {
    "pause": "Stop releasing devices and advancing stages; devices already updating finish.",
    "resume": "Carry on a paused rollout.",
    "approve": "Start the next stage of a rollout waiting for approval.",
    "abort": "Stop, and roll every device it changed back to its previous model or policy.",
}


def _action_command(action: str, summary: str) -> None:
    """``edgefleet rollouts <action> ID [--reason ...]``: the four actions take the same options."""

    def command(
        connection: Connection,
        rollout_id: RolloutArg,
        reason: ReasonOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        with connection.client() as client:
            detail = client.post(f"/api/v1/rollouts/{rollout_id}/{action}", {"reason": reason})
        if as_json:
            print_json(detail)
            return
        console().print(render_status(detail))

    command.__doc__ = summary
    command.__name__ = action
    app.command(action)(connected(command))


for _action, _summary in ACTIONS.items():
    _action_command(_action, _summary)
