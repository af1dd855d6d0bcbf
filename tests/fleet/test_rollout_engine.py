"""The rollout engine against a database-level fleet: stages, gates, aborts, timeouts.

Runs on SQLite and on PostgreSQL (``database_url``). The devices are rows the tests
write as the ingest would; the broker, the simulator and a real agent are in
``tests/integration/test_rollouts.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlmodel import Session

from fleet.errors import Conflict, InvalidInput
from fleet.rollout.evidence import gather
from fleet.rollout.spec import RolloutSpec
from fleet.rollout.step import Step  # the step itself, to run two from one revision
from fleet.tables import Device, Rollout, RolloutDevice
from models.wire import EventKind
from tests.fleet.rollout_world import GB, MODEL, World, report, sha


@pytest.fixture
def world(database_url: str) -> Iterator[World]:
    world = World.on(database_url)
    world.artifact("1.0")
    world.artifact("2.0")
    yield world
    world.db.dispose()


def fleet_of(world: World, count: int, *, p95_ms: float = 100.0) -> list[str]:
    ids = [f"dev-{i:03d}" for i in range(count)]
    for device_id in ids:
        world.device(device_id)
        world.telemetry(device_id, p95_ms=p95_ms)  # the baseline, before any change
    return ids


def issued(world: World, rollout_id: str) -> list[str]:
    return sorted(d for d, m in world.members(rollout_id).items() if m.state == "updating")


def install_all(world: World, rollout_id: str, *, p95_ms: float = 100.0) -> list[str]:
    """Every updating device installs healthily, the engine notices, then it serves a while."""
    done = issued(world, rollout_id)
    world.clock.advance(seconds=5)
    for device_id in done:
        world.install(device_id)
    world.step(rollout_id)
    world.clock.advance(seconds=60)
    for device_id in done:
        world.telemetry(device_id, p95_ms=p95_ms)
    return done


GATED: dict[str, Any] = {
    "canary": {"count": 1},
    "stages": {"kind": "waves", "percents": [50, 100]},
    "soak_s": 60,
    "check_interval_s": 30,
    "gates": [
        {
            "metric": "p95_latency_ms",
            "window_s": 120,
            "min_samples": 3,
            "max_increase_percent": 20,
            "max_consecutive_failures": 1,
        }
    ],
}


def test_a_good_rollout_completes_every_stage_once(world: World) -> None:
    """Canary, 50%, 100%: each stage starts once, every device ends up updated."""
    ids = fleet_of(world, 6)
    rollout = world.create(**GATED)
    seen_stages = []
    for _ in range(20):
        world.step(rollout)
        row = world.rollout(rollout)
        if row.status == "completed":
            break
        seen_stages.append(row.stage)
        install_all(world, rollout)
    row = world.rollout(rollout)
    assert row.status == "completed", (row.phase, row.reason, world.states(rollout))
    assert set(world.states(rollout).values()) == {"updated"}
    assert sorted(set(seen_stages)) == [0, 1, 2]
    started = [e.data["stage"] for e in world.audit(rollout) if e.action == "rollout.stage_started"]
    assert started == [1, 2]
    assert world.actions(rollout)[-1] == "rollout.completed"
    # Each device got the change in exactly one desired state, carrying the 2.0 target.
    per_device = {d: [s for s in world.link.published if s.device_id == d] for d in ids}
    assert all(len(states) == 1 for states in per_device.values()), per_device
    assert all(
        states[0].models[0].target is not None
        and states[0].models[0].target.sha256 == sha("2.0/Q4_K_M")
        for states in per_device.values()
    )
    # No gate check failed; each stage's last one passed, with its evidence stored.
    checks = world.gate_checks(rollout)
    assert {c.decision for c in checks} <= {"pass", "wait"}
    last_per_stage = {c.stage: c.decision for c in checks}
    assert last_per_stage == {0: "pass", 1: "pass", 2: "pass"}
    assert checks[0].evidence["baseline"]["samples"] >= 3


def test_the_canary_goes_first_and_alone(world: World) -> None:
    fleet_of(world, 10)
    rollout = world.create(**GATED)
    world.step(rollout)
    assert len(issued(world, rollout)) == 1
    assert sum(1 for s in world.states(rollout).values() if s == "pending") == 9


def test_a_canary_that_regresses_p95_fails_its_gate_and_is_rolled_back(world: World) -> None:
    ids = fleet_of(world, 5)
    rollout = world.create(**GATED)
    world.step(rollout)
    (canary,) = install_all(world, rollout, p95_ms=300.0)  # three times slower
    world.step(rollout)  # the gate check: fail, abort
    row = world.rollout(rollout)
    assert row.status == "aborted", row.phase
    assert "p95_latency_ms" in row.reason
    assert world.states(rollout)[canary] == "rolled_back"
    # The others were never touched.
    assert all(world.states(rollout)[d] == "pending" for d in ids if d != canary)
    # A new signed desired state puts the canary back on 1.0's artifact.
    restored = world.desired_of(canary)
    assert restored is not None
    target = restored.models[0].target
    assert target is not None
    assert target.sha256 == sha("1.0/Q4_K_M")
    assert world.link.published[-1].device_id == canary
    assert world.link.published[-1].version == restored.version
    check = world.gate_checks(rollout)[-1]
    assert check.verdict == "fail"
    assert check.decision == "abort"
    assert check.evidence["updated"]["value"] == pytest.approx(300.0)
    assert check.evidence["baseline"]["value"] == pytest.approx(100.0)
    aborted = next(e for e in world.audit(rollout) if e.action == "rollout.aborted")
    assert aborted.actor == "controller"
    assert aborted.data["rolled_back"] == 1
    assert "rolled back" in aborted.reason


def test_health_check_failures_trip_an_abort_rule(world: World) -> None:
    fleet_of(world, 4)
    rollout = world.create(
        canary={"count": 2},
        abort_rules=[{"failure": "health_check_failed", "threshold_count": 1}],
    )
    world.step(rollout)
    first, second = issued(world, rollout)
    world.install(first, healthy=False)
    world.install(second)
    world.step(rollout)
    row = world.rollout(rollout)
    assert row.status == "aborted"
    members = world.members(rollout)
    assert members[first].failure == "health_check_failed"
    assert {members[first].state, members[second].state} == {"rolled_back"}
    assert "health_check_failed" in row.reason


def test_a_device_that_serves_the_version_without_passing_its_check_is_not_updated(
    world: World,
) -> None:
    """A finished download, even a reported version, is not success (hawkBit#3185)."""
    fleet_of(world, 1)
    rollout = world.create(device_timeout_s=600)
    world.step(rollout)
    (device,) = issued(world, rollout)
    world.report(device, "2.0", sha("2.0/Q4_K_M"))  # serves it, but no update_healthy yet
    world.step(rollout)
    assert world.states(rollout)[device] == "updating"
    world.event(
        device, EventKind.UPDATE_HEALTHY, model=MODEL, version="2.0", sha256=sha("2.0/Q4_K_M")
    )
    world.step(rollout)
    assert world.states(rollout)[device] == "updated"


def test_an_offline_device_times_out_without_blocking_its_wave_and_updates_on_return(
    world: World,
) -> None:
    fleet_of(world, 3)
    world.set_online("dev-002", False)
    rollout = world.create(device_timeout_s=300, soak_s=0)
    world.step(rollout)
    assert len(issued(world, rollout)) == 3  # the offline one gets its retained desired state
    for device_id in ("dev-000", "dev-001"):
        world.install(device_id)
    world.clock.advance(seconds=301)
    world.step(rollout)
    members = world.members(rollout)
    assert members["dev-002"].state == "timed_out"
    assert members["dev-002"].failure == "timed_out"
    world.step(rollout)  # soak 0: the stage is done although dev-002 never answered
    assert world.rollout(rollout).status == "completed"
    # It comes back and installs; the rollout is over, so the record stays what it was.
    assert "rollout.device_failed" in world.actions(rollout)


def test_a_timed_out_device_that_reports_late_counts_as_updated(world: World) -> None:
    fleet_of(world, 2)
    rollout = world.create(device_timeout_s=300, soak_s=3600)
    world.step(rollout)
    world.install("dev-000")
    world.clock.advance(seconds=301)
    world.step(rollout)
    assert world.states(rollout)["dev-001"] == "timed_out"
    world.install("dev-001")
    world.step(rollout)
    assert world.states(rollout)["dev-001"] == "updated"


def test_a_device_that_joins_mid_rollout_gets_the_current_stage(world: World) -> None:
    fleet_of(world, 4)
    rollout = world.create(canary={"count": 1}, stages={"percents": [50, 100]}, soak_s=0)
    world.step(rollout)
    install_all(world, rollout)
    world.step(rollout)  # canary done -> stage 1
    assert world.rollout(rollout).stage == 1
    world.device("dev-new")
    world.step(rollout)
    member = world.members(rollout)["dev-new"]
    assert member.stage == 1
    assert member.state == "updating"
    assert "joined" in " ".join(e.action for e in world.audit(rollout))


def test_a_device_that_joins_during_the_canary_waits_for_the_waves(world: World) -> None:
    fleet_of(world, 4)
    rollout = world.create(canary={"count": 1}, soak_s=600)
    world.step(rollout)
    world.device("dev-new")
    world.step(rollout)
    assert world.members(rollout)["dev-new"].state == "pending"


def test_variants_are_chosen_per_device_and_unfit_devices_are_ineligible(world: World) -> None:
    world.artifact("2.0", "Q8_0", ram_bytes=6 * GB)
    world.artifact("2.0", "F16", ram_bytes=20 * GB, requirements={"arch": ["x86_64"]})
    world.device("big", hardware=report(ram_gb=16))
    world.device("small", hardware=report(ram_gb=4))
    world.device("arm", hardware=report(ram_gb=16, arch="aarch64"))
    world.artifact("3.0", "Q8_0", ram_bytes=12 * GB)
    rollout = world.create()
    members = world.members(rollout)
    assert (members["big"].variant, members["small"].variant) == ("Q8_0", "Q4_K_M")
    assert members["arm"].variant == "Q8_0"
    assert world.states(rollout) == {"big": "pending", "small": "pending", "arm": "pending"}
    # 3.0 has only a 12 GB variant: the 4 GB device is ineligible, never failed.
    world.act(rollout, "abort")
    other = world.create(change={"model": MODEL, "version": "3.0"})
    members = world.members(other)
    assert members["small"].state == "ineligible"
    assert "RAM" in members["small"].detail
    assert members["small"].failure is None


def test_a_second_live_rollout_of_the_model_on_the_same_devices_is_refused(world: World) -> None:
    fleet_of(world, 2)
    first = world.create()
    with pytest.raises(Conflict, match=first):
        world.create(change={"model": MODEL, "version": "1.0"})
    world.act(first, "abort")
    world.create(change={"model": MODEL, "version": "1.0"})  # the first is over: allowed


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"target": {"groups": ["nowhere"]}}, "target.groups"),
        ({"target": {"devices": ["dev-404"]}}, "target.devices"),
        ({"target": {"facts": {"arch": ["riscv64"]}}}, "target"),
        ({"change": {"model": MODEL, "version": "9.9"}}, "change.version"),
        ({"change": {"model": "llama", "version": "1.0"}}, "change.model"),
    ],
)
def test_bad_targets_and_versions_name_the_field(
    world: World, spec: dict[str, Any], field: str
) -> None:
    fleet_of(world, 1)
    with pytest.raises(InvalidInput) as caught:
        world.create(**spec)
    assert caught.value.field == field
    assert world.link.published == []


