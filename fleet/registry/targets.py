"""What the registry signs: one TUF target per registered artifact (pure, no I/O).

This is the seam for signed model updates. The TUF repository
(:mod:`fleet.registry.repository`) takes :class:`TargetDescription` values from here
and signs them into targets metadata, adding a per-model ``release`` counter; the
agent then checks length and hash while downloading. Nothing here signs.

The custom fields carry what a device needs to decide and to run: name, version,
variant, format, the hardware it needs (``ram_bytes``, ``vram_bytes``), context
length, runtime parameters, golden prompts and licence; never the model card. TUF
signs canonical JSON, which has no floating-point numbers: a float in the metadata
(say, in ``runtime.extra``) is signed as its decimal string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleet.registry.store import check_digest

__all__ = ["TargetDescription", "describe_target", "target_path"]


def target_path(name: str, version: str, variant: str, fmt: str) -> str:
    """The artifact's TUF target path, e.g. ``gemma3-270m/1.0/Q4_K_M.gguf``."""
    return f"{name}/{version}/{variant}.{fmt}"


@dataclass(frozen=True)
class TargetDescription:
    """A TUF target file entry: path, length and hashes, plus edgefleet's custom fields."""

    path: str
    length: int  # bytes
    hashes: dict[str, str]  # {"sha256": hex}
    custom: dict[str, Any] = field(default_factory=dict)


def describe_target(
    *,
    name: str,
    version: str,
    variant: str,
    fmt: str,
    sha256: str,
    size_bytes: int,
    metadata: dict[str, Any],
) -> TargetDescription:
    """The target a registered artifact becomes; the model card stays out of signed data."""
    custom = {k: _canonical(v) for k, v in metadata.items() if k != "card" and v is not None}
    custom.update(name=name, version=version, variant=variant, format=fmt)
    return TargetDescription(
        path=target_path(name, version, variant, fmt),
        length=size_bytes,
        hashes={"sha256": check_digest(sha256)},
        custom=custom,
    )


def _canonical(value: Any) -> Any:
    """``value`` with floats as decimal strings (integral ones as ints): canonical JSON."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else repr(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value
