"""``edgefleet-agent status``: how far the device got since boot, and whether it serves.

It reads the first-boot steps the running agent records in ``<state_dir>/boot.json``
(:mod:`agent.boot_status`) and asks the local API's ``/readyz`` (a short timeout: a hung
agent must not hang the operator's shell). The device *serves* when ``/readyz`` answers
200 (ready, or degraded with fallbacks): that, not the file, decides the exit code, so a
stale file from a crashed agent cannot say "serving". The file says why not.

:func:`render` and :func:`report` are pure (text for people, JSON for machines);
:func:`read_boot` and :func:`probe_api` are the I/O.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx

from agent.boot_status import (
    LABELS,
    BootStatus,
    Step,
    StepState,
    StepStatus,
    current_step,
    load_status,
    stuck_reason,
)
from agent.link.enroll import transport_reason

__all__ = [
    "ApiAnswer",
    "BootFile",
    "exit_code",
    "probe_api",
    "read_boot",
    "readyz_url",
    "render",
    "report",
]

_MARKS: Final = {
    StepState.DONE: "✓",
    StepState.FAILED: "✗",
    StepState.ACTIVE: "…",
    StepState.PENDING: "·",
    StepState.SKIPPED: "–",
}


@dataclass(frozen=True)
class ApiAnswer:
    """What ``GET /readyz`` on the local API said, or why it said nothing."""

    url: str
    status_code: int | None = None  # None: no answer
    status: str | None = None  # the body's "status": ready, degraded, loading, failed
    detail: str | None = None  # what is loading or failed, or why there was no answer

    @property
    def serving(self) -> bool:
        return self.status_code == 200


@dataclass(frozen=True)
class BootFile:
    """``boot.json``: its path, its status if readable, and why not otherwise."""

    path: Path
    status: BootStatus | None
    problem: str | None = None


def readyz_url(host: str, port: int) -> str:
    """Where to ask: a wildcard bind address is asked on loopback."""
    if host in {"", "0.0.0.0"}:  # noqa: S104 - a bind address read from the config
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            host = f"[{host}]"
    except ValueError:
        pass  # a hostname
    return f"http://{host}:{port}/readyz"


def exit_code(api: ApiAnswer) -> int:
    """0 when the device serves, 1 otherwise."""
    return 0 if api.serving else 1


def _when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if at is not None else ""


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _what(value: StepStatus) -> str:
    text = value.error if value.state is StepState.FAILED and value.error else value.detail or ""
    if value.state is StepState.PENDING:
        text = text or "not started"
    progress = value.progress
    if progress is not None and progress.percent is not None:
        assert progress.done_bytes is not None
        assert progress.total_bytes is not None
        done, total = _mib(progress.done_bytes), _mib(progress.total_bytes)
        text += f" ({progress.percent}%, {done} of {total})"
    if value.state is StepState.ACTIVE and value.error:
        text += f" (last try: {value.error})"
    return text


def _api_line(api: ApiAnswer) -> str:
    if api.status_code is None:
        return (
            f"local API: no answer from {api.url} ({api.detail}): the agent is not running, "
            "or still starting"
        )
    line = f"local API: {api.url} answered {api.status_code}"
    if api.status:
        line += f" ({api.status})"
    if api.detail:
        line += f": {api.detail}"
    return line


def render(boot: BootFile, api: ApiAnswer) -> list[str]:
    """The text ``status`` prints: each step, the current one, why it is stuck, the API."""
    status = boot.status
    lines: list[str] = []
    if status is None:
        lines.append(f"no first-boot progress: {boot.problem or 'no ' + str(boot.path)}")
    else:
        lines.append(
            f"agent started {_when(status.started_at)}"
            + (f" (pid {status.pid})" if status.pid is not None else "")
            + f"; progress from {boot.path}"
        )
        width = max(len(label) for label in LABELS.values())
        for step in Step:
            value = status.step(step)
            when = _when(value.at)
            row = f"  {_MARKS[value.state]} {LABELS[step]:<{width}}  {_what(value)}"
            lines.append(f"{row}  [{when}]" if when else row)
        current = current_step(status)
        if current is None:
            lines.append("current step: none, every step is done")
        else:
            lines.append(f"current step: {LABELS[current]} ({status.step(current).state.value})")
            reason = stuck_reason(status)
            if reason:
                lines.append(f"why: {reason}")
        if status.last_error and status.last_error != stuck_reason(status):  # said above
            lines.append(f"last error: {status.last_error} [{_when(status.last_error_at)}]")
    lines.append(_api_line(api))
    lines.append("serving" if api.serving else "not serving")
    return lines


def report(boot: BootFile, api: ApiAnswer) -> dict[str, Any]:
    """The same as :func:`render`, for machines (``status --json``)."""
    status = boot.status
    current = current_step(status) if status is not None else None
    return {
        "serving": api.serving,
        "current_step": current.value if current is not None else None,
        "stuck": stuck_reason(status) if status is not None else boot.problem,
        "boot_file": str(boot.path),
        "boot": status.model_dump(mode="json") if status is not None else None,
        "boot_problem": boot.problem,
        "api": {
            "url": api.url,
            "status_code": api.status_code,
            "status": api.status,
            "detail": api.detail,
        },
    }


# --- I/O ------------------------------------------------------------------------------------


def read_boot(path: Path) -> BootFile:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return BootFile(
            path,
            None,
            f"{path} does not exist: the agent has not started yet (or it runs outside a "
            "fleet with no [fleet] state_dir in its config, and keeps no progress file)",
        )
    except PermissionError:
        return BootFile(
            path,
            None,
            f"cannot read {path}: permission denied (run as root or as the agent's user)",
        )
    except OSError as exc:
        return BootFile(path, None, f"cannot read {path}: {exc.strerror or exc}")
    status = load_status(data)
    if status is None:
        return BootFile(path, None, f"{path} is not a boot status file")
    return BootFile(path, status)


def _readyz_detail(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    parts = []
    if body.get("loading"):
        parts.append("loading " + ", ".join(map(str, body["loading"])))
    failed = body.get("failed")
    if isinstance(failed, dict) and failed:
        parts.append("failed " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    degraded = body.get("degraded")
    if isinstance(degraded, list) and degraded:
        names = [str(d.get("model")) for d in degraded if isinstance(d, dict)]
        parts.append("degraded " + ", ".join(names))
    if not parts and isinstance(body.get("models"), list):
        models = body["models"]
        parts.append("serving " + ", ".join(map(str, models)) if models else "no models")
    return "; ".join(parts) or None


def probe_api(
    url: str, *, timeout_s: float = 2.0, transport: httpx.BaseTransport | None = None
) -> ApiAnswer:
    """Ask ``/readyz`` once."""
    try:
        with httpx.Client(timeout=timeout_s, transport=transport) as client:
            response = client.get(url)
    except httpx.HTTPError as exc:
        return ApiAnswer(url, detail=transport_reason(exc))
    try:
        body = response.json()
    except json.JSONDecodeError:
        body = None
    status = body.get("status") if isinstance(body, dict) else None
    return ApiAnswer(
        url,
        response.status_code,
        str(status) if status is not None else None,
        _readyz_detail(body),
    )
