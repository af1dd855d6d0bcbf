"""A fallback policy rolled out like a model: staged, judged by the digest, restored on abort.

Runs on SQLite and on PostgreSQL (``database_url``) with the database-level fleet of
``rollout_world.py``; the policies are rows as the policy store writes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlmodel import Session, select

from fleet.errors import Conflict, InvalidInput
from fleet.rollout.spec import RolloutSpec
from fleet.tables import PolicyAssignment, PolicyRow
from models.policy import FallbackPolicy
from models.wire import EventKind
from tests.fleet.rollout_world import MODEL, World, sha

SMALL = "gemma3-small"
CHAINS: dict[str, Any] = {MODEL: {"tiers": [{"kind": "model", "model": SMALL}]}}


@pytest.fixture
def world(database_url: str) -> Iterator[World]:
    world = World.on(database_url)
    world.artifact("1.0")
    world.artifact("2.0")
    yield world
    world.db.dispose()


def fleet_of(world: World, count: int, *, fallbacks: int | None = 0) -> list[str]:
    """Devices serving the model and its smaller fallback, with a baseline of telemetry."""
    ids = [f"dev-{i:03d}" for i in range(count)]
    for device_id in ids:
        world.device(device_id)
        world.serve_also(device_id, SMALL)
        world.telemetry(device_id, p95_ms=100.0, fallbacks=fallbacks)
    return ids


def policy(version: int | None = 2, name: str = "edge-default") -> dict[str, Any]:
    return {"change": {"kind": "policy", "policy": name, "version": version}}


def updating(world: World, rollout_id: str) -> list[str]:
    return sorted(d for d, m in world.members(rollout_id).items() if m.state == "updating")


def enforce_all(world: World, rollout_id: str) -> list[str]:
    done = updating(world, rollout_id)
    world.clock.advance(seconds=5)
    for device_id in done:
        world.enforce(device_id)
    world.step(rollout_id)
    return done


def test_a_policy_rollout_sends_the_policy_stage_by_stage_and_leaves_the_models(
    world: World,
) -> None:
    ids = fleet_of(world, 4)
    world.policy("edge-default", 1, CHAINS)
    ref = world.policy("edge-default", 2, CHAINS | {SMALL: {"retry_after": 5}})
    rollout = world.create(
        **policy(), canary={"count": 1}, stages={"percents": [50, 100]}, soak_s=0
    )
    world.step(rollout)
    (canary,) = updating(world, rollout)
    state = world.desired_of(canary)
    assert state is not None
    assert FallbackPolicy.model_validate(state.fallback).ref() == ref  # the body as stored
    # The models are what the device served: the rollout changes the fallback only.
    assert [(m.name, m.version) for m in state.models] == [(MODEL, None), (SMALL, None)]
    assert world.states(rollout)[canary] == "updating"  # sent, not yet enforced
    stages = []
    for _ in range(10):
        if world.rollout(rollout).status == "completed":
            break
        stages.append(world.rollout(rollout).stage)
        enforce_all(world, rollout)
        world.step(rollout)
    row = world.rollout(rollout)
    assert row.status == "completed", (row.phase, row.reason, world.states(rollout))
    assert sorted(set(stages)) == [0, 1, 2]
    assert set(world.states(rollout).values()) == {"updated"}
    members = world.members(rollout)
    assert members[canary].detail == "enforces policy edge-default v2"
    assert members[canary].target == ref.model_dump(mode="json")
    assert {m.desired_version for m in members.values()} == {1}  # one desired state each
    for device_id in ids:
        published = [s for s in world.link.published if s.device_id == device_id]
        assert len(published) == 1
        assert published[0].fallback == state.fallback
    created = world.audit(rollout)[0]
    assert "policy edge-default v2 to 4 device(s)" in created.reason


def test_a_device_that_already_enforces_the_policy_is_updated_at_once(world: World) -> None:
    (device,) = fleet_of(world, 1)
    ref = world.policy("edge-default", 2, CHAINS)
    world.report_policy(device, ref)
    rollout = world.create(**policy(), soak_s=0)
    world.step(rollout)
    assert world.states(rollout) == {device: "updated"}


def test_reporting_the_digest_is_enough_and_the_version_alone_is_not(world: World) -> None:
    (device,) = fleet_of(world, 1)
    ref = world.policy("edge-default", 2, CHAINS)
    rollout = world.create(**policy(), soak_s=3600)
    world.step(rollout)
    world.report_policy(device, ref.model_copy(update={"digest": sha("something else")}))
    world.step(rollout)
    assert world.states(rollout)[device] == "updating"
    world.report_policy(device, ref)  # no event needed: the report pins the content
    world.step(rollout)
    assert world.states(rollout)[device] == "updated"


def test_a_rejected_policy_fails_the_device_trips_the_abort_rule_and_restores_the_old_one(
    world: World,
) -> None:
    ids = fleet_of(world, 3)
    world.policy("edge-default", 1, CHAINS)
    world.policy("edge-default", 2, CHAINS)
    first = world.create(**policy(1), soak_s=0)
    world.step(first)
    enforce_all(world, first)
    world.step(first)
    assert world.rollout(first).status == "completed"
    old = world.desired_of(ids[0])
    assert old is not None
    assert old.fallback["version"] == 1

    rollout = world.create(
        **policy(2),
        canary={"count": 2},
        abort_rules=[{"failure": "policy_rejected", "threshold_count": 1}],
    )
    world.step(rollout)
    first_canary, second_canary = updating(world, rollout)
    world.clock.advance(seconds=5)
    world.event(first_canary, EventKind.POLICY_REJECTED, reason="chains: unknown tier")
    world.enforce(second_canary)
    world.step(rollout)
    row = world.rollout(rollout)
    assert row.status == "aborted"
    assert "policy_rejected" in row.reason
    members = world.members(rollout)
    assert members[first_canary].failure == "policy_rejected"
    assert members[first_canary].state == members[second_canary].state == "rolled_back"
    assert "restored policy edge-default v1" in members[first_canary].detail
    for device_id in (first_canary, second_canary):
        state = world.desired_of(device_id)
        assert state is not None
        assert state.fallback == old.fallback  # the previous policy, models untouched
        assert [m.name for m in state.models] == [m.name for m in old.models]
    aborted = next(e for e in world.audit(rollout) if e.action == "rollout.aborted")
    assert "previous fallback policy" in aborted.reason
    assert aborted.data["rolled_back"] == 2
    failed = next(e for e in world.audit(rollout) if e.action == "rollout.device_failed")
    assert failed.data["failure"] == "policy_rejected"


def test_an_abort_over_no_previous_policy_clears_it(world: World) -> None:
    (device,) = fleet_of(world, 1)
    world.policy("edge-default", 2, CHAINS)
    rollout = world.create(**policy(), soak_s=600)
    world.step(rollout)
    world.act(rollout, "abort", "wrong policy")
    state = world.desired_of(device)
    assert state is not None
    assert state.fallback == {}
    assert "no fallback policy" in world.members(rollout)[device].detail


def test_a_rejection_before_the_policy_was_issued_does_not_count(world: World) -> None:
    (device,) = fleet_of(world, 1)
    world.policy("edge-default", 2, CHAINS)
    world.event(device, EventKind.POLICY_REJECTED, reason="an older policy")
    world.clock.advance(seconds=5)
    rollout = world.create(**policy(), device_timeout_s=60)
    world.step(rollout)
    world.step(rollout)
    assert world.states(rollout)[device] == "updating"
    world.clock.advance(seconds=61)
    world.step(rollout)
    member = world.members(rollout)[device]
    assert (member.state, member.failure) == ("timed_out", "timed_out")


def test_devices_without_a_model_the_policy_names_are_ineligible_with_the_reason(
    world: World,
) -> None:
    fleet_of(world, 2)
    world.device("bare")  # serves the model but not its smaller fallback
    world.policy("edge-default", 2, CHAINS)
    rollout = world.create(**policy())
    members = world.members(rollout)
    assert members["bare"].state == "ineligible"
    assert SMALL in members["bare"].detail
    assert members["bare"].failure is None
    assert {members[d].state for d in ("dev-000", "dev-001")} == {"pending"}
    world.step(rollout)
    assert world.desired_of("bare") is None  # never sent


def test_a_policy_no_targeted_device_can_enforce_is_refused_with_the_reasons(
    world: World,
) -> None:
    world.device("bare-1")
    world.device("bare-2")
    world.policy("edge-default", 2, CHAINS)
    with pytest.raises(InvalidInput) as caught:
        world.create(**policy())
    assert caught.value.field == "change.policy"
    assert "bare-1, bare-2" in str(caught.value)
    assert SMALL in str(caught.value)
    assert world.link.published == []


def test_without_a_version_the_latest_is_taken_and_stored(world: World) -> None:
    fleet_of(world, 1)
    world.policy("edge-default", 1, CHAINS)
    world.policy("edge-default", 2, CHAINS)
    rollout = world.create(**policy(None))
    stored = RolloutSpec.model_validate(world.rollout(rollout).spec)
    assert stored.change.kind == "policy"
    assert stored.change.version == 2
    world.policy("edge-default", 3, CHAINS)  # a newer one never changes a running rollout
    world.step(rollout)
    state = world.desired_of("dev-000")
    assert state is not None
    assert state.fallback["version"] == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "policy", "policy": "nowhere"}, "change.policy"),
        ({"kind": "policy", "policy": "edge-default", "version": 9}, "change.version"),
    ],
)
def test_an_unknown_policy_or_version_names_the_field(
    world: World, change: dict[str, Any], field: str
) -> None:
    fleet_of(world, 1)
    world.policy("edge-default", 1, CHAINS)
    with pytest.raises(InvalidInput) as caught:
        world.create(change=change)
    assert caught.value.field == field


def test_one_live_policy_rollout_per_device_beside_a_model_rollout(world: World) -> None:
    ids = fleet_of(world, 2)
    world.policy("edge-default", 1, CHAINS)
    world.policy("edge-default", 2, CHAINS)
    models = world.create(soak_s=600)  # gemma3 2.0
    policies = world.create(**policy(), soak_s=600)  # another key: allowed beside it
    with pytest.raises(Conflict, match=policies):
        world.create(**policy(1))
    world.step(models)
    world.step(policies)
    for device_id in ids:
        state = world.desired_of(device_id)
        assert state is not None
        gemma = next(m for m in state.models if m.name == MODEL)
        assert gemma.target is not None
        assert gemma.target.sha256 == sha("2.0/Q4_K_M")  # the policy kept the model's change
        assert state.fallback["version"] == 2
    world.act(models, "abort")  # restores the model, keeps the policy
    state = world.desired_of(ids[0])
    assert state is not None
    assert state.fallback["version"] == 2
    gemma = next(m for m in state.models if m.name == MODEL)
    assert gemma.target is not None
    assert gemma.target.sha256 == sha("1.0/Q4_K_M")


def test_a_fallback_rate_gate_judges_a_policy(world: World) -> None:
    """The natural gate for a policy: the share of requests its fallbacks answered."""
    fleet_of(world, 3)
    world.policy("edge-default", 2, CHAINS)
    rollout = world.create(
        **policy(),
        canary={"count": 1},
        soak_s=60,
        check_interval_s=30,
        gates=[
            {
                "metric": "fallback_rate",
                "max_value": 0.05,
                "window_s": 120,
                "min_samples": 3,
                "max_consecutive_failures": 1,
            }
        ],
    )
    world.step(rollout)
    (canary,) = enforce_all(world, rollout)
    world.clock.advance(seconds=60)
    world.telemetry(canary, p95_ms=100.0, requests=100, fallbacks=20)  # 20% answered degraded
    world.step(rollout)
    row = world.rollout(rollout)
    assert row.status == "aborted", (row.phase, world.gate_checks(rollout))
    assert "fallback_rate" in row.reason
    check = world.gate_checks(rollout)[-1]
    assert check.evidence["updated"]["value"] == pytest.approx(0.2)


def test_a_policy_that_vanished_aborts_the_rollout_and_restores(world: World) -> None:
    (device,) = fleet_of(world, 1)
    world.policy("edge-default", 2, CHAINS)
    rollout = world.create(**policy(), soak_s=600)
    world.step(rollout)
    with Session(world.db) as session:
        for stored in session.exec(select(PolicyRow)).all():
            session.delete(stored)
        session.commit()
    world.step(rollout)
    row = world.rollout(rollout)
    assert row.status == "aborted"
    assert "policy edge-default v2 can no longer be sent" in row.reason
    state = world.desired_of(device)
    assert state is not None
    assert state.fallback == {}


def test_a_model_rollout_gives_a_device_without_a_desired_state_its_assigned_policy(
    world: World,
) -> None:
    (device,) = fleet_of(world, 1)
    ref = world.policy("edge-default", 1, CHAINS)
    with Session(world.db) as session:
        session.add(
            PolicyAssignment(
                scope="group",
                target="lab",
                policy="edge-default",
                version=1,
                assigned_by="admin:test",
                assigned_at=world.clock(),
            )
        )
        session.commit()
    assert world.desired_of(device) is None
    rollout = world.create(canary={"count": 1}, stages={"kind": "waves", "percents": [100]})
    world.step(rollout)
    state = world.desired_of(device)
    assert state is not None
    assert [m.name for m in state.models] == [MODEL, SMALL]
    assert FallbackPolicy.model_validate(state.fallback).ref() == ref
