"""A device simulator: many lightweight agents in one process, speaking the real protocol.

Used to load-test a controller (``edgefleet simulate``, ``scripts/bench-fleet``) and
in integration tests. Each simulated device enrolls over HTTP with its own Ed25519
key and a hardware report, holds its own MQTT session on one shared asyncio loop,
answers desired states and commands as a real agent would (an update to a new target
takes a moment and emits the agent's update events; no model is loaded), and reports
plausible telemetry on a staggered schedule. Regression rules make chosen model
versions slower, error-prone or fail their health check, so staged rollouts and their
gates can be tested; devices can be taken offline and brought back. See
docs/simulator.md.

In a test, everything on the running event loop, nothing in threads::

    config = SimulationConfig(
        devices=10, fleet_url=url, token=token,
        models=(ServedModel.initial(ModelRef.parse("gemma3-270m@1.0")),),
        regressions=RegressionRules.parse(["gemma3-270m@2.0:golden=fail"]),
        hardware=HardwareMix.parse(["orin-nano-8g,x86-cpu-8g"]),
    )
    async with Simulation(config) as sim:   # enrolled, connected, reported
        await sim.take_offline(3)           # by index, device id or SimulatedDevice
        await sim.bring_online(3)
        sim.device(3).served                # model name -> ServedModel
        sim.stats.counters.updated          # updates that ended healthy

- :mod:`.schedule`, :mod:`.telemetry`, :mod:`.regress`, :mod:`.hardware` and
  :mod:`.update`: pure decisions (when to send, what to say, what a version does, what
  a device is, what it serves and reports);
- :mod:`.identity`: keys, signed enrollment requests, identities kept between runs;
- :mod:`.device`: one simulated agent's MQTT session, its updates, going offline;
- :mod:`.runner`: a fleet of them, with counters and the in-process API;
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
