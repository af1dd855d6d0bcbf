"""The image's SBOM: Debian components merged into cyclonedx-py's BOM, reproducibly.

The merge is pure and tested here directly; the tests that run ``cyclonedx-py`` start a
process and are marked ``integration``.
"""

from __future__ import annotations

import json
import venv
from pathlib import Path
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from fleet.errors import ImageRejected
from fleet.images.inventory import DebianPackage, PythonPackage
from fleet.images.sbom import debian_component, merge_sbom, sbom_bytes, write_sbom

DEBIAN = [
    DebianPackage(name="libc6", version="2.36-9+deb12u10", arch="amd64"),
    DebianPackage(name="bash", version="5.2.15-2+b7", arch="amd64"),
    DebianPackage(name="systemd", version="1:252.38-1~deb12u1", arch="amd64"),
]
PYTHON = [
    PythonPackage(name="pydantic", version="2.14.3"),
    PythonPackage(name="annotated-types", version="0.7.0"),
]
PYTHON_BOM: dict[str, Any] = {
    "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
    "bomFormat": "CycloneDX",
    "specVersion": "1.6",
    "version": 1,
    "components": [
        {
            "bom-ref": "requirements-L1",
            "name": "annotated-types",
            "purl": "pkg:pypi/annotated-types@0.7.0",
            "type": "library",
            "version": "0.7.0",
        }
    ],
    "dependencies": [{"ref": "requirements-L1"}],
    "metadata": {"properties": [{"name": "cdx:reproducible", "value": "true"}]},
}


def _valid(raw: bytes) -> None:
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(raw.decode())
    assert error is None, str(error)


def test_a_debian_component_has_a_deb_purl() -> None:
    component = debian_component(DEBIAN[2], "debian-12")
    assert component["name"] == "systemd"
    assert component["version"] == "1:252.38-1~deb12u1"
    assert component["purl"] == (
        "pkg:deb/debian/systemd@1:252.38-1~deb12u1?arch=amd64&distro=debian-12"
    )
    assert component["bom-ref"] == component["purl"]
    plus = debian_component(DEBIAN[0], "ubuntu-22.04")["purl"]
    assert plus == "pkg:deb/ubuntu/libc6@2.36-9%2Bdeb12u10?arch=amd64&distro=ubuntu-22.04"


def test_merge_adds_debian_components_and_the_image() -> None:
    before = json.dumps(PYTHON_BOM)
    bom = merge_sbom(PYTHON_BOM, DEBIAN, name="x86-generic", version="2025.6.1", distro="debian-12")
    assert json.dumps(PYTHON_BOM) == before  # the input is left alone
    names = [c["name"] for c in bom["components"]]
    assert names == ["annotated-types", "bash", "libc6", "systemd"]
    assert all(c["version"] and c["purl"] for c in bom["components"])
    refs = {d["ref"] for d in bom["dependencies"]}
    assert refs == {c["bom-ref"] for c in bom["components"]}
    assert bom["metadata"]["component"] == {
        "bom-ref": "edgefleet-image:x86-generic@2025.6.1",
        "name": "x86-generic",
        "type": "firmware",
        "version": "2025.6.1",
    }
    _valid(sbom_bytes(bom))
    again = merge_sbom(
        PYTHON_BOM,
        list(reversed(DEBIAN)),
        name="x86-generic",
        version="2025.6.1",
        distro="debian-12",
    )
    assert sbom_bytes(again) == sbom_bytes(bom)


@pytest.mark.integration
def test_an_sbom_from_a_package_list_is_reproducible_and_valid(tmp_path: Path) -> None:
    first, second = tmp_path / "a.cdx.json", tmp_path / "b.cdx.json"
    for out, python in ((first, PYTHON), (second, list(reversed(PYTHON)))):
        write_sbom(
            python,
            DEBIAN,
            out,
            name="x86-generic",
            version="2025.6.1",
            source_date_epoch=1_700_000_000,
        )
    raw = first.read_bytes()
    assert raw == second.read_bytes()
    _valid(raw)
    bom = json.loads(raw)
    assert "serialNumber" not in bom
    assert bom["metadata"]["timestamp"] == "2023-11-14T22:13:20+00:00"
    assert bom["metadata"]["component"]["type"] == "firmware"
    by_purl = {c["purl"]: c for c in bom["components"]}
    assert by_purl["pkg:pypi/pydantic@2.14.3"]["version"] == "2.14.3"
    assert by_purl["pkg:pypi/annotated-types@0.7.0"]["name"] == "annotated-types"
    assert "pkg:deb/debian/bash@5.2.15-2%2Bb7?arch=amd64&distro=debian-12" in by_purl
    assert len(by_purl) == len(PYTHON) + len(DEBIAN)
    assert (first.stat().st_mode & 0o777) == 0o644


@pytest.mark.integration
def test_an_sbom_without_an_epoch_has_no_timestamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")  # the caller's environment is not used
    write_sbom(PYTHON, [], tmp_path / "s.json", name="x", version="1")
    assert "timestamp" not in json.loads((tmp_path / "s.json").read_bytes())["metadata"]


@pytest.mark.integration
def test_an_sbom_from_a_python_environment_lists_its_packages(tmp_path: Path) -> None:
    venv_dir = tmp_path / "venv"
    venv.create(venv_dir, with_pip=False)
    (site,) = venv_dir.glob("lib/python3*/site-packages")
    dist = site / "pydantic-2.14.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pydantic\nVersion: 2.14.3\n")
    out = tmp_path / "env.cdx.json"
    write_sbom(venv_dir / "bin" / "python", DEBIAN, out, name="x86-generic", version="1")
    bom = json.loads(out.read_bytes())
    names = {c["name"]: c for c in bom["components"]}
    assert set(names) == {"pydantic", "bash", "libc6", "systemd"}
    assert names["pydantic"]["version"] == "2.14.3"
    assert names["pydantic"]["purl"] == "pkg:pypi/pydantic@2.14.3"


@pytest.mark.integration
def test_a_failing_cyclonedx_py_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ImageRejected, match="cyclonedx-py failed"):
        write_sbom(tmp_path / "no-python", [], tmp_path / "s.json", name="x", version="1")
    assert not (tmp_path / "s.json").exists()
