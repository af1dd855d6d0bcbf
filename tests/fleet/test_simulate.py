"""The device simulator's pure parts: schedule, telemetry values, identities, enrollment."""

from __future__ import annotations

import asyncio
import json
import random
import stat
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

import fleet.simulate
from fleet.simulate.cli import parse_hardware, parse_models, parse_regressions, simulate
from fleet.simulate.hardware import HardwareMix
from fleet.simulate.identity import (
    SimulatedIdentity,
    enrollment_request,
    identity_path,
    load_identity,
    new_private_key,
    public_key_b64,
    save_identity,
)
from fleet.simulate.runner import (
    EnrollmentFailed,
    NoToken,
    Simulation,
    SimulationConfig,
    device_profile,
    enroll,
    enrollment_report,
)
from fleet.simulate.schedule import aligned_base, next_send, shard_indices, start_offset
from fleet.simulate.telemetry import (
    PROFILE_KINDS,
    LoadState,
    device_report,
    next_sample,
    profile_for,
    telemetry_payload,
)
from models.trust import verify_enrollment
from models.wire import (
    BrokerCredentials,
    EnrollmentRequest,
    EnrollmentResponse,
    TelemetryBatch,
    TelemetrySample,
    decode,
)

NOW = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
FLEET = "http://fleet.test:8000"


def test_public_api() -> None:
    assert set(fleet.simulate.__all__) == {
        "HARDWARE",
        "DeviceCounters",
        "DeviceTiming",
        "Effects",
        "EnrollmentFailed",
        "Hardware",
        "HardwareMix",
        "ModelRef",
        "OfflineMode",
        "Regression",
        "RegressionRules",
        "ServedModel",
        "SimulatedIdentity",
        "NoToken",
        "SimulatedDevice",
        "Simulation",
        "SimulationConfig",
        "SimulationError",
        "SimulationStats",
        "load_identity",
        "save_identity",
    }


# --- schedule -------------------------------------------------------------------------------


def test_offsets_spread_sends_evenly_over_the_interval() -> None:
    offsets = [start_offset(i, 2000, 5.0) for i in range(2000)]
    assert len(set(offsets)) == 2000
    assert all(0 <= o < 5.0 for o in offsets)
    per_second = Counter(int(o) for o in offsets)
    assert sorted(per_second.values()) == [400] * 5  # 2,000 devices, 5 s: 400 sends a second


def test_start_offset_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        start_offset(0, 0, 5.0)
    with pytest.raises(ValueError, match="positive"):
        start_offset(0, 10, 0)


def test_next_send_waits_for_the_first_slot() -> None:
    assert next_send(100.0, 2.5, 5.0, now=90.0) == 102.5
    assert next_send(100.0, 2.5, 5.0, now=102.5) == 102.5


def test_next_send_skips_missed_slots_instead_of_bursting() -> None:
    # 13 s late: the slots at 102.5, 107.5 and 112.5 are gone; the next is 117.5.
    assert next_send(100.0, 2.5, 5.0, now=115.5) == 117.5
    rng = random.Random(1)
    for _ in range(1000):
        now = rng.uniform(0, 1000)
        at = next_send(100.0, 1.25, 5.0, now)
        assert now <= at < max(now, 101.25) + 5.0
        assert (at - 101.25) / 5.0 == pytest.approx(round((at - 101.25) / 5.0))


def test_processes_agree_on_the_base() -> None:
    assert aligned_base(1003.7, 5.0) == 1000.0
    assert aligned_base(1004.99, 5.0) == aligned_base(1000.0, 5.0)