def test_a_yanked_version_and_a_variant_no_device_can_run_are_refused(world: World) -> None:
    fleet_of(world, 1)
    world.artifact("3.0", yanked=True)
    with pytest.raises(InvalidInput, match="yanked"):
        world.create(change={"model": MODEL, "version": "3.0"})
    world.artifact("4.0", "F16", ram_bytes=64 * GB)
    with pytest.raises(InvalidInput, match="no variant") as caught:
        world.create(change={"model": MODEL, "version": "4.0"})
    assert caught.value.field == "change.version"


def test_pause_holds_the_stages_and_resume_carries_on(world: World) -> None:
    fleet_of(world, 4)
    rollout = world.create(canary={"count": 1}, soak_s=0)
    world.step(rollout)
    world.act(rollout, "pause", "looking at the canary")
    (canary,) = issued(world, rollout)
    world.install(canary)
    world.step(rollout)
    world.step(rollout)
    assert world.rollout(rollout).stage == 0
    assert world.states(rollout)[canary] == "updated"  # a paused rollout still watches
    with pytest.raises(Conflict):
        world.act(rollout, "pause")
    world.act(rollout, "resume")
    world.step(rollout)
    world.step(rollout)
    assert world.rollout(rollout).stage == 1
    entries = world.audit(rollout)
    paused = next(e for e in entries if e.action == "rollout.paused")
    assert (paused.actor, paused.reason) == ("admin:test", "looking at the canary")


