"""POST /api/v1/enroll and /api/v1/enroll/check: devices trade an enrollment token for an identity.

The only unauthenticated routes. The order of checks matters:

1. the proof (signature over token, key and timestamp; timestamp fresh), pure and
   before any database work;
2. the token, looked up by the SHA-256 of its secret;
3. what the request does, decided by :func:`fleet.tokens.plan_enrollment` from the
   token and the devices that already hold its key or its hardware id: a new device,
   a *replay* of a known key (a fresh broker password, no use spent), or a *re-flash*
   (a known board with a new key: the same device takes the key, a use is spent), or a
   refusal with its reason;
4. a use is spent by a conditional ``UPDATE ... WHERE uses_left > 0``, in the same
   transaction that writes the device, so two devices racing for the last use of a
   token cannot both win, on SQLite or PostgreSQL. A re-flash moves the key by a
   conditional ``UPDATE ... WHERE public_key = <the key it read>``, so two racing
   re-flashes of one board cannot both act on the old key; the loser starts over and
   sees what the winner did. A unique key or hardware id settles racing inserts the
   same way.

The broker's credentials are synced before the response goes out, so the device can
connect at once and a re-flashed device's old password stops working. If that sync
fails the device is enrolled but told 503; its retry is a replay and gets a working
password.

``/enroll/check`` runs step 2 alone and spends nothing: provisioning asks it before
writing a token into an image, so a bad token or an unreachable fleet shows on the
operator's bench instead of at the device's first boot. It answers what the image
needs besides the token: the fleet's TUF root and how to reach the broker.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import ColumnElement, Engine, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from fleet import audit
from fleet.api.deps import StateDep, client_address
from fleet.api.present import token_view
from fleet.config import FleetSettings
from fleet.errors import ConfigError, Conflict, EnrollmentRejected
from fleet.link.passwords import hash_bcrypt, hash_password, new_password
from fleet.tables import Device, EnrollmentToken, EventRow
from fleet.tokens import EnrollmentAction, check_token, hash_secret, plan_enrollment
from models.paths import ENROLL_PATH, PROVISION_CHECK_PATH
from models.topics import validate_device_id
from models.trust import TrustError, verify_enrollment
from models.wire import (
    BrokerCredentials,
    EnrollmentRequest,
    EnrollmentResponse,
    ProvisionCheckRequest,
    ProvisionCheckResponse,
)

__all__ = ["new_device_id", "router"]

router = APIRouter(tags=["enrollment"])

_ATTEMPTS = 3  # a race resolves on the second pass; the third is headroom
REFLASH_EVENT = "reflashed"  # the device event a re-flash leaves in the device's history
REFLASH_ACTION = "device.reflash"  # and its audit entry


def new_device_id() -> str:
    return validate_device_id("dev-" + secrets.token_hex(8))


@dataclass(frozen=True)
class _Enrolled:
    device_id: str
    password: str


@dataclass(frozen=True)
class _Login:
    """A fresh broker password, and its hashes as the device's row keeps them."""

    password: str
    mqtt_password_hash: str  # for Mosquitto and the embedded broker
    mqtt_password_bcrypt: str  # for nats-server

    @classmethod
    def new(cls) -> _Login:
        password = new_password()
        return cls(password, hash_password(password), hash_bcrypt(password))

    def columns(self) -> dict[str, str]:
        return {
            "mqtt_password_hash": self.mqtt_password_hash,
            "mqtt_password_bcrypt": self.mqtt_password_bcrypt,
        }


class _Raced(Exception):
    """Another request changed the device since it was read: start over."""


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


def _token(session: Session, secret: str) -> EnrollmentToken | None:
    return session.exec(
        select(EnrollmentToken).where(col(EnrollmentToken.secret_sha256) == hash_secret(secret))
    ).first()


def _still(device: Device, key: str) -> list[ColumnElement[bool]]:
    """The device as it was read: not revoked, holding ``key`` (else someone raced us)."""
    return [
        col(Device.id) == device.id,
        col(Device.public_key) == key,
        col(Device.revoked_at).is_(None),
    ]


