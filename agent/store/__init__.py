"""The on-device model store: every model installed in A/B slots (:mod:`agent.store.slots`).

:class:`ModelStore` is what the rest of the agent uses; the slots are its crash-safe
mechanism, shared with signed updates.
"""

from agent.store.model_store import ModelStore, manifest_for_file, name_for_file

__all__ = ["ModelStore", "manifest_for_file", "name_for_file"]