def test_approval_waits_for_an_admin_and_the_audit_log_says_who(world: World) -> None:
    fleet_of(world, 3)
    rollout = world.create(canary={"count": 1}, soak_s=0, approval=True)
    world.step(rollout)
    install_all(world, rollout)
    world.step(rollout)
    world.step(rollout)
    row = world.rollout(rollout)
    assert (row.stage, row.phase) == (0, "awaiting_approval")
    world.step(rollout)
    assert world.rollout(rollout).stage == 0
    world.act(rollout, "approve", "canary looks fine")
    row = world.rollout(rollout)
    assert (row.stage, row.phase) == (1, "rolling")
    approved = next(e for e in world.audit(rollout) if e.action == "rollout.approved")
    assert approved.actor == "admin:test"


def test_an_admin_abort_rolls_back_every_changed_device(world: World) -> None:
    ids = fleet_of(world, 4)
    rollout = world.create(stages={"percents": [100]}, soak_s=600)
    world.step(rollout)
    install_all(world, rollout)
    world.step(rollout)
    world.act(rollout, "abort", "wrong model")
    assert set(world.states(rollout).values()) == {"rolled_back"}
    for device_id in ids:
        state = world.desired_of(device_id)
        assert state is not None
        assert state.models[0].target is not None
        assert state.models[0].target.sha256 == sha("1.0/Q4_K_M")
    with pytest.raises(Conflict, match="aborted"):
        world.act(rollout, "resume")