def _replay(session: Session, device: Device, request: EnrollmentRequest) -> _Enrolled:
    login = _Login.new()
    values: dict[str, Any] = {
        **login.columns(),
        "agent_version": request.agent_version,
        "device_report": request.device.model_dump(mode="json"),
    }
    if request.hardware_id is not None:
        values["hardware_id"] = request.hardware_id  # the plan checked no other device has it
    updated = session.exec(
        update(Device)
        .where(*_still(device, request.public_key))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if updated.rowcount != 1:
        session.rollback()
        raise _Raced
    session.commit()
    return _Enrolled(device.id, login.password)


def _reflash(
    session: Session,
    device: Device,
    token: EnrollmentToken,
    request: EnrollmentRequest,
    now: datetime,
    source: str,
) -> _Enrolled:
    """The same device takes the new key and a new password; its old ones stop working."""
    _spend_one_use(session, token, now)
    login = _Login.new()
    old_key = device.public_key
    moved = session.exec(
        update(Device)
        .where(*_still(device, old_key))
        .values(
            **login.columns(),
            public_key=request.public_key,
            token_id=token.id,  # so a lost response's retry is a replay, as for a new device
            agent_version=request.agent_version,
            device_report=request.device.model_dump(mode="json"),
        )
        .execution_options(synchronize_session=False)
    )
    if moved.rowcount != 1:
        session.rollback()  # gives the use back
        raise _Raced
    details = {"token": token.id, "old_key": old_key, "new_key": request.public_key}
    session.add(
        EventRow(
            device_id=device.id,
            event_id=uuid.uuid4().hex,
            ts=now,
            kind=REFLASH_EVENT,
            severity="info",
            message="re-enrolled after re-flash: new key, new broker password",
            data=details,
            stored_at=now,
        )
    )
    audit.record(
        session,
        at=now,
        actor=f"token:{token.id}",
        action=REFLASH_ACTION,
        subject=f"device:{device.id}",
        reason="re-enrolled after re-flash",
        data={**details, "hardware_id": request.hardware_id},
        source=source,
    )
    session.commit()
    return _Enrolled(device.id, login.password)


def _new_device(
    session: Session, token: EnrollmentToken, request: EnrollmentRequest, now: datetime
) -> _Enrolled:
    group = token.group
    _spend_one_use(session, token, now)
    login = _Login.new()
    device = Device(
        id=new_device_id(),
        name=request.name,
        group=group,
        public_key=request.public_key,
        hardware_id=request.hardware_id,
        token_id=token.id,
        mqtt_password_hash=login.mqtt_password_hash,
        mqtt_password_bcrypt=login.mqtt_password_bcrypt,
        agent_version=request.agent_version,
        device_report=request.device.model_dump(mode="json"),
        enrolled_at=now,
    )
    session.add(device)
    session.commit()
    return _Enrolled(device.id, login.password)


def _known(session: Session, request: EnrollmentRequest) -> tuple[Device | None, Device | None]:
    """The devices with the request's key and with its hardware id, read in one statement.

    One statement sees one snapshot: read apart, a device enrolled in between could show
    up by its hardware id but not yet by its key, and its own retry would look like a
    re-flash.
    """
    d = Device
    match = col(d.public_key) == request.public_key
    if request.hardware_id is not None:
        match = match | (col(d.hardware_id) == request.hardware_id)
    found = session.exec(select(d).where(match)).all()
    by_key = next((x for x in found if x.public_key == request.public_key), None)
    by_hardware = next(
        (x for x in found if request.hardware_id and x.hardware_id == request.hardware_id), None
    )
    return by_key, by_hardware


def _enroll_once(
    engine: Engine, request: EnrollmentRequest, now: datetime, source: str
) -> _Enrolled:
    with Session(engine, expire_on_commit=False) as session:
        token = _token(session, request.token)
        by_key, by_hardware = _known(session, request)
        plan = plan_enrollment(
            None if token is None else token_view(token),
            now,
            hardware_id=request.hardware_id,
            by_key=by_key,
            by_hardware=by_hardware,
        )
        assert token is not None  # the plan refuses an unknown token
        if plan.action is EnrollmentAction.REPLAY:
            assert by_key is not None
            return _replay(session, by_key, request)
        if plan.action is EnrollmentAction.REFLASH:
            assert by_hardware is not None
            return _reflash(session, by_hardware, token, request, now, source)
        return _new_device(session, token, request, now)


def _enroll(engine: Engine, request: EnrollmentRequest, now: datetime, source: str) -> _Enrolled:
    for attempt in range(_ATTEMPTS):
        try:
            return _enroll_once(engine, request, now, source)
        except (IntegrityError, _Raced) as exc:
            # The same key or hardware enrolled concurrently, a re-flash moved the key
            # first, or a device id collided: the next pass sees what happened (a replay,
            # another re-flash) or draws another id. The use was rolled back.
            if attempt < _ATTEMPTS - 1:
                continue
            if isinstance(exc, _Raced):
                raise Conflict(
                    "the device changed while this request enrolled it, again and again: "
                    "is more than one board enrolling as it?"
                ) from None
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
async def enroll(request: EnrollmentRequest, state: StateDep, http: Request) -> EnrollmentResponse:
    """Enroll a device (re-enroll its key, or its re-flashed board); the token is the key."""
    now = state.clock()
    try:
        verify_enrollment(request, now)
    except TrustError as exc:
        raise EnrollmentRejected(f"enrollment proof rejected: {exc}") from None
    source = f"{client_address(http) or 'unknown'} (enrollment)"
    enrolled = await run_in_threadpool(_enroll, state.engine, request, now, source)
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


def _usable_token(engine: Engine, secret: str, now: datetime) -> EnrollmentToken:
    with Session(engine) as session:
        token = _token(session, secret)
        check_token(None if token is None else token_view(token), now)
        assert token is not None
        return token


@router.post(PROVISION_CHECK_PATH, response_model=ProvisionCheckResponse)
async def check_provisioning(
    request: ProvisionCheckRequest, state: StateDep
) -> ProvisionCheckResponse:
    """Would this token enroll a device now? Spends nothing; answers what an image trusts."""
    now = state.clock()
    token = await run_in_threadpool(_usable_token, state.engine, request.token, now)
    ca_pem = await run_in_threadpool(_ca_pem, state.settings)
    tuf_root = await run_in_threadpool(state.tuf.root_json)
    view = token_view(token)
    return ProvisionCheckResponse(
        token_id=token.id,
        group=token.group,
        uses_left=token.uses_left,
        expires_at=view.expires_at,
        tuf_root=tuf_root.decode(),
        broker_url=state.settings.resolved_broker_public_url,
        broker_ca_pem=ca_pem,
    )
