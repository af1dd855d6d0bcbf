"""Regressions: rules that make one model version (or variant) behave worse. Pure.

A staged rollout is only worth testing against devices that can get worse. A
:class:`Regression` names a model version, optionally a variant, and the
:class:`Effects` a device suffers while it serves (or tries to install) that version::

    gemma3-270m@2.0:latency=3.0               p50/p95 latency and TTFT three times longer
    gemma3-270m@2.0/Q8_0:errors=0.2,golden=fail
    minilm@7:tps=0.5,restart                  half the tokens/s; the agent restarts once
    gemma3-270m@2.0:fallbacks=0.3             its fallbacks answer 30% of the requests

Effects, comma-separated after the colon:

- ``latency=F`` multiplies the p50 and p95 latency and the time to first token (F > 0);
- ``tps=F`` multiplies tokens/s (F > 0);
- ``errors=R`` makes a share R (0..1) of the served requests fail;
- ``fallbacks=R``: a share R (0..1) of the served requests is answered by a fallback tier
  (degraded mode), as the ``fallback_rate`` gate reads it;
- ``golden=fail``: the health check after installing fails, the update is rolled back
  (``update_rolled_back``) and the previous version keeps serving;
- ``install=fail``: installing fails (``update_failed``, phase ``install``);
- ``restart``: the agent restarts once while loading the version (an ``online`` event).

:class:`RegressionRules` holds several and answers what a model, or a set of served
models, does: latency and tokens/s factors multiply, the highest error share wins, and
the flags add up. Nothing here touches the network; :mod:`.telemetry` turns effects into
numbers and :mod:`.device` into events.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from models.values import MODEL_NAME, VERSION

__all__ = ["NO_EFFECTS", "Effects", "ModelRef", "Regression", "RegressionRules", "target_parts"]

_VARIANT_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz._-")


@dataclass(frozen=True)
class Effects:
    """What serving a model version does to a device; the neutral value changes nothing."""

    latency: float = 1.0  # multiplies p50/p95 latency and time to first token
    tps: float = 1.0  # multiplies tokens per second
    error_rate: float | None = None  # share of served requests that fail; None: the usual few
    golden_fail: bool = False  # the health check after installing fails: rolled back
    install_fail: bool = False  # installing fails: update_failed, phase "install"
    restart: bool = False  # the agent restarts once while loading it: an online event
    fallback_rate: float | None = None  # share answered by fallbacks; None: the usual few

    def __post_init__(self) -> None:
        if self.latency <= 0 or self.tps <= 0:
            raise ValueError("latency and tps factors must be positive")
        for rate in (self.error_rate, self.fallback_rate):
            if rate is not None and not 0.0 <= rate <= 1.0:
                raise ValueError("an error or fallback rate is a share between 0 and 1")

    def combine(self, other: Effects) -> Effects:
        """Both at once: factors multiply, the higher error (fallback) share wins, flags add up."""
        rates = [r for r in (self.error_rate, other.error_rate) if r is not None]
        fallbacks = [r for r in (self.fallback_rate, other.fallback_rate) if r is not None]
        return Effects(
            latency=self.latency * other.latency,
            tps=self.tps * other.tps,
            error_rate=max(rates) if rates else None,
            golden_fail=self.golden_fail or other.golden_fail,
            install_fail=self.install_fail or other.install_fail,
            restart=self.restart or other.restart,
            fallback_rate=max(fallbacks) if fallbacks else None,
        )

    def __str__(self) -> str:
        parts = []
        if self.latency != 1.0:
            parts.append(f"latency={self.latency:g}")
        if self.tps != 1.0:
            parts.append(f"tps={self.tps:g}")
        if self.error_rate is not None:
            parts.append(f"errors={self.error_rate:g}")
        if self.golden_fail:
            parts.append("golden=fail")
        if self.install_fail:
            parts.append("install=fail")
        if self.restart:
            parts.append("restart")
        if self.fallback_rate is not None:
            parts.append(f"fallbacks={self.fallback_rate:g}")
        return ",".join(parts) or "none"


NO_EFFECTS = Effects()


def _check_variant(variant: str, text: str) -> str:
    if not variant or len(variant) > 64 or not set(variant) <= _VARIANT_CHARS:
        raise ValueError(f"{text!r}: {variant!r} is not a variant name like Q4_K_M")
    return variant


@dataclass(frozen=True)
class ModelRef:
    """A model version, optionally one variant of it: ``NAME@VERSION[/VARIANT]``."""

    name: str
    version: str
    variant: str | None = None  # None: every variant

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """``gemma3-270m@2.0`` or ``gemma3-270m@2.0/Q8_0``; :class:`ValueError` says why not."""
        name, at, rest = text.strip().partition("@")
        if not at:
            raise ValueError(f"{text!r} is not like NAME@VERSION or NAME@VERSION/VARIANT")
        version, slash, variant = rest.partition("/")
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(f"{text!r}: {name!r} is not a model name")
        if not VERSION.fullmatch(version):
            raise ValueError(f"{text!r}: {version!r} is not a version")
        return cls(name, version, _check_variant(variant, text) if slash else None)

    def matches(self, name: str, version: str | None, variant: str | None) -> bool:
        """Whether a model served as ``name`` at ``version`` (and ``variant``) is this one."""
        if name != self.name or version != self.version:
            return False
        return self.variant is None or variant == self.variant

    def __str__(self) -> str:
        tail = f"/{self.variant}" if self.variant is not None else ""
        return f"{self.name}@{self.version}{tail}"


def _number(key: str, value: str, text: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{text!r}: {key}={value!r} is not a number") from None
    if number != number or number in {float("inf"), float("-inf")}:
        raise ValueError(f"{text!r}: {key}={value!r} is not a finite number")
    return number


def _effects(spec: str, text: str) -> Effects:
    seen: set[str] = set()
    latency = tps = 1.0
    error_rate: float | None = None
    fallback_rate: float | None = None
    golden_fail = install_fail = restart = False
    for raw in spec.split(","):
        item = raw.strip()
        key, eq, value = (part.strip().lower() for part in item.partition("="))
        if key in seen:
            raise ValueError(f"{text!r}: {key} is given twice")
        seen.add(key)
        if key in {"latency", "tps"} and eq:
            factor = _number(key, value, text)
            if factor <= 0:
                raise ValueError(f"{text!r}: {key} must be a positive factor, not {value}")
            latency, tps = (factor, tps) if key == "latency" else (latency, factor)
        elif key == "errors" and eq:
            error_rate = _number(key, value, text)
            if not 0 <= error_rate <= 1:
                raise ValueError(f"{text!r}: errors is a share between 0 and 1, not {value}")
        elif key == "fallbacks" and eq:
            fallback_rate = _number(key, value, text)
            if not 0 <= fallback_rate <= 1:
                raise ValueError(f"{text!r}: fallbacks is a share between 0 and 1, not {value}")
        elif key == "golden" and value == "fail":
            golden_fail = True
        elif key == "install" and value == "fail":
            install_fail = True
        elif key == "restart" and not eq:
            restart = True
        else:
            raise ValueError(
                f"{text!r}: {item!r} is not an effect (latency=F, tps=F, errors=R, "
                "fallbacks=R, golden=fail, install=fail, restart)"
            )
    return Effects(latency, tps, error_rate, golden_fail, install_fail, restart, fallback_rate)


@dataclass(frozen=True)
class Regression:
    """One rule: while a device serves (or installs) ``model``, ``effects`` apply."""

    model: ModelRef
    effects: Effects

    @classmethod
    def parse(cls, text: str) -> Regression:
        """``NAME@VERSION[/VARIANT]:EFFECT[,EFFECT...]``; :class:`ValueError` says what is wrong."""
        head, colon, spec = text.partition(":")
        if not colon or not spec.strip():
            raise ValueError(
                f"{text!r} is not like NAME@VERSION[/VARIANT]:EFFECT,... "
                "(e.g. gemma3-270m@2.0:latency=3.0)"
            )
        return cls(ModelRef.parse(head), _effects(spec, text))

    def __str__(self) -> str:
        return f"{self.model}:{self.effects}"


@dataclass(frozen=True)
class RegressionRules:
    """Every rule of a simulation; a model matching several suffers them all."""

    rules: tuple[Regression, ...] = field(default_factory=tuple)

    @classmethod
    def parse(cls, texts: Iterable[str]) -> RegressionRules:
        return cls(tuple(Regression.parse(text) for text in texts))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def effects_for(self, name: str, version: str | None, variant: str | None) -> Effects:
        """What serving ``name`` at ``version`` (``variant``) does."""
        effects = NO_EFFECTS
        for rule in self.rules:
            if rule.model.matches(name, version, variant):
                effects = effects.combine(rule.effects)
        return effects

    def serving(self, models: Iterable[tuple[str, str | None, str | None]]) -> Effects:
        """What serving all of ``models`` (name, version, variant) at once does."""
        effects = NO_EFFECTS
        for name, version, variant in models:
            effects = effects.combine(self.effects_for(name, version, variant))
        return effects


def target_parts(path: str) -> tuple[str, str, str] | None:
    """(name, version, variant) from a target path ``name/version/variant.ext``; else None.

    The registry lays artifacts out that way (``fleet.registry.targets.target_path``);
    a path of another shape names no variant a rule could match.
    """
    parts = path.split("/")
    if len(parts) != 3 or not all(parts):
        return None
    name, version, leaf = parts
    variant, dot, _fmt = leaf.rpartition(".")
    if not dot or not variant:
        return None
    return name, version, variant
