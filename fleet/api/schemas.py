"""Request and response bodies of the REST API (tables stay private to the server).

Shapes follow the Base/Create/Update/Public families: ``*Create`` and ``*Update`` are
what a client may send (unknown fields rejected, so a typo is an error rather than
a silent no-op), ``*Public`` is what it gets back. Secrets appear only in the
responses that create them: :class:`TokenCreated` and :class:`TokenBatchCreated`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from fleet.registry.variants import VariantRequirements
from fleet.tokens import TokenState
from models.manifest import ModelFormat, RuntimeParams
from models.values import ModelName, Version

__all__ = [
    "GROUP_PATTERN",
    "MAX_TOKEN_BATCH",
    "TAG_PATTERN",
    "VARIANT_PATTERN",
    "ArtifactPublic",
    "CommandAccepted",
    "CommandCreate",
    "DegradedPublic",
    "DesiredBody",
    "DesiredModelBody",
    "DesiredPublished",
    "DeviceCounts",
    "DeviceDetail",
    "DeviceList",
    "DevicePublic",
    "DeviceStatus",
    "DeviceUpdate",
    "DriftItemPublic",
    "DriftPublic",
    "GoldenPrompt",
    "GroupCreate",
    "GroupDesiredPublished",
    "GroupName",
    "GroupPublic",
    "ModelMetadata",
    "ModelSummary",
    "ModelVersionPublic",
    "PolicyRefPublic",
    "Tag",
    "TagCount",
    "TokenBatchCreate",
    "TokenBatchCreated",
    "TokenCreate",
    "TokenCreated",
    "TokenPublic",
    "TokenSecret",
    "YankBody",
]

MAX_TOKEN_BATCH = 10_000  # tokens one batch may create: a day of flashing, not a fleet's worth
GROUP_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:=/-]{0,63}$"

GroupName = Annotated[str, Field(pattern=GROUP_PATTERN)]
"""Letters, digits, ``_``, ``.`` and ``-``; up to 64; it appears in URLs, so no ``/``."""

Tag = Annotated[str, Field(pattern=TAG_PATTERN)]

DeviceStatus = Literal["online", "offline", "revoked"]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- groups and tags ------------------------------------------------------------------------


class GroupCreate(_Input):
    """A new group."""

    name: GroupName
    description: str = Field(default="", max_length=500)


class GroupPublic(BaseModel):
    """A group as clients see it, with its device count."""

    name: str
    description: str
    created_at: datetime
    devices: int  # enrolled, not revoked


class TagCount(BaseModel):
    """A tag in use and how many devices carry it."""

    tag: str
    devices: int


# --- tokens ---------------------------------------------------------------------------------


class TokenCreate(_Input):
    """A new enrollment token; ``expires_in_s`` None means it never expires."""

    group: GroupName | None = None  # must exist: create it first
    uses: int = Field(default=1, ge=1, le=100_000)
    expires_in_s: float | None = Field(default=86_400.0, gt=0, le=10 * 365 * 86_400)  # None: never
    note: str = Field(default="", max_length=200)


class TokenPublic(BaseModel):
    """A token as listings show it: never its secret."""

    id: str
    group: str | None
    uses_total: int
    uses_left: int
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    note: str
    state: TokenState


class TokenBatchCreate(TokenCreate):
    """``count`` one-device tokens (or ``uses``-device ones) at once, for flashing a batch."""

    count: int = Field(ge=1, le=MAX_TOKEN_BATCH)


class TokenSecret(TokenPublic):
    """A token with its secret: only ever in the response that created it."""

    secret: str  # shown once; only its SHA-256 is stored


class TokenCreated(TokenSecret):
    """The response to creating one token."""

    fleet_url: str  # what a device passes as --fleet


class TokenBatchCreated(BaseModel):
    """The response to creating a batch: every token with its secret, in creation order."""

    fleet_url: str  # what a device passes as --fleet
    tokens: list[TokenSecret]


# --- devices --------------------------------------------------------------------------------


class DriftItemPublic(BaseModel):
    """One difference between desired and reported state."""

    kind: str
    message: str
    model: str | None = None
    desired: str | None = None
    actual: str | None = None


class DriftPublic(BaseModel):
    """How far a device is from its desired state."""

    managed: bool  # False: no desired state was ever set
    in_sync: bool
    items: list[DriftItemPublic]


class DegradedPublic(BaseModel):
    """A model the device answers with its fallbacks, as it last reported (degraded mode)."""

    model: str
    breaker: str  # "open" or "half_open"
    kind: str  # what opened it: models.policy.FailureKind
    reason: str
    since: datetime


class PolicyRefPublic(BaseModel):
    """The fallback policy a device reports it enforces."""

    name: str
    version: int
    digest: str


class DevicePublic(BaseModel):
    """A device as listings show it."""

    id: str
    name: str
    group: str | None
    tags: list[str]
    status: DeviceStatus
    online: bool
    last_seen: datetime | None
    enrolled_at: datetime
    revoked_at: datetime | None
    agent_version: str
    desired_version: int  # 0: never set
    applied_version: int | None  # the desired version the device last acted on
    in_sync: bool
    degraded: list[DegradedPublic]  # empty: every model answers (or no report)
    policy: PolicyRefPublic | None  # None: no report, or no policy enforced


class DeviceDetail(DevicePublic):
    """A device with everything the controller knows about it."""

    public_key: str
    token_id: str | None  # the token it last enrolled (or re-enrolled) with
    hardware_id: str | None  # what survives a re-flash; None: the agent sent none
    device_report: dict[str, Any]
    desired: dict[str, Any] | None
    reported: dict[str, Any] | None
    reported_at: datetime | None
    drift: DriftPublic
    telemetry_dropped: int


class DeviceCounts(BaseModel):
    """Devices by status."""

    total: int
    online: int
    offline: int  # neither online nor revoked
    revoked: int


class DeviceList(BaseModel):
    """One page of devices."""

    total: int  # matching devices, before limit and offset
    limit: int
    offset: int
    items: list[DevicePublic]


class DeviceUpdate(_Input):
    """Fields left out stay as they are; ``group: null`` takes the device out of its group."""

    name: str | None = Field(default=None, min_length=1, max_length=128)
    group: GroupName | None = None
    tags: list[Tag] | None = Field(default=None, max_length=64)  # replaces the tag set

    @field_validator("tags")
    @classmethod
    def _unique(cls, tags: list[str] | None) -> list[str] | None:
        return None if tags is None else sorted(set(tags))


class CommandCreate(_Input):
    """A one-off command for a device."""

    kind: Literal["report", "reconcile", "flush"]


class CommandAccepted(BaseModel):
    """A command handed to the broker."""

    id: str
    device_id: str
    kind: str


# --- desired state --------------------------------------------------------------------------

VARIANT_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$"  # "Q4_K_M", "int8", "default"


class DesiredModelBody(_Input):
    """A model a device should serve.

    A name registered in the model registry resolves to a signed TUF target: the
    ``version`` asked for (or the latest one not yanked) and its ``variant`` (needed only
    when a version has several and none is called "default"). A name the registry does
    not know is served from the device's own store (bundled models), at ``version`` if
    given.
    """

    name: ModelName
    version: Version | None = None
    variant: str | None = Field(default=None, pattern=VARIANT_PATTERN)


class DesiredBody(_Input):
    """What an admin sets; the controller adds device id, version, expiry and targets."""

    models: list[DesiredModelBody] = Field(default_factory=list, max_length=64)
    config: dict[str, JsonValue] = Field(default_factory=dict)
    fallback: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _distinct(cls, models: list[DesiredModelBody]) -> list[DesiredModelBody]:
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model listed more than once: {', '.join(duplicates)}")
        return models


class DesiredPublished(BaseModel):
    """A stored desired state, and whether the broker has it yet."""

    device_id: str
    version: int
    published: bool  # False: stored, and published when the broker is back
    desired: dict[str, Any]


class GroupDesiredPublished(BaseModel):
    """The desired states set for a group's devices."""

    group: str
    devices: list[DesiredPublished]


