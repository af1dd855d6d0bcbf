"""mqtts://: the link trusts exactly the CA from its identity (a real Mosquitto on TLS)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.link.fleet import FleetLink
from agent.link.identity import StateDir
from scripts.servers import MOSQUITTO, MosquittoBroker, free_port, wait_port
from tests.agent.link_support import ACL, CONTROLLER, WITHIN_S, mosquitto_hash, write_identity
from tests.agent.test_link_session import DEVICE_REPORT, settings
from tests.fakes.link_host import FakeHost, FakeTelemetry
from tests.polling import eventually

pytestmark = pytest.mark.integration  # a real Mosquitto on TLS

DEVICE = "dev-tls-1"
PASSWORD = "tls-secret"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, str, str]]:
    """Mosquitto with only a TLS listener; yields (broker, its CA PEM, another CA's PEM)."""
    ca_key, ca = make_ca()
    _, stranger = make_ca()
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    root = tmp_path / "tls-broker"
    root.mkdir()
    (root / "ca.pem").write_bytes(pem(ca))
    (root / "server.pem").write_bytes(pem(server))
    (root / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (root / "passwd").write_text(
        f"{CONTROLLER}:{mosquitto_hash('x')}\n{DEVICE}:{mosquitto_hash(PASSWORD)}\n"
    )
    (root / "acl").write_text(ACL.format(controller=CONTROLLER))
    port = free_port()
    lines = [
        f"listener {port} 127.0.0.1",
        f"cafile {root / 'ca.pem'}",
        f"certfile {root / 'server.pem'}",
        f"keyfile {root / 'server.key'}",
        "allow_anonymous false",
        f"password_file {root / 'passwd'}",
        f"acl_file {root / 'acl'}",
        "log_dest none",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    (root / "mosquitto.conf").write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(root / "mosquitto.conf")])
    try:
        wait_port(port)
        broker = MosquittoBroker.__new__(MosquittoBroker)  # only its url and port are used
        broker.port = port
        yield broker, pem(ca).decode(), pem(stranger).decode()
    finally:
        proc.kill()
        proc.wait(10)


# paho-mqtt 2.2 does not close its SSL socket when the handshake fails
# (Client._ssl_wrap_socket); the garbage collector does, with a ResourceWarning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_the_link_speaks_tls_with_the_ca_it_was_given(
    tls_broker: tuple[MosquittoBroker, str, str], tmp_path: Path
) -> None:
    broker, ca_pem, stranger_pem = tls_broker

    async def connect(state_dir: Path, ca: str) -> dict[str, object]:
        identity = write_identity(state_dir, broker, DEVICE, PASSWORD)
        tls = identity.broker.model_copy(
            update={"url": f"mqtts://127.0.0.1:{broker.port}", "ca_pem": ca}
        )
        StateDir(state_dir).save_identity(identity.model_copy(update={"broker": tls}))
        link = FleetLink(settings(state_dir), FakeHost(), FakeTelemetry(), DEVICE_REPORT)
        async with link:
            await eventually(
                lambda: link.status()["connected"] or link.status()["last_error"],
                "a connection or an error",
                within_s=WITHIN_S,
            )
            return link.status()

    trusted = asyncio.run(connect(tmp_path / "trusted", ca_pem))
    assert trusted["connected"]
    assert trusted["broker_url"] == f"mqtts://127.0.0.1:{broker.port}"
    untrusted = asyncio.run(connect(tmp_path / "untrusted", stranger_pem))
    assert not untrusted["connected"]
    assert "certificate" in str(untrusted["last_error"]).lower()


# paho-mqtt 2.2 leaks its SSL socket on a failed handshake (see above)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_provisioned_broker_ca_beats_the_one_enrollment_sent(
    tls_broker: tuple[MosquittoBroker, str, str], tmp_path: Path
) -> None:
    broker, ca_pem, stranger_pem = tls_broker

    async def connect(state_dir: Path, enrolled_ca: str, provisioned_ca: str) -> dict[str, object]:
        identity = write_identity(state_dir, broker, DEVICE, PASSWORD)
        tls = identity.broker.model_copy(
            update={"url": f"mqtts://127.0.0.1:{broker.port}", "ca_pem": enrolled_ca}
        )
        StateDir(state_dir).save_identity(identity.model_copy(update={"broker": tls}))
        ca_file = state_dir.parent / f"{state_dir.name}-broker-ca.pem"
        ca_file.write_text(provisioned_ca)
        link = FleetLink(
            settings(state_dir, broker_ca=ca_file), FakeHost(), FakeTelemetry(), DEVICE_REPORT
        )
        async with link:
            await eventually(
                lambda: link.status()["connected"] or link.status()["last_error"],
                "a connection or an error",
                within_s=WITHIN_S,
            )
            return link.status()

    # enrollment sent a stranger's CA (a man in the middle): the provisioned one still works
    assert asyncio.run(connect(tmp_path / "provisioned", stranger_pem, ca_pem))["connected"]
    # and a provisioned CA is not overruled by whatever enrollment sent
    refused = asyncio.run(connect(tmp_path / "overruled", ca_pem, stranger_pem))
    assert not refused["connected"]
    assert "certificate" in str(refused["last_error"]).lower()
