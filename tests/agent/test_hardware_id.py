"""The hardware id: DMI product UUID or Jetson serial number, placeholders skipped."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.hardware_id import DMI_UUID, DT_SERIAL, hardware_id, read_hardware_id
from models.trust import sign_enrollment
from models.wire import EnrollmentRequest
from tests.agent.test_link_session import DEVICE_REPORT

UUID = "4c4c4544-0042-3510-8052-b4c04f565631"


def test_the_dmi_uuid_comes_first_and_is_stripped() -> None:
    assert hardware_id(f"{UUID}\n", "1422919082742") == UUID


def test_a_jetson_serial_number_is_used_without_its_nul() -> None:
    assert hardware_id(None, "1422919082742\x00") == "1422919082742"


@pytest.mark.parametrize(
    "placeholder",
    [
        "00000000-0000-0000-0000-000000000000",
        "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "Not Settable",
        "Not Specified",
        "Default string",
        "To Be Filled By O.E.M.",
        "03000200-0400-0500-0006-000700080009",
        "",
        "   \n",
        "short",  # the wire wants 8 characters at least
        "x" * 129,  # and at most 128
        "bad\x01id-with-control",
    ],
)
def test_placeholders_identify_nothing(placeholder: str) -> None:
    assert hardware_id(placeholder, None) is None
    assert hardware_id(placeholder, "1422919082742") == "1422919082742"  # next source


def test_nothing_readable_is_none() -> None:
    assert hardware_id(None, None) is None


def test_every_id_it_returns_fits_the_enrollment_request() -> None:
    request = sign_enrollment(
        Ed25519PrivateKey.generate(),
        "eft_token",
        name="edge-1",
        agent_version="0.1.0",
        device=DEVICE_REPORT,
        now=datetime.now(UTC),
    )
    for value in (UUID, "1422919082742", "x" * 128, "12345678", " padded-serial \n"):
        found = hardware_id(value, None)
        assert found is not None
        data = {**request.model_dump(mode="json"), "hardware_id": found}
        assert EnrollmentRequest.model_validate(data).hardware_id == value.strip()


def write(root: Path, relative: str, data: bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_the_reader_looks_under_the_root_it_is_given(tmp_path: Path) -> None:
    assert read_hardware_id(tmp_path) is None
    write(tmp_path, DT_SERIAL, b"1422919082742\x00")
    assert read_hardware_id(tmp_path) == "1422919082742"
    write(tmp_path, DMI_UUID, f"{UUID}\n".encode())
    assert read_hardware_id(tmp_path) == UUID
    write(tmp_path, DMI_UUID, b"00000000-0000-0000-0000-000000000000\n")
    assert read_hardware_id(tmp_path) == "1422919082742"


def test_an_unreadable_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / DMI_UUID).mkdir(parents=True)  # reading a folder fails like a root-only file
    write(tmp_path, DT_SERIAL, b"1422919082742\x00")
    assert read_hardware_id(tmp_path) == "1422919082742"
