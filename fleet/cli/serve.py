"""'edgefleet serve': run the controller (REST API, enrollment, MQTT link, embedded broker)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.output import fleet_errors, settings_from

__all__ = ["serve"]

LOG_LEVELS = {"debug", "info", "warning", "error", "critical"}


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
    broker_auth_format: Annotated[
        str | None,
        typer.Option(help="the broker's users as 'mosquitto' (default) or 'nats' files"),
    ] = None,
    broker_pid_file: Annotated[
        Path | None,
        typer.Option(help="pid file (or a pattern, for a cluster) to SIGHUP after auth changes"),
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

    if log_level.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"unknown level {log_level!r}", param_hint="--log-level")
    settings = settings_from(
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
            "broker_auth_format": broker_auth_format,
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
    with fleet_errors():  # a settings problem exits 2; a database that is down, 1
        preflight(settings)  # folders, database and migrations, admin token: fail plainly here
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
