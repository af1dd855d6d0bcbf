"""Each controller module's ``__all__`` is exactly what it defines for others to use."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

MODULES = [
    "fleet.app",
    "fleet.client",
    "fleet.db",
    "fleet.state",
    "fleet.tokens",
    "fleet.api",
    "fleet.api.buckets",
    "fleet.api.deps",
    "fleet.api.errors",
    "fleet.api.limits",
    "fleet.api.present",
    "fleet.api.schemas",
    "fleet.leases",
    "fleet.registry.backends",
    "fleet.registry.blobs",
    "fleet.registry.folder",
    "fleet.registry.s3",
    "fleet.registry.store",
    "fleet.registry.targets",
    "fleet.registry.registration",
    "fleet.desired",
    "fleet.link.backoff",
    "fleet.link.device_link",
    "fleet.link.housekeeping",
    "fleet.link.logs",
    "fleet.link.publish",
    "fleet.link.router",
    "fleet.link.session",
    "fleet.link.tasks",
    "fleet.cli",
    "fleet.cli.connection",
    "fleet.cli.output",
    "fleet.policy.store",
    "fleet.policy.eligibility",
    "fleet.policy.assign",
    "fleet.policy.views",
    "fleet.degraded",
    "fleet.degraded.rules",
    "fleet.degraded.alerts",
]
# Packages checked whole, every module found by walking them; route modules (like
# fleet.api's) export only their router, their handlers being registered, not imported.
for _package in ("fleet.auth", "fleet.alerts", "fleet.dashboard", "fleet.images"):
    _found = importlib.import_module(_package)
    MODULES.append(_package)
    MODULES += [
        m.name
        for m in pkgutil.walk_packages(_found.__path__, f"{_package}.")
        if not m.name.startswith(("fleet.dashboard.pages.", "fleet.dashboard.signin"))
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


def test_every_router_module_exports_just_its_router() -> None:
    for name in [
        "artifacts",
        "desired",
        "devices",
        "enroll",
        "groups",
        "models",
        "policies",
        "alerts",
        "rollouts",
        "status",
        "telemetry",
        "tokens",
    ]:
        module = importlib.import_module(f"fleet.api.{name}")
        assert "router" in module.__all__, name
