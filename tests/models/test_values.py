"""One name and one digest type for both sides: what the controller signs, a device can store."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.manifest import ModelFormat, ModelManifest
from models.values import MODEL_NAME, SHA256, VERSION
from models.wire import DesiredModel, ReportedModel, TargetRef

DIGEST = "ab" * 32
BAD_NAMES = ["Gemma", "..", ".hidden", "-x", "a" * 65, "gemma 3", "a/b", "", "gemma\n"]


def manifest(name: str) -> ModelManifest:
    return ModelManifest(
        name=name, version="1", format=ModelFormat.GGUF, file="m.gguf", sha256=DIGEST, size_bytes=1
    )


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_a_device_cannot_store_is_refused_in_every_message(name: str) -> None:
    assert MODEL_NAME.fullmatch(name) is None
    with pytest.raises(ValidationError):
        DesiredModel(name=name)
    with pytest.raises(ValidationError):
        ReportedModel(name=name, state="ready")
    with pytest.raises(ValidationError):
        manifest(name)


@pytest.mark.parametrize("name", ["gemma3-270m", "minilm", "a", "q4_k_m.v2", "9" * 64])
def test_a_valid_name_passes_everywhere(name: str) -> None:
    assert DesiredModel(name=name).name == name
    assert manifest(name).name == name


@pytest.mark.parametrize("digest", ["AB" * 32, "ab" * 31, "ab" * 32 + "\n", "g" * 64, ""])
def test_digests_are_64_lower_case_hex_digits(digest: str) -> None:
    assert SHA256.fullmatch(digest) is None
    with pytest.raises(ValidationError):
        TargetRef(path="m/1/m.gguf", length=1, sha256=digest)


@pytest.mark.parametrize("version", ["1.0\n", ".1", "1 0", "v" * 65])
def test_versions_are_checked_whole(version: str) -> None:
    assert VERSION.fullmatch(version) is None
    with pytest.raises(ValidationError):
        DesiredModel(name="gemma", version=version)
    with pytest.raises(ValueError, match="invalid version"):
        ModelManifest(
            name="gemma",
            version=version,
            format="gguf",
            file="m.gguf",
            sha256=DIGEST,
            size_bytes=1,
        )
