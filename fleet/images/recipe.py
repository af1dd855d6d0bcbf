"""Image recipes: one ``recipe.toml`` per device class under ``firmware-images/``.

A recipe declares everything an image holds: its base (a Debian release built by
mmdebstrap, or a vendor root filesystem the image is laid over), the agent's extras and
the llama.cpp CPU baseline, the files it installs (systemd units, sysusers and tmpfiles
entries, the agent's config, from ``firmware-images/common/``), the units it enables,
the models it bakes in and the steps of its first boot. Parsing and checking it is pure
(:func:`parse_recipe`); :func:`load_recipe` only reads the file. A bad or unknown recipe
is :class:`~fleet.errors.ImageRejected`, naming what is wrong and what would be right.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet.errors import ImageRejected

__all__ = [
    "COMMON",
    "RECIPE_FILE",
    "AgentPart",
    "DebianBase",
    "ImageKind",
    "LlamaBuild",
    "Recipe",
    "VendorBase",
    "known_recipes",
    "load_recipe",
    "parse_recipe",
]

RECIPE_FILE: Final = "recipe.toml"
COMMON: Final = "common"  # the shared pieces, not a recipe

_PIN = re.compile(r"[a-z0-9][a-z0-9+.-]*=[0-9][A-Za-z0-9.+~:-]*")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_IMAGE_PATH = re.compile(r"/(?:[A-Za-z0-9@_.+-]+/)*[A-Za-z0-9@_.+-]+")


class ImageKind(StrEnum):
    """What a build leaves: a whole root file system, or an overlay for a vendor's."""

    ROOTFS = "rootfs"  # a whole root file system: a tarball and a raw disk image
    OVERLAY = "overlay"  # files laid over a vendor's root file system (NVIDIA L4T)


class LlamaBuild(StrEnum):
    """How the image's llama.cpp is compiled: never tuned to the build host's CPU."""

    X86_64_V3 = "x86-64-v3"  # AVX2, FMA, F16C, BMI2: every x86-64 CPU since 2015 (Haswell, Zen 1)
    X86_64_V3_CUDA = "x86-64-v3+cuda"  # the same CPU baseline, with CUDA kernels
    SOURCE_CUDA = "source+cuda"  # the sdist, built with CUDA on the device's own root (Jetson)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DebianBase(_Strict):
    """A root file system built from Debian's archive by mmdebstrap."""

    builder: Literal["mmdebstrap"] = "mmdebstrap"
    suite: str  # bookworm
    variant: Literal["minbase", "essential", "apt", "required", "important"] = "minbase"
    sources: tuple[str, ...] = Field(min_length=1)  # one-line apt sources: "deb URL SUITE COMP"
    packages: tuple[str, ...] = Field(min_length=1)  # name=version: every package pinned

    @field_validator("packages")
    @classmethod
    def _pinned(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        loose = [p for p in value if not _PIN.fullmatch(p)]
        if loose:
            raise ValueError(
                f"pin every package as name=version (apt-cache policy NAME shows the "
                f"candidate): {', '.join(loose)}"
            )
        return value

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in value if len(s.split()) < 4 or s.split()[0] != "deb"]
        if bad:
            raise ValueError(f"write each source as 'deb URL SUITE COMPONENT...': {bad}")
        return value


class VendorBase(_Strict):
    """A vendor's root file system the image's overlay is laid over; not built here."""

    vendor: str  # "NVIDIA Jetson Linux R36.4 sample root file system (Ubuntu 22.04)"
    python: str  # the interpreter the overlay's install step brings: python3.11


class AgentPart(_Strict):
    """What of edgefleet the image holds, and how its native parts are built."""

    extras: tuple[str, ...] = Field(min_length=1)  # edgefleet[...] extras: agent or gpu
    llama: LlamaBuild
    bake_models: tuple[str, ...] = ()  # bundled models installed into the store at build


class Recipe(_Strict):
    """One device class's image (firmware-images/<name>/recipe.toml)."""

    name: Annotated[str, Field(pattern=_NAME.pattern)]
    description: str
    kind: ImageKind
    arch: Literal["amd64", "arm64"]
    python: Literal["3.11", "3.12", "3.13"]  # the agent's interpreter in the image
    debian: DebianBase | None = None
    vendor: VendorBase | None = None
    agent: AgentPart
    # Image path -> file under firmware-images/ (common/... or the recipe's own).
    files: dict[str, str] = Field(min_length=1)
    enable: tuple[str, ...] = ()  # systemd units enabled in the image
    first_boot: tuple[str, ...] = Field(min_length=1)  # what a device does, in order

    @field_validator("files")
    @classmethod
    def _paths(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [p for p in value if not _IMAGE_PATH.fullmatch(p) or ".." in p.split("/")]
        if bad:
            raise ValueError(f"image paths must be absolute and plain: {bad}")
        return value

    def model_post_init(self, context: object, /) -> None:
        if self.kind is ImageKind.ROOTFS and (self.debian is None or self.vendor is not None):
            raise ValueError("a rootfs recipe has a [debian] base and no [vendor]")
        if self.kind is ImageKind.OVERLAY and (self.vendor is None or self.debian is not None):
            raise ValueError("an overlay recipe has a [vendor] base and no [debian]")

    @property
    def base(self) -> str:
        if self.debian is not None:
            return f"Debian {self.debian.suite} ({self.debian.variant}, mmdebstrap)"
        assert self.vendor is not None
        return self.vendor.vendor


def _problems(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "recipe"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def parse_recipe(text: str, source: str, sources: Iterable[str] = ()) -> Recipe:
    """Check a recipe's TOML; ``sources`` are the files it may name under firmware-images/."""
    try:
        recipe = Recipe.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ImageRejected(f"{source} is not valid TOML: {exc}") from exc
    except ValidationError as exc:
        raise ImageRejected(f"{source}: {_problems(exc)}") from exc
    available = set(sources)
    missing = sorted(f for f in recipe.files.values() if f not in available)
    if available and missing:
        raise ImageRejected(f"{source} installs files that do not exist: {', '.join(missing)}")
    return recipe


def known_recipes(root: Path) -> list[str]:
    """The recipes under firmware-images/, by folder name."""
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.name != COMMON and (p / RECIPE_FILE).is_file()
    )


def _files_under(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]


def load_recipe(root: Path, name: str) -> Recipe:
    """The recipe ``name`` from ``root`` (firmware-images/), checked."""
    known = known_recipes(root)
    if name not in known:
        choose = ", ".join(known) if known else f"none found in {root}"
        raise ImageRejected(f"unknown recipe {name!r}; known recipes: {choose}")
    path = root / name / RECIPE_FILE
    recipe = parse_recipe(path.read_text(encoding="utf-8"), str(path), _files_under(root))
    if recipe.name != name:
        raise ImageRejected(f"{path} names itself {recipe.name!r}: rename one to match")
    return recipe
