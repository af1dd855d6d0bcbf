"""What a rollout changes in a device's desired state, and how it undoes it.

The engine is generic over the change: it asks a :class:`Change` to apply itself to a
device's desired models, to capture what it replaces (so an abort can put it back), and
to restore that. Today the one change is a model version (:class:`ModelChange`);
fallback policies and config profiles will be rolled out by the same engine with their
own ``Change``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from models.wire import DesiredModel

__all__ = ["Change", "ModelChange"]


class Change(Protocol):
    """One part of the desired state, changed the same way on every device of a rollout."""

    @property
    def key(self) -> str:
        """One live rollout per key per device: ``model:<name>``."""
        ...

    def capture(self, models: Sequence[DesiredModel]) -> dict[str, Any] | None:
        """What the change will replace in ``models`` (None: nothing there yet)."""
        ...

    def apply(self, models: Sequence[DesiredModel], entry: DesiredModel) -> list[DesiredModel]:
        """``models`` with the change made, ``entry`` being this device's choice."""
        ...

    def restore(
        self, models: Sequence[DesiredModel], captured: dict[str, Any] | None
    ) -> list[DesiredModel]:
        """``models`` with what :meth:`capture` saw put back."""
        ...


@dataclass(frozen=True)
class ModelChange:
    """Serve a model at a version: its entry in the desired models is replaced."""

    name: str
    version: str

    @property
    def key(self) -> str:
        return f"model:{self.name}"

    def capture(self, models: Sequence[DesiredModel]) -> dict[str, Any] | None:
        for model in models:
            if model.name == self.name:
                return model.model_dump(mode="json")
        return None

    def apply(self, models: Sequence[DesiredModel], entry: DesiredModel) -> list[DesiredModel]:
        others = [m for m in models if m.name != self.name]
        kept = [i for i, m in enumerate(models) if m.name == self.name]
        if not kept:
            return [*models, entry]
        others.insert(kept[0], entry)  # keep the model where it was in the list
        return others

    def restore(
        self, models: Sequence[DesiredModel], captured: dict[str, Any] | None
    ) -> list[DesiredModel]:
        if captured is None:
            return [m for m in models if m.name != self.name]
        return self.apply(models, DesiredModel.model_validate(captured))
