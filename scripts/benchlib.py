"""Helpers the benchmark scripts share: logging, statistics, tables, facts about the run.

Also the measurements every benchmark takes the same way, so their figures compare: the
CPU and RSS of process trees, the machine's busy CPU time, and the machine description
that goes into each JSON file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
# CPU features the figures depend on: SIMD for llama.cpp's kernels, SHA for hashing.
SIMD_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
CPU_FLAGS = (*SIMD_FLAGS, "sha_ni")


def make_log(prefix: str) -> Callable[[str], None]:
    """A logger to stderr that stamps each line, so progress and results stay apart."""

    def log(message: str) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
        print(f"[{prefix} {stamp}] {message}", file=sys.stderr, flush=True)

    return log


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def tail(path: Path, lines: int = 40) -> str:
    """The end of a log file, for error messages ('' when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def git(*args: str) -> str | None:
    """``git -C REPO *args``'s output, or None when git fails or is missing."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    return (git("rev-parse", "--short", "HEAD") or "").strip() or None


def changed_files() -> list[str] | None:
    """Uncommitted changes under the measured packages: the commit alone may not say it all."""
    out = git("status", "--porcelain", "--", "agent", "fleet", "models")
    return None if out is None else [line[3:] for line in out.splitlines()]


def version_of(command: list[str]) -> str | None:
    """The first line a tool prints about itself (``--version``), None when it cannot run."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else None


# --------------------------------------------------------------------------- processes


def processes(pids: Iterable[int]) -> list[psutil.Process]:
    """The processes of these trees (each pid and its descendants), each once."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in (root, *root.children(recursive=True)):
                found.setdefault(proc.pid, proc)
    return list(found.values())


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU a process used, with its children that have exited: nothing vanishes at exit."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for proc in processes(pids):
        with contextlib.suppress(psutil.Error):
            total += cpu_seconds(proc)
    return total


def tree_rss(pids: Iterable[int]) -> int:
    """Resident memory of these process trees in bytes (0 when they are gone)."""
    total = 0
    for proc in processes(pids):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def machine_cpu() -> tuple[float, float]:
    """CPU seconds all cores spent busy since boot, and the part of it stolen by the host.

    Busy counts steal and not iowait; guest time is already inside user time.
    """
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    busy = sum(t) - idle - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return busy, getattr(t, "steal", 0.0)


# --------------------------------------------------------------------------- machine


def _field(text: str, prefix: str, separator: str) -> str | None:
    line = next((ln for ln in text.splitlines() if ln.startswith(prefix)), None)
    return None if line is None else line.split(separator, 1)[1].strip().strip('"')


def machine_description() -> dict[str, Any]:
    """What a run measured on: CPU, memory, OS, the load at the start and the code's state."""
    cpuinfo = read_text("/proc/cpuinfo")
    flags = set((_field(cpuinfo, "flags", ":") or "").split())
    quota = read_text("/sys/fs/cgroup/cpu.max").split()
    return {
        "cpu_model": _field(cpuinfo, "model name", ":")
        or platform.processor()
        or platform.machine(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "hypervisor": "hypervisor" in flags,
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cgroup_cpu_quota": (
            float(quota[0]) / float(quota[1]) if len(quota) == 2 and quota[0] != "max" else None
        ),
        "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "os": _field(read_text("/etc/os-release"), "PRETTY_NAME=", "=") or platform.platform(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "edgefleet_commit": git_commit(),
        "edgefleet_changed_files": changed_files(),
    }
