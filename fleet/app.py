"""The controller's FastAPI app: settings in; engine, link and admin token built in the lifespan.

Nothing stateful exists at import time, so tests build as many apps as they like,
each with its own database and a fake link, and the CLI builds exactly one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from fleet.api import ROUTERS
from fleet.api.deps import FleetState
from fleet.api.errors import install_error_handlers
from fleet.api.limits import BodyLimit
from fleet.api.models import is_upload
from fleet.client import ADMIN_TOKEN_FILE
from fleet.config import FleetSettings
from fleet.db import make_engine, migrate
from fleet.errors import ConfigError
from fleet.link.port import LinkPort
from fleet.tables import utc_now
from fleet.tokens import new_admin_token

__all__ = [
    "ADMIN_TOKEN_FILE",
    "LinkFactory",
    "admin_token_path",
    "create_app",
    "load_admin_token",
    "preflight",
]

log = logging.getLogger(__name__)


LinkFactory = Callable[[FleetSettings, Engine], AbstractAsyncContextManager[LinkPort]]


def admin_token_path(data_dir: Path) -> Path:
    return data_dir / ADMIN_TOKEN_FILE


def load_admin_token(settings: FleetSettings) -> str:
    """The configured admin token, or the one in <data_dir>/admin-token (created once, 0600).

    Created with O_EXCL, so replicas sharing a data folder that start together agree
    on one token.
    """
    if settings.admin_token is not None:
        token = settings.admin_token.get_secret_value().strip()
        if len(token) < 16:
            raise ConfigError("admin_token must be at least 16 characters")
        return token
    path = admin_token_path(settings.data_dir)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the admin token file {path}: {exc}") from None
    else:
        with os.fdopen(fd, "w") as out:
            out.write(new_admin_token() + "\n")
        log.info("created the admin token in %s", path)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the admin token file {path}: {exc}") from None
    if not token:
        raise ConfigError(f"the admin token file {path} is empty: delete it to make a new one")
    return token


def _default_link(settings: FleetSettings, engine: Engine) -> AbstractAsyncContextManager[LinkPort]:
    from fleet.link import FleetLink  # the MQTT stack loads only when the app starts

    return FleetLink(settings, engine)


def _prepare(settings: FleetSettings, engine: Engine) -> str:
    """Blocking start-up work: folders, schema, admin token, files settings name."""
    try:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # tokens, keys, hashes
    except OSError as exc:
        raise ConfigError(f"cannot create the data folder {settings.data_dir}: {exc}") from None
    if settings.broker_ca_file is not None and not settings.broker_ca_file.is_file():
        raise ConfigError(f"broker_ca_file {settings.broker_ca_file} does not exist")
    migrate(engine)
    return load_admin_token(settings)


def preflight(settings: FleetSettings) -> None:
    """Do the lifespan's start-up work once, up front, so a CLI can report failures plainly.

    Raises ``ConfigError`` (fix the settings) or ``DatabaseUnavailable`` (retry later).
    """
    engine = make_engine(settings.resolved_database_url)
    try:
        _prepare(settings, engine)
    finally:
        engine.dispose()


def create_app(
    settings: FleetSettings,
    link_factory: LinkFactory | None = None,
    *,
    clock: Callable[[], datetime] = utc_now,
) -> FastAPI:
    """The controller's app; ``link_factory`` defaults to the real MQTT link."""
    factory = link_factory or _default_link

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.resolved_database_url)
        try:
            admin_token = await run_in_threadpool(_prepare, settings, engine)
            async with factory(settings, engine) as link:
                app.state.fleet = FleetState(
                    settings=settings,
                    engine=engine,
                    link=link,
                    admin_token=admin_token,
                    clock=clock,
                )
                yield
        finally:
            engine.dispose()

    app = FastAPI(
        title="edgefleet controller",
        summary="Enroll devices, set what they run, read their telemetry",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, unlimited=is_upload)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