def test_shards_partition_the_devices() -> None:
    shards = [list(shard_indices(10, k, 3)) for k in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(i for s in shards for i in s) == list(range(10))
    with pytest.raises(ValueError, match="shard"):
        shard_indices(10, 3, 3)


# --- telemetry ------------------------------------------------------------------------------


def test_profiles_are_deterministic_and_mixed() -> None:
    assert profile_for(7, seed=3) == profile_for(7, seed=3)
    kinds = Counter(profile_for(i, gpu_share=0.3).kind for i in range(3000))
    assert set(kinds) == set(PROFILE_KINDS)
    gpu = kinds["jetson-orin-nano"] + kinds["rtx-desktop"]
    assert 0.25 < gpu / 3000 < 0.35
    assert all(not profile_for(i, gpu_share=0.0).gpu for i in range(200))
    assert all(profile_for(i, gpu_share=1.0).gpu for i in range(200))
    with pytest.raises(ValueError, match="gpu_share"):
        profile_for(0, gpu_share=1.5)


def _samples(index: int, windows: int, seed: int = 0) -> list[dict[str, object]]:
    profile = profile_for(index, seed=seed)
    rng = random.Random(index)
    state = LoadState()
    out = []
    for seq in range(windows):
        sample, state = next_sample(
            profile,
            state,
            rng,
            sample_id=f"sample{index:04d}{seq:06d}",
            seq=seq,
            ts=NOW + timedelta(seconds=5 * seq),
            window_s=5.0,
        )
        out.append(sample)
    return out


def test_every_sample_is_a_valid_telemetry_sample_within_bounds() -> None:
    for index in range(60):
        profile = profile_for(index)
        for raw in _samples(index, 50):
            sample = TelemetrySample.model_validate(raw)  # the wire model's own bounds
            assert sample.errors + sample.rejections <= sample.requests
            assert sample.queue_depth <= profile.queue_limit
            assert sample.model_memory_bytes >= profile.model_memory_bytes
            assert sample.process_memory_bytes is not None
            assert sample.process_memory_bytes > sample.model_memory_bytes
            if sample.requests:
                assert sample.latency_p50_ms is not None
                assert sample.latency_p95_ms is not None
                assert sample.ttft_p50_ms is not None
                assert 0 < sample.ttft_p50_ms < sample.latency_p50_ms <= sample.latency_p95_ms
                assert sample.tokens_per_s is not None
                assert 0 <= sample.tokens_per_s <= profile.slots * profile.tokens_per_s * 1.2
            else:  # nothing measured in an idle window
                assert sample.latency_p50_ms is None
                assert sample.tokens_per_s == 0
            if profile.gpu:
                assert sample.gpu_utilization_percent is not None
                assert 0 <= sample.gpu_utilization_percent <= 100
                assert sample.gpu_memory_used_bytes is not None
                assert profile.gpu_memory_total_bytes is not None
                assert sample.gpu_memory_used_bytes <= profile.gpu_memory_total_bytes
                assert sample.gpu_temperature_c is not None
                assert 20 < sample.gpu_temperature_c < 95
                assert sample.gpu_power_w is not None
                assert 0 < sample.gpu_power_w <= profile.max_power_w * 1.05
            else:
                assert sample.gpu_utilization_percent is None
                assert sample.gpu_power_w is None


def test_samples_vary_over_time_and_between_devices() -> None:
    one = _samples(1, 100)
    requests = [s["requests"] for s in one]
    assert len(set(requests)) > 5
    assert len({s["process_memory_bytes"] for s in one}) > 50
    busy = max(range(300), key=lambda i: profile_for(i).base_rate_rps)
    quiet = min(range(300), key=lambda i: profile_for(i).base_rate_rps)
    assert sum(s["requests"] for s in _samples(busy, 50)) > sum(  # type: ignore[misc]
        s["requests"]
        for s in _samples(quiet, 50)  # type: ignore[misc]
    )


def test_telemetry_payload_decodes_as_a_batch() -> None:
    sample = _samples(3, 1)[0]
    payload = telemetry_payload("dev-0123", "batch0001", NOW, sample)
    batch = decode(TelemetryBatch, payload)
    assert batch.device_id == "dev-0123"
    assert batch.sent_at == NOW
    assert batch.samples[0].id == sample["id"]
    assert batch.dropped == 0


def test_device_reports_match_the_profile() -> None:
    for index in range(30):
        profile = profile_for(index)
        report = device_report(profile, f"sim-{index:05d}", "0.1.0-sim")
        assert report.hostname == f"sim-{index:05d}"
        assert bool(report.gpus) == profile.gpu
        assert report.is_jetson == (profile.kind == "jetson-orin-nano")


# --- identities and enrollment --------------------------------------------------------------


def _identity(index: int = 4, next_seq: int = 0) -> SimulatedIdentity:
    return SimulatedIdentity(
        index=index,
        device_id="dev-0123456789abcdef",
        private_key=new_private_key(),
        broker=BrokerCredentials(
            url="mqtt://127.0.0.1:1883",
            username="dev-0123456789abcdef",
            password="secret-password",
            client_id="dev-0123456789abcdef",
        ),
        fleet_url=FLEET,
        next_seq=next_seq,
    )


def test_identity_round_trip(tmp_path: Path) -> None:
    identity = _identity(next_seq=17)
    save_identity(tmp_path, identity)
    assert load_identity(tmp_path, 4, FLEET) == identity
    assert load_identity(tmp_path, 4, FLEET + "/") == identity
    assert stat.S_IMODE(identity_path(tmp_path, 4).stat().st_mode) == 0o600  # holds a key
    assert "secret-password" not in repr(identity)
    save_identity(tmp_path, identity.with_seq(99))
    reloaded = load_identity(tmp_path, 4, FLEET)
    assert reloaded is not None
    assert reloaded.next_seq == 99
    assert [p.name for p in tmp_path.iterdir()] == ["sim-00004.json"]  # no temporary left


def test_an_identity_for_another_controller_or_unreadable_means_enroll_again(
    tmp_path: Path,
) -> None:
    save_identity(tmp_path, _identity())
    assert load_identity(tmp_path, 4, "http://other:8000") is None
    assert load_identity(tmp_path, 5, FLEET) is None
    identity_path(tmp_path, 4).write_text("{not json")
    assert load_identity(tmp_path, 4, FLEET) is None
    identity_path(tmp_path, 4).write_text(json.dumps({"format": 99}))
    assert load_identity(tmp_path, 4, FLEET) is None


def test_enrollment_requests_verify() -> None:
    key = new_private_key()
    request = enrollment_request(
        token="eft_secret",
        private_key=key,
        name="sim-00001",
        agent_version="0.1.0-sim",
        device=device_report(profile_for(1), "sim-00001", "0.1.0-sim"),
        now=NOW,
    )
    assert verify_enrollment(request, NOW) == __import__("base64").b64decode(public_key_b64(key))
    # and it survives the trip as JSON
    again = EnrollmentRequest.model_validate_json(request.model_dump_json())
    assert verify_enrollment(again, NOW + timedelta(seconds=30))


def _enroll_with(handler: httpx.MockTransport, **config: object) -> SimulatedIdentity:
    async def go() -> SimulatedIdentity:
        async with httpx.AsyncClient(transport=handler) as http:
            return await enroll(
                http,
                fleet_url=FLEET,
                token="eft_secret",
                index=2,
                private_key=new_private_key(),
                config=SimulationConfig(devices=3, fleet_url=FLEET, **config),  # type: ignore[arg-type]
            )

    return asyncio.run(go())


def _response(device_id: str = "dev-feedface00000001") -> dict[str, object]:
    return EnrollmentResponse(
        device_id=device_id,
        broker=BrokerCredentials(
            url="mqtt://127.0.0.1:1883", username=device_id, password="pw", client_id=device_id
        ),
    ).model_dump(mode="json")


def test_enroll_sends_a_signed_request_and_keeps_the_answer() -> None:
    seen: list[EnrollmentRequest] = []

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/enroll"
        assert request.headers["content-type"] == "application/json"
        body = EnrollmentRequest.model_validate_json(request.content)
        verify_enrollment(body, datetime.now(UTC))
        seen.append(body)
        return httpx.Response(201, json=_response())

    identity = _enroll_with(httpx.MockTransport(handle))
    assert identity.device_id == "dev-feedface00000001"
    assert identity.index == 2
    assert identity.fleet_url == FLEET
    assert identity.broker.password == "pw"
    assert seen[0].name == "sim-00002"
    assert public_key_b64(identity.private_key) == seen[0].public_key


def test_enroll_retries_transient_failures_with_the_same_key() -> None:
    keys: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        keys.append(EnrollmentRequest.model_validate_json(request.content).public_key)
        if len(keys) == 1:
            return httpx.Response(503, json={"error": {"message": "broker sync failed"}})
        return httpx.Response(200, json=_response())

    assert _enroll_with(httpx.MockTransport(handle)).device_id == "dev-feedface00000001"
    assert len(keys) == 2
    assert keys[0] == keys[1]  # a retry is a replay of the same device, not a new one


def test_enroll_gives_up_at_once_when_refused() -> None:
    calls = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(403, json={"error": {"message": "token is used up"}})

    with pytest.raises(EnrollmentFailed, match="token is used up") as caught:
        _enroll_with(httpx.MockTransport(handle))
    assert not caught.value.transient
    assert calls == 1


def test_enroll_stops_retrying_after_its_attempts() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(EnrollmentFailed, match="ConnectError") as caught:
        _enroll_with(httpx.MockTransport(handle), enroll_attempts=2)
    assert caught.value.transient


def test_devices_without_identity_need_a_token(tmp_path: Path) -> None:
    save_identity(tmp_path, _identity(index=0))
    config = SimulationConfig(devices=2, fleet_url=FLEET, state_dir=tmp_path)
    with pytest.raises(NoToken, match="1 of 2 devices"):
        asyncio.run(Simulation(config).run())


def test_saved_identities_are_reused_without_enrolling(tmp_path: Path) -> None:
    for index in range(3):
        save_identity(tmp_path, _identity(index=index))
    config = SimulationConfig(devices=3, fleet_url=FLEET, state_dir=tmp_path, duration_s=0)
    stats = asyncio.run(Simulation(config).run())
    assert stats.reused == 3
    assert stats.enrolled == 0
    assert stats.phase == "done"
    assert stats.counters.connect_attempts == 0  # duration 0: identities only


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="devices"):
        SimulationConfig(devices=0, fleet_url=FLEET)
    with pytest.raises(ValueError, match="shard"):
        SimulationConfig(devices=5, fleet_url=FLEET, shard=2, shards=2)
    assert list(SimulationConfig(devices=5, fleet_url=FLEET, shard=1, shards=2).indices) == [1, 3]


