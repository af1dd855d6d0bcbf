"""The simulator's regression rules, hardware profiles and telemetry under a regression (pure)."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleet.simulate.hardware import HARDWARE, HardwareMix
from fleet.simulate.regress import (
    NO_EFFECTS,
    Effects,
    ModelRef,
    Regression,
    RegressionRules,
    target_parts,
)
from fleet.simulate.telemetry import DeviceProfile, LoadState, next_sample, profile_for
from models.device import DeviceReport
from models.wire import TelemetrySample

NOW = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)

# --- the rule parser -------------------------------------------------------------------------


def test_a_rule_names_a_version_and_its_effects() -> None:
    rule = Regression.parse("gemma3-270m@2.0:latency=3.0")
    assert rule.model == ModelRef("gemma3-270m", "2.0")
    assert rule.effects == Effects(latency=3.0)
    assert str(rule) == "gemma3-270m@2.0:latency=3"


def test_a_rule_may_name_a_variant_and_several_effects() -> None:
    rule = Regression.parse("gemma3@2.0/Q8_0:errors=0.2, golden=fail,tps=0.5,install=fail,restart")
    assert rule.model == ModelRef("gemma3", "2.0", "Q8_0")
    assert rule.effects == Effects(
        tps=0.5, error_rate=0.2, golden_fail=True, install_fail=True, restart=True
    )
    assert Regression.parse(str(rule)) == rule  # its text form parses back


def test_errors_may_be_zero() -> None:
    assert Regression.parse("m@1:errors=0").effects.error_rate == 0.0


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("gemma3@2.0", "is not like NAME@VERSION"),
        ("gemma3@2.0:", "is not like NAME@VERSION"),
        ("gemma3:latency=2", "is not like NAME@VERSION or"),
        ("Gemma3@2.0:latency=2", "is not a model name"),
        ("gemma3@:latency=2", "is not a version"),
        ("gemma3@2.0/:latency=2", "is not a variant name"),
        ("gemma3@2.0/Q8 0:latency=2", "is not a variant name"),
        ("gemma3@2.0:latency=fast", "is not a number"),
        ("gemma3@2.0:latency=0", "positive factor"),
        ("gemma3@2.0:tps=-1", "positive factor"),
        ("gemma3@2.0:latency=inf", "finite"),
        ("gemma3@2.0:errors=1.5", "between 0 and 1"),
        ("gemma3@2.0:fallbacks=-0.1", "between 0 and 1"),
        ("gemma3@2.0:golden=pass", "is not an effect"),
        ("gemma3@2.0:install", "is not an effect"),
        ("gemma3@2.0:restart=2", "is not an effect"),
        ("gemma3@2.0:speed=2", "is not an effect"),
        ("gemma3@2.0:latency=2,latency=3", "given twice"),
    ],
)
def test_a_bad_rule_says_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        Regression.parse(text)


def test_rules_match_name_version_and_variant() -> None:
    rules = RegressionRules.parse(
        ["gemma3@2.0:latency=2", "gemma3@2.0/Q8_0:errors=0.2,latency=1.5", "minilm@7:tps=0.5"]
    )
    assert rules.effects_for("gemma3", "2.0", "Q4_K_M") == Effects(latency=2.0)
    assert rules.effects_for("gemma3", "2.0", None) == Effects(latency=2.0)
    assert rules.effects_for("gemma3", "2.0", "Q8_0") == Effects(latency=3.0, error_rate=0.2)
    assert rules.effects_for("gemma3", "1.0", "Q8_0") == NO_EFFECTS
    assert rules.effects_for("gemma4", "2.0", None) == NO_EFFECTS
    # serving several models at once: factors multiply, the highest error share wins
    both = rules.serving([("gemma3", "2.0", "Q8_0"), ("minilm", "7", None)])
    assert both == Effects(latency=3.0, tps=0.5, error_rate=0.2)
    assert not RegressionRules()
    assert RegressionRules().serving([("gemma3", "2.0", None)]) == NO_EFFECTS


def test_target_paths_give_name_version_and_variant() -> None:
    assert target_parts("gemma3-270m/1.1/Q4_K_M.gguf") == ("gemma3-270m", "1.1", "Q4_K_M")
    assert target_parts("minilm/7/int8.onnx") == ("minilm", "7", "int8")
    assert target_parts("minilm/int8.onnx") is None
    assert target_parts("a/b/c") is None
    assert target_parts("a//c.gguf") is None


# --- samples under a regression --------------------------------------------------------------


def _window(
    profile: DeviceProfile, effects: Effects, seed: int, windows: int = 200
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    state = LoadState()
    out = []
    for seq in range(windows):
        sample, state = next_sample(
            profile,
            state,
            rng,
            sample_id=f"sample{seq:08d}",
            seq=seq,
            ts=NOW + timedelta(seconds=5 * seq),
            window_s=5.0,
            effects=effects,
        )
        out.append(sample)
    return out


def _busy_profile() -> DeviceProfile:
    return max((profile_for(i) for i in range(200)), key=lambda p: p.base_rate_rps)


def test_latency_and_tps_factors_move_exactly_those_numbers() -> None:
    profile = _busy_profile()
    before = _window(profile, NO_EFFECTS, seed=5)
    after = _window(profile, Effects(latency=3.0, tps=0.5), seed=5)
    measured = 0
    for old, new in zip(before, after, strict=True):
        TelemetrySample.model_validate(new)
        # the load is the same: same requests, queue, rejections and errors
        for key in ("requests", "rejections", "errors", "queue_depth", "model_memory_bytes"):
            assert old[key] == new[key]
        if old["requests"]:
            measured += 1
            for key in ("latency_p50_ms", "latency_p95_ms", "ttft_p50_ms"):
                assert new[key] == pytest.approx(old[key] * 3.0, abs=0.2)
            assert new["tokens_per_s"] == pytest.approx(old["tokens_per_s"] * 0.5, abs=0.02)
        else:
            assert "latency_p50_ms" not in new
    assert measured > 100


def test_an_error_rate_sets_the_share_of_failed_requests() -> None:
    profile = _busy_profile()
    baseline = _window(profile, NO_EFFECTS, seed=9, windows=400)
    broken = _window(profile, Effects(error_rate=0.2), seed=9, windows=400)

    def share(samples: list[dict[str, Any]]) -> float:
        served = sum(s["requests"] - s["rejections"] for s in samples)
        assert served > 2000
        return float(sum(s["errors"] for s in samples)) / served

    assert share(baseline) < 0.01
    assert 0.17 < share(broken) < 0.23
    for sample in broken:
        valid = TelemetrySample.model_validate(sample)
        assert valid.errors + valid.rejections <= valid.requests
    assert all(s["errors"] == 0 for s in _window(profile, Effects(error_rate=0.0), seed=9))


def test_a_fallback_rate_sets_the_share_answered_by_fallbacks_and_moves_nothing_else() -> None:
    rule = Regression.parse("gemma3@2.0:fallbacks=0.3,latency=2")
    assert rule.effects == Effects(latency=2.0, fallback_rate=0.3)
    assert str(rule) == "gemma3@2.0:latency=2,fallbacks=0.3"
    assert Effects(fallback_rate=0.1).combine(Effects(fallback_rate=0.3)).fallback_rate == 0.3
    profile = _busy_profile()
    baseline = _window(profile, NO_EFFECTS, seed=9, windows=400)
    degraded = _window(profile, Effects(fallback_rate=0.3), seed=9, windows=400)

    def share(samples: list[dict[str, Any]]) -> float:
        served: int = sum(s["requests"] - s["rejections"] for s in samples)
        assert served > 2000
        fallbacks: int = sum(s["fallbacks"] for s in samples)
        return fallbacks / served

    assert share(baseline) < 0.01
    assert 0.27 < share(degraded) < 0.33
    for old, new in zip(baseline, degraded, strict=True):
        valid = TelemetrySample.model_validate(new)
        assert valid.fallbacks == sum(valid.fallbacks_by_tier.values())
        for key in ("requests", "errors", "latency_p95_ms", "tokens_per_s", "gpu_power_w"):
            assert old.get(key) == new.get(key)


# --- hardware --------------------------------------------------------------------------------


def test_every_hardware_profile_reports_plausibly() -> None:
    for name, hardware in HARDWARE.items():
        report = hardware.report("sim-00001", "0.1.0-sim")
        DeviceReport.model_validate(report.model_dump())  # within the model's own bounds
        assert report.arch in {"aarch64", "x86_64"}
        assert report.is_jetson == name.startswith("orin-")
        assert bool(report.gpus) == hardware.has_gpu == report.llama_gpu_offload
        for gpu in report.gpus:
            assert gpu.compute_capability in {"8.6", "8.7", "8.9"}
            assert gpu.memory_total_bytes > 0
        if report.is_jetson:
            assert report.l4t_version == "36.4.0"
            assert report.gpus[0].memory_total_bytes == report.ram_total_bytes  # shared
        profile = hardware.profile(3, seed=1)
        assert profile == hardware.profile(3, seed=1)
        assert profile.kind == name
        assert profile.gpu == hardware.has_gpu
        for sample in _window(profile, NO_EFFECTS, seed=2, windows=50):
            TelemetrySample.model_validate(sample)


def test_the_named_profiles_the_rollout_cares_about() -> None:
    pi = HARDWARE["pi4-4g"].report("pi", "v")
    assert (pi.arch, pi.gpus, pi.ram_total_bytes < 4 * 10**9) == ("aarch64", [], True)
    orin = HARDWARE["orin-nano-8g"].report("orin", "v")
    assert orin.gpus[0].compute_capability == "8.7"
    rtx = HARDWARE["x86-rtx3060-16g"].report("rtx", "v")
    assert rtx.gpus[0].compute_capability == "8.6"
    assert rtx.gpus[0].memory_total_bytes == 12 * 2**30
    assert HARDWARE["x86-cpu-2g"].report("small", "v").ram_total_bytes < 2 * 10**9


def test_a_mix_is_round_robin_or_weighted_and_interleaved() -> None:
    mix = HardwareMix.parse(["pi4-4g,orin-nano-8g", "x86-cpu-8g"])
    assert [mix.pick(i).name for i in range(4)] == [
        "pi4-4g",
        "orin-nano-8g",
        "x86-cpu-8g",
        "pi4-4g",
    ]
    weighted = HardwareMix.parse(["pi4-4g:3,orin-nano-8g"])
    names = [weighted.pick(i).name for i in range(8)]
    assert Counter(names) == {"pi4-4g": 6, "orin-nano-8g": 2}
    assert names[:4].count("orin-nano-8g") == 1  # spread through the cycle, not bunched
    assert HardwareMix.parse([str(weighted)]) == weighted
    assert HardwareMix.of("x86-cpu-16g").pick(99).name == "x86-cpu-16g"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (["pi5"], "unknown hardware profile 'pi5'; known: pi4-4g"),
        (["pi4-4g:0"], "whole number from 1"),
        (["pi4-4g:x"], "whole number from 1"),
        (["pi4-4g,pi4-4g"], "given twice"),
        ([], "at least one profile"),
    ],
)
def test_a_bad_mix_says_what_is_wrong(values: list[str], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        HardwareMix.parse(values)
