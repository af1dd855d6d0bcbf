"""Is the device too hot to serve from its GPU? A pure verdict on the probe's readings.

The agent samples its GPUs (:class:`agent.probe.GpuSampler`) and asks
:func:`thermal_verdict` with each model's breaker settings; a verdict holds the
breaker open (:meth:`agent.serving.breaker.Breaker.hold`), ``None`` releases the hold.
A reading the probe could not take (``None``) never trips anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.device import GpuSample
from models.policy import BreakerSettings, FailureKind

__all__ = ["thermal_verdict"]


def thermal_verdict(
    samples: Sequence[GpuSample], settings: BreakerSettings
) -> tuple[FailureKind, str] | None:
    """``(THERMAL, reason)`` when a GPU is too hot or (if the policy says so) throttled.

    Too hot: ``temperature_c >= settings.max_temperature_c`` (when set). Throttled:
    ``settings.open_on_throttle`` and the probe saw a thermal or power limit slowing
    the clocks. The reason names every such GPU, e.g. "GPU 0 at 87.0 °C >= 85 °C".
    """
    limit = settings.max_temperature_c
    problems: list[str] = []
    for sample in samples:
        if limit is not None and sample.temperature_c is not None and sample.temperature_c >= limit:
            problems.append(f"GPU {sample.index} at {sample.temperature_c:.1f} °C >= {limit:g} °C")
        if settings.open_on_throttle and sample.throttled:
            problems.append(f"GPU {sample.index} is throttled (thermal or power limit)")
    return (FailureKind.THERMAL, "; ".join(problems)) if problems else None
