"""``edgefleet simulate``: run N simulated devices against a controller, from one process.

:func:`simulate` is a plain typer command; :mod:`fleet.cli.simulate` registers it lazily so
the controller's own commands do not import aiomqtt. It raises the open-files
limit (one socket per device), runs a :class:`~fleet.simulate.runner.Simulation`
on one asyncio loop with a rich progress display, stops cleanly on Ctrl-C or
SIGTERM (a second Ctrl-C aborts), and prints a summary. The exit status is 0 when
every device enrolled and connected, 1 otherwise.

``--model``, ``--regress`` and ``--hardware`` take text that :mod:`.regress` and
:mod:`.hardware` parse; a mistake is a usage error naming the bad part.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleet.simulate.hardware import HARDWARE, HardwareMix
from fleet.simulate.regress import ModelRef, RegressionRules
from fleet.simulate.runner import (
    DEFAULT_AGENT_VERSION,
    NoToken,
    Simulation,
    SimulationConfig,
    SimulationStats,
)
from fleet.simulate.update import ServedModel

__all__ = [
    "parse_hardware",
    "parse_models",
    "parse_regressions",
    "parse_shard",
    "raise_open_files_limit",
    "simulate",
]


def raise_open_files_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (capped by the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


def parse_shard(value: str) -> tuple[int, int]:
    """``"I/K"`` as (I, K): this process runs every K-th device, starting at index I."""
    try:
        shard, shards = (int(part) for part in value.split("/"))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not like 0/2") from None
    if shards < 1 or not 0 <= shard < shards:
        raise typer.BadParameter(f"{value!r}: need 0 <= I < K")
    return shard, shards


def parse_models(values: list[str] | None) -> tuple[ServedModel, ...]:
    """``--model NAME@VERSION[/VARIANT]`` options as the models every device starts with."""
    try:
        models = tuple(ServedModel.initial(ModelRef.parse(value)) for value in values or ())
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    names = [model.name for model in models]
    if len(set(names)) != len(names):
        raise typer.BadParameter("one version of each model", param_hint="--model")
    return models


def parse_regressions(values: list[str] | None) -> RegressionRules:
    """``--regress`` options as rules."""
    try:
        return RegressionRules.parse(values or ())
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--regress") from None


def parse_hardware(values: list[str] | None) -> HardwareMix | None:
    """``--hardware`` options as a mix; None (the default mix) without any."""
    if not values:
        return None
    try:
        return HardwareMix.parse(values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--hardware") from None


def simulate(
    devices: Annotated[int, typer.Option(min=1, help="Simulated devices (all shards together).")],
    token: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_SIM_TOKEN",
            help="Enrollment token with --uses of at least --devices; only needed for "
            "devices not already enrolled in --state-dir.",
        ),
    ] = None,
    fleet_url: Annotated[
        str, typer.Option(help="The controller's API, where devices enroll.")
    ] = "http://127.0.0.1:8000",
    interval: Annotated[
        float, typer.Option(min=0.05, help="Seconds between one device's telemetry samples.")
    ] = 5.0,
    duration: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Stop after this many seconds of running (default: Ctrl-C); 0: only enroll.",
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Keep identities here; later runs reuse them instead of enrolling."),
    ] = None,
    broker_url: Annotated[
        str | None,
        typer.Option(help="Connect here instead of the broker URL the controller hands out."),
    ] = None,
    shard: Annotated[
        str,
        typer.Option(help="I/K: run every K-th device from index I (one process per shard)."),
    ] = "0/1",
    enroll_concurrency: Annotated[
        int, typer.Option(min=1, help="Enrollment requests in flight.")
    ] = 8,
    connect_concurrency: Annotated[int, typer.Option(min=1, help="MQTT connects in flight.")] = 100,
    gpu_share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of devices with a GPU.")
    ] = 0.3,
    seed: Annotated[int, typer.Option(help="Fixes device profiles and telemetry draws.")] = 0,
    hardware: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PROFILES",
            help="Hardware profiles instead of --gpu-share, NAME or NAME:WEIGHT, round-robin "
            f"by weight, comma-separated or repeated: {', '.join(HARDWARE)}.",
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME@VERSION",
            help="NAME@VERSION (or NAME@VERSION/VARIANT) every device serves before a "
            "desired state says otherwise; repeatable.",
        ),
    ] = None,
    regress: Annotated[
        list[str] | None,
        typer.Option(
            metavar="RULE",
            help="NAME@VERSION(/VARIANT):EFFECT,... makes that version worse while served: "
            "latency=F, tps=F, errors=R, fallbacks=R, golden=fail, install=fail, restart; "
            "repeatable.",
        ),
    ] = None,
    update_time: Annotated[
        float, typer.Option(min=0.0, help="Seconds one update takes (0: at once).")
    ] = 0.2,
    update_jitter: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Each update takes --update-time x (1 ± F).")
    ] = 0.5,
    agent_version: Annotated[
        str, typer.Option(help="The agent version devices report.")
    ] = DEFAULT_AGENT_VERSION,
    stats_file: Annotated[
        Path | None, typer.Option(help="Rewrite a JSON snapshot of the counters here every second.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress display, only the summary.")] = False,
) -> None:
    """Simulate a fleet: N devices enroll, connect over MQTT and report telemetry."""
    first, shards = parse_shard(shard)
    config = SimulationConfig(
        hardware=parse_hardware(hardware),
        models=parse_models(model),
        regressions=parse_regressions(regress),
        update_s=update_time,
        update_jitter=update_jitter,
        devices=devices,
        fleet_url=fleet_url,
        token=token,
        interval_s=interval,
        duration_s=duration,
        state_dir=state_dir,
        broker_url=broker_url,
        shard=first,
        shards=shards,
        enroll_concurrency=enroll_concurrency,
        connect_concurrency=connect_concurrency,
        gpu_share=gpu_share,
        seed=seed,
        agent_version=agent_version,
        stats_file=stats_file,
    )
    raise_open_files_limit(len(config.indices) * 2 + 256)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True)
    try:
        stats = asyncio.run(_main(config, console, quiet=quiet))
    except NoToken as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    _summary(Console(), stats)
    counters = stats.counters
    connected_enough = config.duration_s == 0 or counters.ever_connected >= stats.devices
    if stats.enroll_failed or not connected_enough:
        raise typer.Exit(1)


async def _main(config: SimulationConfig, console: Console, *, quiet: bool) -> SimulationStats:
    simulation = Simulation(config)
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        simulation.stop()
        loop.remove_signal_handler(signum)  # a second Ctrl-C aborts the default way
        console.print(f"[yellow]{signal.Signals(signum).name}: disconnecting devices...[/yellow]")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    run = asyncio.create_task(simulation.run())
    if quiet or not console.is_terminal:
        return await run
    with Progress(
        TextColumn("{task.description:<11}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        stats = simulation.stats
        enrolling = progress.add_task("enrolled", total=None, note="", visible=False)
        connecting = progress.add_task("connected", total=stats.devices, note="")
        last_published, last_time = 0, time.monotonic()
        while not run.done():
            to_enroll = stats.enrolled + stats.enroll_failed + stats.enroll_pending
            if to_enroll:
                failed = f"[red]{stats.enroll_failed} failed[/red]" if stats.enroll_failed else ""
                progress.update(
                    enrolling,
                    total=to_enroll,
                    completed=stats.enrolled + stats.enroll_failed,
                    note=failed,
                    visible=True,
                )
            counters = stats.counters
            now = time.monotonic()
            rate = (counters.published - last_published) / max(now - last_time, 1e-6)
            last_published, last_time = counters.published, now
            progress.update(
                connecting,
                completed=counters.connected,
                note=f"{stats.phase}, {counters.published} samples ({rate:.0f}/s)",
            )
            await asyncio.wait([run], timeout=0.5)
    return await run


def _summary(console: Console, stats: SimulationStats) -> None:
    counters = stats.counters
    elapsed = time.time() - (stats.running_since or stats.started_at)
    table = Table(title="simulation summary", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("devices", stats.devices),
        ("identities reused", stats.reused),
        ("enrolled now", stats.enrolled),
        ("enrollment failed", stats.enroll_failed),
        ("connected (at least once)", counters.ever_connected),
        ("failed (never connected)", stats.devices - counters.ever_connected),
        ("gave up (credentials refused)", counters.gave_up),
        ("connections lost", counters.disconnects),
        ("telemetry published", counters.published),
        ("telemetry per second", f"{counters.published / max(elapsed, 1e-6):.1f}"),
        ("publish failures", counters.publish_failed),
        ("reported states", counters.reports),
        ("desired states", counters.desired),
        ("commands", counters.commands),
        ("events", counters.events),
        ("updates started", counters.updates_started),
        ("updated (healthy)", counters.updated),
        ("rolled back", counters.rolled_back),
        ("install failed", counters.update_failed),
        ("superseded", counters.superseded),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    for reason, count in counters.errors.most_common(5):
        table.add_row(f"error: {reason[:60]}", str(count))
    for reason, count in sorted(stats.enroll_errors.items(), key=lambda kv: -kv[1])[:5]:
        table.add_row(f"enroll: {reason[:60]}", str(count))
    console.print(table)
