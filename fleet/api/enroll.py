"""POST /api/v1/enroll: a device trades an enrollment token for an identity and broker login.

The only unauthenticated write. The order of checks matters:

1. the proof (signature over token, key and timestamp; timestamp fresh), pure and
   before any database work;
2. the token, looked up by the SHA-256 of its secret;
3. the key: if it already belongs to a device, this is a *replay* (the device lost
   the response, or re-provisions itself): the same device gets a fresh broker
   password and no token use is spent. A revoked device's key is refused for good;
4. one use is spent by a conditional ``UPDATE ... WHERE uses_left > 0``, in the same
   transaction that creates the device, so two devices racing for the last use of
   a token cannot both win, on SQLite or PostgreSQL.

The broker's credentials are synced before the response goes out, so the device can
connect at once. If that sync fails the device is enrolled but told 503; its retry
is a replay and gets a working password.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

from fastapi import APIRouter
from sqlalchemy import Engine, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from fleet.api.deps import StateDep
from fleet.api.present import token_view
from fleet.config import FleetSettings
from fleet.errors import ConfigError, EnrollmentRejected
from fleet.link.passwords import hash_password, new_password
from fleet.tables import Device, EnrollmentToken
from fleet.tokens import check_token, hash_secret
from models.paths import ENROLL_PATH
from models.topics import validate_device_id
from models.trust import TrustError, verify_enrollment
from models.wire import BrokerCredentials, EnrollmentRequest, EnrollmentResponse

__all__ = ["new_device_id", "router"]

router = APIRouter(tags=["enrollment"])

_ATTEMPTS = 3  # a unique-key race resolves on the second pass; the third is headroom


def new_device_id() -> str:
    return validate_device_id("dev-" + secrets.token_hex(8))


@dataclass(frozen=True)
class _Enrolled:
    device_id: str
    password: str
    replay: bool


def _spend_one_use(session: Session, token: EnrollmentToken, now: datetime) -> None:
    """Atomically take one use of ``token``, or raise why it cannot be taken."""
    t = EnrollmentToken
    spent = session.exec(
        update(t)
        .where(
            col(t.id) == token.id,
            col(t.uses_left) > 0,
            col(t.revoked_at).is_(None),
            or_(col(t.expires_at).is_(None), col(t.expires_at) > now),
        )
        .values(uses_left=col(t.uses_left) - 1)
        .execution_options(synchronize_session=False)
    )
    if spent.rowcount == 1:
        return
    session.rollback()
    session.refresh(token)  # someone else changed it since we read it: say what happened
    check_token(token_view(token), now)
    raise EnrollmentRejected(f"enrollment token {token.id} is used up")


def _re_enroll(
    session: Session,
    device: Device,
    token: EnrollmentToken,
    request: EnrollmentRequest,
    now: datetime,
) -> _Enrolled:
    if device.revoked_at is not None:
        raise EnrollmentRejected(
            f"this key belongs to device {device.id}, which was revoked: "
            "a revoked device cannot enroll again with the same key"
        )
    if token.id != device.token_id:
        check_token(token_view(token), now)  # another token must still be valid
    password = new_password()
    device.mqtt_password_hash = hash_password(password)
    device.agent_version = request.agent_version
    device.device_report = request.device.model_dump(mode="json")
    session.add(device)
    session.commit()
    return _Enrolled(device.id, password, replay=True)


def _enroll_once(engine: Engine, request: EnrollmentRequest, now: datetime) -> _Enrolled:
    with Session(engine, expire_on_commit=False) as session:
        token = session.exec(
            select(EnrollmentToken).where(
                col(EnrollmentToken.secret_sha256) == hash_secret(request.token)
            )
        ).first()
        if token is None:
            raise EnrollmentRejected("unknown enrollment token: check it was copied whole")
        existing = session.exec(
            select(Device).where(col(Device.public_key) == request.public_key)
        ).first()
        if existing is not None:
            return _re_enroll(session, existing, token, request, now)
        check_token(token_view(token), now)
        group = token.group
        _spend_one_use(session, token, now)
        password = new_password()
        device = Device(
            id=new_device_id(),
            name=request.name,
            group=group,
            public_key=request.public_key,
            token_id=token.id,
            mqtt_password_hash=hash_password(password),
            agent_version=request.agent_version,
            device_report=request.device.model_dump(mode="json"),
            enrolled_at=now,
        )
        session.add(device)
        session.commit()
        return _Enrolled(device.id, password, replay=False)


def _enroll(engine: Engine, request: EnrollmentRequest, now: datetime) -> _Enrolled:
    for attempt in range(_ATTEMPTS):
        try:
            return _enroll_once(engine, request, now)
        except IntegrityError:
            # The same key enrolled concurrently (the next pass sees it: a replay), or
            # a device id collided (the next pass draws another). The use was rolled back.
            if attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _ca_pem(settings: FleetSettings) -> str | None:
    if settings.broker_ca_file is None:
        return None
    try:
        return settings.broker_ca_file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read broker_ca_file {settings.broker_ca_file}: {exc}") from None


@router.post(ENROLL_PATH, response_model=EnrollmentResponse)
async def enroll(request: EnrollmentRequest, state: StateDep) -> EnrollmentResponse:
    """Enroll a device (or re-enroll its key); no admin token: the enrollment token is the key."""
    now = state.clock()
    try:
        verify_enrollment(request, now)
    except TrustError as exc:
        raise EnrollmentRejected(f"enrollment proof rejected: {exc}") from None
    enrolled = await run_in_threadpool(_enroll, state.engine, request, now)
    ca_pem = await run_in_threadpool(_ca_pem, state.settings)
    tuf_root = await run_in_threadpool(state.tuf.root_json)
    await state.link.sync_auth()
    settings = state.settings
    return EnrollmentResponse(
        device_id=enrolled.device_id,
        broker=BrokerCredentials(
            url=settings.resolved_broker_public_url,
            username=enrolled.device_id,
            password=enrolled.password,
            client_id=enrolled.device_id,
            ca_pem=ca_pem,
        ),
        telemetry_interval_s=settings.telemetry_interval_s,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        tuf_root=tuf_root.decode(),
    )