# --- model registry -------------------------------------------------------------------------


class GoldenPrompt(_Input):
    """A prompt with a known good answer, for health gates after an update."""

    prompt: str = Field(min_length=1, max_length=4000)
    expect: str | None = Field(default=None, max_length=4000)  # a substring of a good answer
    max_tokens: int = Field(default=32, ge=1, le=4096)


class ModelMetadata(_Input):
    """What an uploader says about a model file; sent as the X-Edgefleet-Metadata header."""

    quantization: str | None = Field(default=None, max_length=64)  # "Q4_K_M", "int8"
    quality: int | None = Field(default=None, ge=0, le=1000)  # overrides the quantization's rank
    ram_bytes: int | None = Field(default=None, ge=0)  # memory it needs to run on a CPU
    vram_bytes: int | None = Field(default=None, ge=0)  # GPU memory with every layer offloaded
    requirements: VariantRequirements = Field(default_factory=VariantRequirements)  # what fits
    context_length: int | None = Field(default=None, ge=1)  # the longest context it supports
    runtime: RuntimeParams | None = None  # how the agent should run it
    golden_prompts: list[GoldenPrompt] = Field(default_factory=list, max_length=64)
    licence: str | None = Field(default=None, max_length=200)  # an SPDX id or a name
    card: str = Field(default="", max_length=256 * 1024)  # the model card, Markdown


class ArtifactPublic(BaseModel):
    """One registered model file (a variant of a version)."""

    name: str
    version: str
    variant: str
    format: ModelFormat
    sha256: str
    size_bytes: int
    metadata: ModelMetadata
    created_at: datetime
    yanked: bool  # still downloadable, never offered as the latest
    yanked_at: datetime | None
    yank_reason: str
    download_url: str  # GET with the device's broker credentials (HTTP Basic)


class ModelVersionPublic(BaseModel):
    """One version of a model with every variant uploaded for it."""

    name: str
    version: str
    yanked: bool  # every variant is yanked
    artifacts: list[ArtifactPublic]


class ModelSummary(BaseModel):
    """A model in the registry listing."""

    name: str
    latest_version: str | None  # newest upload not yanked; None when all are yanked
    latest_variants: list[str]
    versions: int
    updated_at: datetime  # newest upload


class YankBody(_Input):
    """Why a version is withdrawn; ``variant`` None yanks every variant of it."""

    reason: str = Field(min_length=1, max_length=500)
    variant: str | None = Field(default=None, pattern=VARIANT_PATTERN)
