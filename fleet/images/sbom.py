"""The image's SBOM: CycloneDX 1.6 JSON listing its Python and Debian packages.

The Python part is what ``cyclonedx-py`` (PyPI ``cyclonedx-bom``, the ``images`` extra)
writes, from either a Python environment it can run (``cyclonedx-py environment``:
licences and dependencies included) or a pinned ``name==version`` list (``cyclonedx-py
requirements``: for a venv inside an arm64 root whose Python cannot run on the build
machine; :func:`~fleet.images.inventory.python_packages_from_site` reads that list).
The Debian part is added to it here as components with ``pkg:deb`` package URLs, and
the image itself becomes the BOM's ``metadata.component`` (type ``firmware``).

The output is reproducible: ``--output-reproducible`` drops the random serial number,
and the timestamp is ``SOURCE_DATE_EPOCH`` (or absent), so one build's SBOM is
byte-for-byte another's. :func:`merge_sbom` is pure; :func:`write_sbom` runs the tool.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from packageurl import PackageURL

from fleet.errors import ConfigError, ImageRejected
from fleet.files import PUBLIC_FILE, atomic_write
from fleet.images.inventory import (
    DebianPackage,
    PythonPackage,
    debian_packages_from_status,
    python_packages_from_site,
)

__all__ = [
    "SPEC_VERSION",
    "debian_component",
    "debian_packages_from_status",
    "merge_sbom",
    "python_bom",
    "python_packages_from_site",
    "sbom_bytes",
    "write_sbom",
]

SPEC_VERSION: Final = "1.6"  # pinned, so a newer cyclonedx-py does not change the output
_TIMEOUT_S: Final = 600.0  # cyclonedx-py on a few hundred packages takes seconds


def debian_component(package: DebianPackage, distro: str) -> dict[str, Any]:
    """A CycloneDX component for one Debian package: ``pkg:deb/debian/NAME@VERSION?...``."""
    purl = PackageURL(
        type="deb",
        namespace=distro.split("-", 1)[0],
        name=package.name,
        version=package.version,
        qualifiers={"arch": package.arch, "distro": distro},
    ).to_string()
    return {
        "bom-ref": purl,
        "name": package.name,
        "purl": purl,
        "type": "library",
        "version": package.version,
    }


def merge_sbom(
    python: dict[str, Any],
    debian: Sequence[DebianPackage],
    *,
    name: str,
    version: str,
    distro: str,
) -> dict[str, Any]:
    """``python`` (a cyclonedx-py BOM) with the Debian packages and the image added.

    A new dict; the Debian components follow the Python ones, sorted by name and arch.
    """
    bom = copy.deepcopy(python)  # the input is left as it was
    added = [debian_component(p, distro) for p in sorted(debian, key=lambda p: (p.name, p.arch))]
    bom["components"] = [*bom.get("components", []), *added]
    bom["dependencies"] = [*bom.get("dependencies", []), *({"ref": c["bom-ref"]} for c in added)]
    metadata = bom.setdefault("metadata", {})
    metadata["component"] = {
        "bom-ref": f"edgefleet-image:{name}@{version}",
        "name": name,
        "type": "firmware",
        "version": version,
    }
    return bom


def sbom_bytes(bom: dict[str, Any]) -> bytes:
    """The SBOM as written: indented JSON in the tool's key order, UTF-8, a final newline."""
    return (json.dumps(bom, indent=2, ensure_ascii=False) + "\n").encode()


def _requirements(packages: Sequence[PythonPackage]) -> str:
    lines = sorted({f"{p.name}=={p.version}" for p in packages}, key=str.lower)
    return "".join(f"{line}\n" for line in lines)


def python_bom(
    python: Path | Sequence[PythonPackage], *, source_date_epoch: int | None
) -> dict[str, Any]:
    """What ``cyclonedx-py`` makes of a Python executable (or venv), or of a package list."""
    if importlib.util.find_spec("cyclonedx_py") is None:
        raise ConfigError("cyclonedx-py is not installed: pip install 'edgefleet[images]'")
    command = [sys.executable, "-m", "cyclonedx_py"]
    # --no-validate: write_sbom validates the merged BOM once (schema checks take seconds)
    options = ["--sv", SPEC_VERSION, "--output-reproducible", "--no-validate", "--of", "JSON"]
    options += ["-o", "-"]
    if isinstance(python, Path):
        command += ["environment", *options, str(python)]
        stdin = None
    else:
        command += ["requirements", *options, "-"]
        stdin = _requirements(python)
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    if source_date_epoch is not None:
        env["SOURCE_DATE_EPOCH"] = str(source_date_epoch)
    try:
        done = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageRejected(f"cyclonedx-py could not run: {exc}") from None
    if done.returncode != 0:
        raise ImageRejected(f"cyclonedx-py failed ({done.returncode}): {done.stderr[-2000:]}")
    try:
        bom = json.loads(done.stdout)
    except ValueError as exc:
        raise ImageRejected(f"cyclonedx-py wrote no JSON: {exc}") from None
    if not isinstance(bom, dict):
        raise ImageRejected("cyclonedx-py wrote JSON that is not a BOM")
    return bom


def _validate(raw: bytes) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(raw.decode())
    if error is not None:
        raise ImageRejected(f"the SBOM is not valid CycloneDX {SPEC_VERSION}: {error}")


def write_sbom(
    python: Path | Sequence[PythonPackage],
    debian: Sequence[DebianPackage],
    out: Path,
    *,
    name: str,
    version: str,
    distro: str = "debian-12",
    source_date_epoch: int | None = None,
) -> bytes:
    """Write the image's SBOM to ``out`` (0644, atomically) and return its bytes.

    ``python`` is a Python executable or venv cyclonedx-py can run, or the packages of
    one it cannot; ``name`` and ``version`` describe the image (the recipe and its
    version); ``distro`` is the package URL qualifier of the Debian packages. The result
    is validated against the CycloneDX schema before it is written.
    """
    bom = merge_sbom(
        python_bom(python, source_date_epoch=source_date_epoch),
        debian,
        name=name,
        version=version,
        distro=distro,
    )
    raw = sbom_bytes(bom)
    _validate(raw)
    atomic_write(out, raw, mode=PUBLIC_FILE)
    return raw
