"""A provisioned broker CA beats the one enrollment sent (trust anchors over first use).

The end-to-end check against a real Mosquitto on TLS is in test_link_tls.py.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.errors import ConfigError
from agent.link.session import BrokerAddress, load_broker_ca, tls_context
from tests.agent.test_link_tls import make_ca, pem

TLS = BrokerAddress("broker.example", 8883, tls=True)
PLAIN = BrokerAddress("broker.example", 1883, tls=False)


def ca_pem() -> tuple[str, bytes]:
    """A CA's PEM, and its DER (what an SSL context lists)."""
    _, cert = make_ca()
    return pem(cert).decode(), cert.public_bytes(serialization.Encoding.DER)


def test_the_provisioned_ca_wins_over_the_enrolled_one() -> None:
    provisioned, provisioned_der = ca_pem()
    enrolled, enrolled_der = ca_pem()
    context = tls_context(TLS, provisioned, enrolled)
    assert context is not None
    assert context.get_ca_certs(binary_form=True) == [provisioned_der]
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    fallback = tls_context(TLS, None, enrolled)
    assert fallback is not None
    assert fallback.get_ca_certs(binary_form=True) == [enrolled_der]


def test_plain_mqtt_needs_no_context_and_no_ca_means_the_systems() -> None:
    provisioned, _ = ca_pem()
    assert tls_context(PLAIN, provisioned, None) is None
    system = tls_context(TLS, None, None)
    assert system is not None
    assert system.verify_mode is ssl.CERT_REQUIRED


def test_a_provisioned_ca_file_is_checked_when_read(tmp_path: Path) -> None:
    good, _ = ca_pem()
    path = tmp_path / "broker-ca.pem"
    path.write_text(good)
    assert load_broker_ca(path) == good
    path.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="is not a PEM certificate"):
        load_broker_ca(path)
    with pytest.raises(ConfigError, match="cannot read the broker CA"):
        load_broker_ca(tmp_path / "absent.pem")
