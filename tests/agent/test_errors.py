"""One error tree: every error the agent raises says, by its branch, whether to retry."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import agent
from agent.errors import AgentError, Rejected, Transient, retryable
from agent.store.slots import CorruptState, SlotUnavailable
from agent.update.tuf_client import TufRejected, TufUnavailable


def leaves(root: type[BaseException]) -> set[type[BaseException]]:
    found: set[type[BaseException]] = set()
    for sub in root.__subclasses__():
        found |= leaves(sub) or {sub}
    return found


def every_error() -> list[type[BaseException]]:
    for module in pkgutil.walk_packages(agent.__path__, "agent."):
        importlib.import_module(module.name)
    return sorted(leaves(AgentError), key=lambda c: f"{c.__module__}.{c.__qualname__}")


def test_the_error_modules_graft_onto_the_tree() -> None:
    names = {f"{c.__module__}.{c.__qualname__}" for c in every_error()}
    assert {
        "agent.store.slots.CorruptState",
        "agent.store.slots.SlotUnavailable",
        "agent.update.tuf_client.TrustRootMissing",
        "agent.update.tuf_client.TufUnavailable",
        "agent.update.download.NotEnoughDisk",
        "agent.update.download.DownloadUnavailable",
        "agent.link.errors.LinkUnavailable",
        "agent.link.errors.IdentityError",
        "agent.update.updater.TargetRejected",
    } <= names


@pytest.mark.parametrize("error", every_error(), ids=lambda c: c.__qualname__)
def test_every_error_is_in_exactly_one_branch(error: type[AgentError]) -> None:
    assert issubclass(error, Rejected) != issubclass(error, Transient)


def test_only_the_transient_branch_is_retryable() -> None:
    assert retryable(SlotUnavailable("disk full"))
    assert retryable(TufUnavailable("no answer"))
    assert not retryable(CorruptState("state.json is garbage"))
    assert not retryable(TufRejected("signature", "bad"))
    assert not retryable(ValueError("a third-party error nobody translated"))
