"""The last desired state acted on, on disk: a restart without the broker serves the same models.

It lives in the link's state folder (``<state_dir>/desired.json``, 0600) but belongs to
the executor: only :class:`agent.state.apply.ModelController` writes it, and the app
reads it once at start-up. Signature checks happened before it was acted on; a file
that no longer parses is logged and ignored (the configured models serve until the
controller sends a desired state again).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import ValidationError

from agent.files import atomic_write, ensure_private_dir
from models.wire import DesiredState

__all__ = ["SavedDesired"]

log = logging.getLogger(__name__)


class SavedDesired:
    """``desired.json``: read at start-up, replaced atomically on every new desired state."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> DesiredState | None:
        """The saved state; ``None`` if there is none (or it is unreadable, logged)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read %s, using the configured models: %s", self.path, exc)
            return None
        try:
            return DesiredState.model_validate_json(data)
        except ValidationError as exc:
            log.error(
                "%s is unreadable (%d errors), using the configured models until the "
                "controller sends a desired state",
                self.path,
                exc.error_count(),
            )
            return None

    def save(self, desired: DesiredState) -> None:
        ensure_private_dir(self.path.parent)
        atomic_write(self.path, desired.model_dump_json(indent=2).encode())
