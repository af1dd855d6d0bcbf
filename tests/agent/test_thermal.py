import pytest

import agent.serving.thermal
from agent.serving.thermal import thermal_verdict
from models.device import GpuSample
from models.policy import BreakerSettings, FailureKind

HOT = BreakerSettings(max_temperature_c=85)
THROTTLE = BreakerSettings(open_on_throttle=True)
BOTH = BreakerSettings(max_temperature_c=85, open_on_throttle=True)


def test_public_api() -> None:
    assert agent.serving.thermal.__all__ == ["thermal_verdict"]


def test_a_gpu_at_the_limit_is_too_hot() -> None:
    assert thermal_verdict([GpuSample(index=0, temperature_c=85.0)], HOT) == (
        FailureKind.THERMAL,
        "GPU 0 at 85.0 °C >= 85 °C",
    )
    assert thermal_verdict([GpuSample(index=0, temperature_c=87.04)], HOT) == (
        FailureKind.THERMAL,
        "GPU 0 at 87.0 °C >= 85 °C",
    )


def test_a_gpu_just_below_the_limit_is_fine() -> None:
    assert thermal_verdict([GpuSample(index=0, temperature_c=84.9)], HOT) is None


def test_no_limit_means_no_thermal_trip() -> None:
    assert thermal_verdict([GpuSample(index=0, temperature_c=120.0)], BreakerSettings()) is None


def test_an_unknown_temperature_never_trips() -> None:
    assert thermal_verdict([GpuSample(index=0)], BOTH) is None
    assert thermal_verdict([], BOTH) is None


def test_throttling_trips_only_when_the_policy_says_so() -> None:
    throttled = [GpuSample(index=0, throttled=True, temperature_c=60.0)]
    assert thermal_verdict(throttled, THROTTLE) == (
        FailureKind.THERMAL,
        "GPU 0 is throttled (thermal or power limit)",
    )
    assert thermal_verdict(throttled, HOT) is None
    assert thermal_verdict([GpuSample(index=0, throttled=False)], THROTTLE) is None
    assert thermal_verdict([GpuSample(index=0, throttled=None)], THROTTLE) is None


def test_the_reason_names_every_gpu_in_trouble() -> None:
    samples = [
        GpuSample(index=0, temperature_c=70.0),
        GpuSample(index=1, temperature_c=91.5, throttled=True),
        GpuSample(index=2, temperature_c=60.0, throttled=True),
    ]
    assert thermal_verdict(samples, BOTH) == (
        FailureKind.THERMAL,
        "GPU 1 at 91.5 °C >= 85 °C; GPU 1 is throttled (thermal or power limit); "
        "GPU 2 is throttled (thermal or power limit)",
    )


@pytest.mark.parametrize("limit", [85.5, 90.25])
def test_a_fractional_limit_is_printed_as_given(limit: float) -> None:
    settings = BreakerSettings(max_temperature_c=limit)
    verdict = thermal_verdict([GpuSample(index=3, temperature_c=100.0)], settings)
    assert verdict == (FailureKind.THERMAL, f"GPU 3 at 100.0 °C >= {limit} °C")
