"""Each policy module's ``__all__`` is exactly what it defines for others to use."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "fleet.policy.store",
    "fleet.policy.eligibility",
    "fleet.policy.assign",
    "fleet.policy.views",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_every_public_definition(name: str) -> None:
    module = importlib.import_module(name)
    exported = set(module.__all__)
    assert all(hasattr(module, n) for n in exported), exported - set(dir(module))
    defined = {
        n
        for n, value in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == name
    }
    assert defined <= exported, f"public but not in __all__: {sorted(defined - exported)}"


def test_the_router_module_exports_just_its_router() -> None:
    assert importlib.import_module("fleet.api.policies").__all__ == ["router"]
