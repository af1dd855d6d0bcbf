"""Agent settings: one TOML file, overridden by ``EDGEFLEET_AGENT_*`` environment variables.

This is the process edge: everything below it takes plain frozen values.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent.errors import ConfigError
from models.manifest import RuntimeParams
from models.policy import FallbackPolicy
from models.values import ModelName

__all__ = [
    "DEFAULT_STATE_DIR",
    "AgentSettings",
    "LinkSettings",
    "LogSettings",
    "ModelSpec",
    "load_settings",
]

DEFAULT_STORE = Path.home() / ".local" / "share" / "edgefleet" / "models"
DEFAULT_STATE_DIR = Path.home() / ".local" / "share" / "edgefleet" / "agent"


class ModelSpec(BaseModel):
    """A model to serve: by name from the store, or straight from a file."""

    model_config = ConfigDict(extra="forbid")

    name: ModelName
    path: Path | None = None  # a GGUF/ONNX file outside the store (quick start)
    runtime: RuntimeParams | None = None  # overrides the manifest's runtime parameters


class LogSettings(BaseModel):
    """The interaction log: metadata always, bodies only when asked for, always redacted."""

    model_config = ConfigDict(extra="forbid")

    path: Path | None = None  # None: no interaction log
    max_bytes: int = Field(default=10 * 2**20, ge=4096)  # per file before rotating
    backups: int = Field(default=3, ge=0, le=100)  # rotated files kept
    include_bodies: bool = False


class LinkSettings(BaseModel):
    """The link to a fleet controller; see docs/agent-fleet.md.

    The link runs when ``url`` is set or ``state_dir`` already holds an identity
    from an earlier enrollment. The token is needed only for the first start.
    """

    model_config = ConfigDict(extra="forbid")

    url: str | None = None  # the controller's HTTP(S) API, e.g. https://fleet.example:8000
    token: SecretStr | None = None  # enrollment token, used once; then identity.json is enough
    state_dir: Path = DEFAULT_STATE_DIR  # device key, identity, last desired state, spool
    trust_root: Path | None = None  # the fleet's TUF root.json, provisioned with the image;
    # None: trusted on first use from the enrollment response
    broker_ca: Path | None = None  # the broker's CA (PEM), provisioned with the image; it
    # verifies the broker's TLS instead of the CA the enrollment response carries
    spool_max_bytes: int = Field(default=64 * 2**20, ge=64 * 1024)  # payload bytes kept offline
    telemetry_interval_s: float | None = Field(default=None, gt=0)  # None: the controller's
    enroll_timeout_s: float = Field(default=15.0, gt=0)  # one enrollment HTTP request
    publish_timeout_s: float = Field(default=15.0, gt=0)  # wait this long for a broker ack
    backoff_initial_s: float = Field(default=1.0, gt=0)  # first reconnect delay (jittered)
    backoff_max_s: float = Field(default=60.0, gt=0)  # reconnect delay cap
    auth_backoff_s: float = Field(default=600.0, gt=0)  # after the broker refuses our login
    healthy_after_s: float = Field(default=30.0, ge=0)  # connected this long: backoff resets

    @model_validator(mode="after")
    def _check(self) -> LinkSettings:
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError(
                    f"fleet url {self.url!r} is not like https://fleet.example.com:8000"
                )
            self.url = self.url.rstrip("/")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("fleet.backoff_max_s must be at least fleet.backoff_initial_s")
        return self


class AgentSettings(BaseSettings):
    """Everything an operator can set; see docs/operators.md."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEFLEET_AGENT_", env_nested_delimiter="__", extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    api_keys: list[SecretStr] = Field(default_factory=list)
    store_dir: Path = DEFAULT_STORE
    models: list[ModelSpec] = Field(default_factory=list)
    memory_budget_mb: int | None = Field(default=None, ge=1)
    queue_size: int = Field(default=64, ge=1)  # waiting requests per model beyond the slots
    request_timeout_s: float = Field(default=300.0, gt=0)
    max_body_bytes: int = Field(default=4 * 2**20, ge=1024)
    body_timeout_s: float = Field(default=30.0, gt=0)  # to receive a whole request body
    cache_entries: int = Field(default=256, ge=0)  # response cache; 0 disables it
    log: LogSettings = Field(default_factory=LogSettings)
    fleet: LinkSettings = Field(default_factory=LinkSettings)
    fallback: FallbackPolicy | None = None  # degraded mode without a fleet; the fleet's wins
    fault_injection: bool = False  # /v1/faults for drills and tests; never in production

    @model_validator(mode="after")
    def _refuse_open_binding(self) -> AgentSettings:
        if not self.api_keys and not _is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without an API key: set api_keys "
                "(or EDGEFLEET_AGENT_API_KEYS='[\"...\"]'), or bind to 127.0.0.1"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(config: Path | None = None, **overrides: Any) -> AgentSettings:
    """Read settings from ``config`` (TOML) and the environment; explicit overrides win."""
    if config is not None and not config.is_file():
        raise ConfigError(f"config file {config} does not exist")

    class _FromFile(AgentSettings):
        model_config = SettingsConfigDict(toml_file=config)

    try:
        return _FromFile(**overrides) if config is not None else AgentSettings(**overrides)
    except ValueError as exc:
        raise ConfigError(f"invalid agent configuration: {exc}") from exc