def test_the_concurrency_cap_counts_only_online_devices_updating(world: World) -> None:
    fleet_of(world, 5)
    world.set_online("dev-000", False)
    rollout = world.create(max_concurrent=2, device_timeout_s=3600)
    world.step(rollout)
    updating = issued(world, rollout)
    online = [d for d in updating if d != "dev-000"]
    assert len(online) == 2
    for device_id in online:
        world.install(device_id)
    world.step(rollout)
    world.step(rollout)
    assert len([d for d in issued(world, rollout) if d != "dev-000"]) == 2


def test_the_maintenance_window_is_the_devices_local_time(world: World) -> None:
    # The clock is 07:08 UTC: 09:08 in Berlin (summer), 03:08 in New York.
    world.device("berlin", hardware=report(zone="Europe/Berlin"))
    world.device("new-york", hardware=report(zone="America/New_York"))
    rollout = world.create(maintenance_window={"start": "02:00", "end": "05:00"})
    world.step(rollout)
    assert world.states(rollout) == {"berlin": "queued", "new-york": "updating"}


def test_a_stale_step_loses_to_the_writer_that_moved_first(world: World) -> None:
    """Two writers at one revision: one wins, the other changes nothing (no double advance)."""
    fleet_of(world, 3)
    rollout = world.create(canary={"count": 1}, soak_s=0)
    world.step(rollout)
    install_all(world, rollout)
    world.step(rollout)
    with Session(world.db) as a, Session(world.db) as b:
        row_a, row_b = a.get(Rollout, rollout), b.get(Rollout, rollout)
        assert row_a is not None
        assert row_b is not None
        step_a, step_b = Step(a, row_a, world.clock()), Step(b, row_b, world.clock())
        step_a.run()
        assert step_a.write()
        a.commit()
        step_b.run()
        assert not step_b.write()
        b.rollback()
    advanced = [e for e in world.audit(rollout) if e.action == "rollout.stage_started"]
    assert len(advanced) == 1


