"""A device simulator: many lightweight agents in one process, speaking the real protocol.

Used to load-test a controller (``edgefleet simulate``, ``scripts/bench-fleet``) and
in integration tests. Each simulated device enrolls over HTTP with its own Ed25519
key, holds its own MQTT session on one shared asyncio loop, answers desired states
and commands as a real agent would (every model "ready", none loaded), and reports
plausible telemetry on a staggered schedule. See docs/simulator.md.

- :mod:`.schedule` and :mod:`.telemetry`: pure decisions (when to send, what to say);
- :mod:`.identity`: keys, signed enrollment requests, identities kept between runs;
- :mod:`.device`: one simulated agent's MQTT session;
- :mod:`.runner`: a fleet of them, with counters;
- :mod:`.cli`: the ``edgefleet simulate`` command.
"""

from fleet.simulate.device import DeviceCounters, DeviceTiming, OfflineMode, SimulatedDevice
from fleet.simulate.hardware import HARDWARE, Hardware, HardwareMix
from fleet.simulate.identity import SimulatedIdentity, load_identity, save_identity
from fleet.simulate.regress import Effects, ModelRef, Regression, RegressionRules
from fleet.simulate.runner import (
    EnrollmentFailed,
    NoToken,
    Simulation,
    SimulationConfig,
    SimulationError,
    SimulationStats,
)
from fleet.simulate.update import ServedModel

__all__ = [
    "HARDWARE",
    "DeviceCounters",
    "DeviceTiming",
    "Effects",
    "EnrollmentFailed",
    "Hardware",
    "HardwareMix",
    "ModelRef",
    "NoToken",
    "OfflineMode",
    "Regression",
    "RegressionRules",
    "ServedModel",
    "SimulatedDevice",
    "SimulatedIdentity",
    "Simulation",
    "SimulationConfig",
    "SimulationError",
    "SimulationStats",
    "load_identity",
    "save_identity",
]
