"""The controller's FastAPI app: settings in; engine, link, admin token, TUF in the lifespan.

Nothing stateful exists at import time, so tests build as many apps as they like,
each with its own database and a fake link, and the CLI builds exactly one. On first
start the TUF repository is created with every key online (root included, with a
warning to move it offline); every start adds registered artifacts that are not TUF
targets yet, and background tasks renew TUF metadata and desired states before they
expire. Of several replicas on one database, only the one holding the leader lease
(:mod:`fleet.leases`) runs those renewals, the rollout engine, presence and retention.
The work itself is in the services (:mod:`fleet.desired`, :mod:`fleet.registry`); the
routes (:mod:`fleet.api`) only parse and answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from fleet import alerts, dashboard
from fleet.api import ROUTERS, streams_body
from fleet.api.deps import FleetState
from fleet.api.errors import install_error_handlers
from fleet.api.limits import BodyLimit
from fleet.auth.sessions import SessionLimits
from fleet.config import ADMIN_TOKEN_FILE, FleetSettings
from fleet.db import make_engine, migrate
from fleet.desired import DesiredStates
from fleet.errors import ConfigError, Conflict, FleetError
from fleet.files import atomic_write
from fleet.leases import Leadership, LeaseTerms
from fleet.link.port import LinkPort
from fleet.registry.keys import KeyStore
from fleet.registry.registration import add_missing_targets, artifact_store
from fleet.registry.repository import Expiries, TufRepository
from fleet.rollout.engine import RolloutEngine
from fleet.tables import utc_now
from fleet.tokens import new_admin_token
from models.director import sign_desired
from models.wire import DesiredState

__all__ = [
    "ADMIN_TOKEN_FILE",
    "LinkFactory",
    "admin_token_path",
    "create_app",
    "desired_signer",
    "load_admin_token",
    "open_repository",
    "preflight",
]

log = logging.getLogger(__name__)


LinkFactory = Callable[[FleetSettings, Engine], AbstractAsyncContextManager[LinkPort]]


def admin_token_path(data_dir: Path) -> Path:
    return data_dir / ADMIN_TOKEN_FILE


def load_admin_token(settings: FleetSettings) -> str:
    """The configured admin token, or the one in <data_dir>/admin-token (created once, 0600).

    Created exclusively, so replicas sharing a data folder that start together agree
    on one token, and durably, so a power cut never leaves an empty one.
    """
    if settings.admin_token is not None:
        token = settings.admin_token.get_secret_value().strip()
        if len(token) < 16:
            raise ConfigError("admin_token must be at least 16 characters")
        return token
    path = admin_token_path(settings.data_dir)
    if not path.exists():
        try:
            atomic_write(path, f"{new_admin_token()}\n".encode(), exclusive=True)
        except FileExistsError:
            pass  # another replica created it a moment ago: read theirs
        except OSError as exc:
            raise ConfigError(f"cannot create the admin token file {path}: {exc}") from None
        else:
            log.info("created the admin token in %s", path)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the admin token file {path}: {exc}") from None
    if not token:
        raise ConfigError(f"the admin token file {path} is empty: delete it to make a new one")
    return token


def desired_signer(repo: TufRepository) -> Callable[[DesiredState], bytes]:
    """Signs a desired state with the director keys the current TUF root names."""

    def sign(state: DesiredState) -> bytes:
        return sign_desired(state, repo.director_signers())

    return sign


def _default_link(repo: TufRepository, leads: Callable[[], bool]) -> LinkFactory:
    def make(settings: FleetSettings, engine: Engine) -> AbstractAsyncContextManager[LinkPort]:
        from fleet.link import DeviceLink  # the MQTT stack loads only when the app starts

        return DeviceLink(settings, engine, sign_desired=desired_signer(repo), leads=leads)

    return make


def open_repository(settings: FleetSettings) -> TufRepository:
    """The TUF repository the settings name (it may not be initialised yet)."""
    days = 86400.0  # seconds
    expiries = Expiries(
        root=timedelta(seconds=settings.tuf_root_expiry_days * days),
        targets=timedelta(seconds=settings.tuf_targets_expiry_days * days),
        snapshot=timedelta(seconds=settings.tuf_snapshot_expiry_days * days),
        timestamp=timedelta(seconds=settings.tuf_timestamp_expiry_days * days),
    )
    return TufRepository(settings.resolved_tuf_dir, KeyStore(settings.resolved_key_dir), expiries)


def _prepare_tuf(settings: FleetSettings, engine: Engine, now: datetime) -> TufRepository:
    """Create the TUF repository on first start; sign registered artifacts not yet targets."""
    repo = open_repository(settings)
    if not repo.exists():
        try:
            repo.init(now)
        except Conflict:
            pass  # another replica initialised it first
        else:
            log.warning(
                "created the TUF repository in %s with every key online, root included: "
                "move the root key offline (`edgefleet keys rotate root --offline-dir DIR`)",
                repo.path,
            )
    change = add_missing_targets(engine, repo, now)
    if change is not None:
        how = "signed" if change.published else "staged for offline signing"
        log.info("%d registered artifact(s) added as TUF targets, %s", len(change.added), how)
    repo.refresh(now)
    return repo


def _prepare(settings: FleetSettings, engine: Engine, now: datetime) -> tuple[str, TufRepository]:
    """Blocking start-up work: folders, schema, admin token, TUF, files settings name."""
    try:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # tokens, keys, hashes
    except OSError as exc:
        raise ConfigError(f"cannot create the data folder {settings.data_dir}: {exc}") from None
    if settings.broker_ca_file is not None and not settings.broker_ca_file.is_file():
        raise ConfigError(f"broker_ca_file {settings.broker_ca_file} does not exist")
    artifact_store(settings)  # a ConfigError now, not at the first upload (s3, no bucket)
    migrate(engine)
    token = load_admin_token(settings)
    return token, _prepare_tuf(settings, engine, now)


def preflight(settings: FleetSettings) -> None:
    """Do the lifespan's start-up work once, up front, so a CLI can report failures plainly.

    Raises ``ConfigError`` (fix the settings) or ``DatabaseUnavailable`` (retry later).
    """
    engine = make_engine(settings.resolved_database_url)
    try:
        _prepare(settings, engine, utc_now())
    finally:
        engine.dispose()


async def _every(
    interval_s: float, what: str, job: Callable[[], Awaitable[object]], leads: Callable[[], bool]
) -> None:
    """Renew ``what`` every ``interval_s`` while this replica leads, until cancelled.

    A failure is logged and the next round tries again: an expired timestamp or desired
    state would stop devices.
    """
    while True:
        await asyncio.sleep(interval_s)
        if not leads():
            continue
        try:
            renewed = await job()
        except FleetError as exc:
            log.error("cannot renew %s: %s", what, exc)
        except Exception:
            log.exception("cannot renew %s", what)
        else:
            if renewed:
                log.info("renewed %s: %s", what, renewed)


async def _renew(
    repo: TufRepository,
    interval_s: float,
    clock: Callable[[], datetime],
    leads: Callable[[], bool],
) -> None:
    """Re-sign TUF metadata close to expiry, every ``interval_s``, until cancelled."""

    async def renew() -> object:
        return await run_in_threadpool(repo.refresh, clock())

    await _every(interval_s, "TUF metadata", renew, leads)


def create_app(
    settings: FleetSettings,
    link_factory: LinkFactory | None = None,
    *,
    clock: Callable[[], datetime] = utc_now,
) -> FastAPI:
    """The controller's app; ``link_factory`` defaults to the real MQTT link."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.resolved_database_url)
        try:
            admin_token, repo = await run_in_threadpool(_prepare, settings, engine, clock())
            leadership = Leadership(engine, LeaseTerms(ttl_s=settings.leader_lease_s))
            leads = leadership.leads
            factory = link_factory or _default_link(repo, leads)
            async with leadership, factory(settings, engine) as link:
                desired = DesiredStates(engine, link, clock)
                rollouts = RolloutEngine(
                    engine, desired, clock, interval_s=settings.rollout_interval_s, leads=leads
                )
                app.state.fleet = FleetState(
                    settings=settings,
                    engine=engine,
                    link=link,
                    admin_token=admin_token,
                    clock=clock,
                    leadership=leadership,
                    tuf=repo,
                    desired=desired,
                    rollouts=rollouts,
                    sessions=SessionLimits(
                        idle=timedelta(minutes=settings.session_idle_minutes),
                        lifetime=timedelta(hours=settings.session_lifetime_hours),
                    ),
                )
                interval_s = settings.tuf_refresh_interval_s
                renewals = [
                    asyncio.create_task(_renew(repo, interval_s, clock, leads), name="tuf-renew"),
                    asyncio.create_task(
                        _every(interval_s, "desired states", desired.renew, leads),
                        name="desired-renew",
                    ),
                    asyncio.create_task(rollouts.run(), name="rollouts"),
                    asyncio.create_task(alerts.watch(engine, settings, clock, repo), name="alerts"),
                    asyncio.create_task(alerts.deliver(engine, settings, clock), name="alert-hook"),
                ]
                try:
                    yield
                finally:
                    for task in renewals:
                        task.cancel()
                    await asyncio.gather(*renewals, return_exceptions=True)
        finally:
            engine.dispose()

    app = FastAPI(
        title="edgefleet controller",
        summary="Enroll devices, set what they run, read their telemetry",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, unlimited=streams_body, timeout_s=settings.body_timeout_s)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    dashboard.install(app)
    return app