def test_the_spec_is_stored_as_given(world: World) -> None:
    fleet_of(world, 1)
    rollout = world.create(**GATED)
    stored = RolloutSpec.model_validate(world.rollout(rollout).spec)
    assert stored.gates[0].max_increase_percent == 20
    created = world.audit(rollout)[0]
    assert (created.action, created.actor) == ("rollout.created", "admin:test")


def test_an_exponential_stage_releases_more_each_minute(world: World) -> None:
    """After a canary of 1: 2 in the stage's first minute, 4 in the second, then 5 (the cap)."""
    fleet_of(world, 20)
    rollout = world.create(
        canary={"count": 1},
        stages={"kind": "exponential", "start_per_minute": 2, "factor": 2, "max_per_minute": 5},
        soak_s=0,
    )
    world.step(rollout)
    install_all(world, rollout)  # the canary passes, the rate stage starts; a minute passes
    released = []
    for _ in range(4):
        world.step(rollout)
        released.append(sum(1 for m in world.members(rollout).values() if m.stage is not None))
        world.clock.advance(seconds=60)
    assert world.rollout(rollout).stage == 1
    assert released == [1 + 2 + 4, 1 + 2 + 4 + 5, 1 + 2 + 4 + 5 + 5, 20]


def test_a_device_that_joins_the_last_stage_while_it_soaks_is_updated_before_it_completes(
    world: World,
) -> None:
    fleet_of(world, 2)
    rollout = world.create(soak_s=600)
    world.step(rollout)
    install_all(world, rollout)
    assert world.rollout(rollout).phase == "soaking"
    world.device("dev-late")
    world.step(rollout)
    assert world.states(rollout)["dev-late"] == "updating"  # released and issued at once
    world.clock.advance(seconds=600)
    world.step(rollout)
    assert world.rollout(rollout).status == "active"  # not complete without it
    world.install("dev-late")
    world.step(rollout)
    assert world.rollout(rollout).status == "completed"
    assert world.states(rollout)["dev-late"] == "updated"


def test_a_device_with_no_desired_state_keeps_the_models_it_serves(world: World) -> None:
    """Its first desired state changes the rolled-out model and leaves the others."""
    world.device("local")
    with Session(world.db) as session:
        device = session.get(Device, "local")
        assert device is not None
        reported = dict(device.reported or {})
        reported["models"] = [
            *reported["models"],
            {"name": "minilm", "version": "bundled", "state": "ready"},
        ]
        device.reported = reported
        session.add(device)
        session.commit()
    rollout = world.create()
    world.step(rollout)
    state = world.desired_of("local")
    assert state is not None
    assert [(m.name, m.version) for m in state.models] == [(MODEL, "2.0"), ("minilm", None)]
    assert world.members(rollout)["local"].previous is not None  # 1.0, from what it reported


def test_a_device_failed_by_a_gate_still_counts_in_the_next_check(world: World) -> None:
    """Leaving it out would let the check pass on the devices that hide the regression."""
    fleet_of(world, 3)
    rollout = world.create(canary={"count": 1}, soak_s=600)
    world.step(rollout)
    (canary,) = install_all(world, rollout, p95_ms=300.0)
    with Session(world.db) as session:
        member = session.get(RolloutDevice, (rollout, canary))
        assert member is not None
        member.state, member.failure = "failed", "gate_failed"
        session.add(member)
        session.commit()
    with Session(world.db) as session:
        members = list(world.members(rollout).values())
        cohorts = gather(session, members, 120, world.clock())
    assert cohorts.updated.devices == 1
    assert canary in cohorts.per_device