def test_the_config_picks_reports_and_profiles_by_hardware_else_the_default() -> None:
    default = SimulationConfig(devices=4, fleet_url="http://x")
    assert device_profile(2, default) == profile_for(2)
    mixed = SimulationConfig(
        devices=4, fleet_url="http://x", hardware=HardwareMix.of("pi4-4g", "x86-rtx3060-16g")
    )
    assert device_profile(0, mixed).kind == "pi4-4g"
    assert device_profile(1, mixed).kind == "x86-rtx3060-16g"
    report = enrollment_report(1, mixed)
    assert report.hostname == "sim-00001"
    assert report.gpus[0].name == "NVIDIA GeForce RTX 3060"
    assert enrollment_report(0, mixed).gpus == []


# --- command-line options -------------------------------------------------------------------


def test_cli_options_parse_models_rules_and_hardware() -> None:
    models = parse_models(["gemma3-270m@1.0", "minilm@6/int8"])
    assert [(m.name, m.version, m.variant) for m in models] == [
        ("gemma3-270m", "1.0", None),
        ("minilm", "6", "int8"),
    ]
    assert parse_models(None) == ()
    rules = parse_regressions(["gemma3@2.0:latency=3.0", "gemma3@2.0/Q8_0:errors=0.2,golden=fail"])
    assert [str(rule) for rule in rules.rules] == [
        "gemma3@2.0:latency=3",
        "gemma3@2.0/Q8_0:errors=0.2,golden=fail",
    ]
    mix = parse_hardware(["pi4-4g:2", "orin-nano-8g"])
    assert mix is not None
    assert str(mix) == "pi4-4g:2,orin-nano-8g:1"
    assert parse_hardware(None) is None


@pytest.mark.parametrize(
    ("parse", "value", "complaint"),
    [
        (parse_models, ["gemma3"], "NAME@VERSION"),
        (parse_models, ["gemma3@1", "gemma3@2"], "one version of each model"),
        (parse_regressions, ["gemma3@2.0:fast"], "is not an effect"),
        (parse_hardware, ["cray-1"], "unknown hardware profile"),
    ],
)
def test_cli_options_refuse_nonsense_as_usage_errors(
    parse: Callable[[list[str]], object], value: list[str], complaint: str
) -> None:
    with pytest.raises(typer.BadParameter, match=complaint):
        parse(value)


def test_cli_help_lists_the_new_options() -> None:
    app = typer.Typer()
    app.command()(simulate)
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for option in ("--model", "--regress", "--hardware", "--update-time", "--update-jitter"):
        assert option in result.output
