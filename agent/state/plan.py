"""The pure planner: current models and desired models in, steps out.

Reconciling twice is always safe: a model whose spec and file are unchanged
gets no step. The executor (:class:`agent.state.apply.ModelController`) does the I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.config import ModelSpec
from models.manifest import ModelManifest

__all__ = ["Load", "Step", "Unload", "plan_models"]


@dataclass(frozen=True)
class Load:
    """Load ``spec`` and serve it, replacing any model of the same name (hot swap)."""

    spec: ModelSpec
    replaces: bool


@dataclass(frozen=True)
class Unload:
    """Stop serving ``name``; in-flight requests finish first."""

    name: str


Step = Load | Unload

Resolved = tuple[ModelSpec, ModelManifest]


def plan_models(current: Mapping[str, Resolved], desired: Sequence[Resolved]) -> list[Step]:
    """Steps that turn ``current`` into ``desired``: loads and swaps first, unloads last."""
    steps: list[Step] = []
    wanted = {spec.name for spec, _ in desired}
    for spec, manifest in desired:
        now = current.get(spec.name)
        if now is None:
            steps.append(Load(spec, replaces=False))
        elif (
            now[0] != spec or now[1].sha256 != manifest.sha256 or now[1].version != manifest.version
        ):
            steps.append(Load(spec, replaces=True))
    steps.extend(Unload(name) for name in sorted(current) if name not in wanted)
    return steps
