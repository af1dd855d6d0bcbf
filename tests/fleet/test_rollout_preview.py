"""The rollout preview: what create would store, from the engine's own choices.

The stage arithmetic is checked on plain values; the agreement with the engine on a
database-level fleet (``rollout_world.py``), SQLite and PostgreSQL: preview, then
create, then compare what was stored, device by device and stage by stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlmodel import Session, select

from fleet.errors import Conflict, InvalidInput
from fleet.rollout.preview import Preview, preview_rollout, stage_plan
from fleet.rollout.spec import RolloutSpec
from fleet.rollout.views import rollout_detail
from fleet.tables import Device, Rollout
from tests.fleet.rollout_world import GB, MODEL, World, report

CHANGE = {"model": MODEL, "version": "2.0"}


def spec(**fields: Any) -> RolloutSpec:
    body: dict[str, Any] = {"change": CHANGE, "target": {"groups": ["lab"]}}
    return RolloutSpec.model_validate(body | fields)


def test_waves_after_a_canary_release_their_share_of_the_eligible_devices() -> None:
    plans = stage_plan(spec(canary={"count": 1}, stages={"percents": [10, 50, 100]}), 30)
    assert [(p.name, p.devices, p.cumulative) for p in plans] == [
        ("canary", 1, 1),
        ("10%", 2, 3),
        ("50%", 12, 15),
        ("100%", 15, 30),
    ]
    assert all(p.minutes is None for p in plans)


def test_a_canary_larger_than_a_wave_leaves_that_wave_nothing_to_release() -> None:
    plans = stage_plan(spec(canary={"count": 5}, stages={"percents": [10, 100]}), 20)
    assert [(p.devices, p.cumulative) for p in plans] == [(5, 5), (0, 5), (15, 20)]


def test_an_exponential_stage_says_how_many_minutes_its_rate_takes() -> None:
    rate = {"kind": "exponential", "start_per_minute": 1, "factor": 2, "max_per_minute": 4}
    plans = stage_plan(spec(canary={"count": 2}, stages=rate), 20)
    # 1, 2, 4, 4, 4, 4 a minute after the canary's 2: the 18 others by the 6th minute.
    assert [(p.name, p.devices, p.minutes) for p in plans] == [
        ("canary", 2, None),
        ("exponential", 18, 6),
    ]


@pytest.fixture
def world(database_url: str) -> Iterator[World]:
    world = World.on(database_url)
    world.artifact("1.0")
    world.artifact("2.0", ram_bytes=12 * GB)  # needs more memory than the small boxes have
    yield world
    world.db.dispose()


def small_and_large(world: World) -> tuple[list[str], list[str]]:
    large = [f"big-{i:02d}" for i in range(9)]
    small = [f"small-{i:02d}" for i in range(3)]
    for device_id in large:
        world.device(device_id, hardware=report(ram_gb=32))
    for device_id in small:
        world.device(device_id, hardware=report(ram_gb=4))
    world.device("elsewhere", group=None)  # not targeted
    return large, small


def preview_of(world: World, wanted: RolloutSpec) -> Preview:
    with Session(world.db) as session:
        return preview_rollout(session, wanted, world.clock())


def test_the_preview_counts_are_what_create_then_stores(world: World) -> None:
    large, small = small_and_large(world)
    wanted = spec(canary={"count": 2}, stages={"percents": [50, 100]}, soak_s=0)
    preview = preview_of(world, wanted)
    assert (preview.change, preview.targeted, preview.eligible) == ("gemma3 2.0", 12, 9)
    assert preview.refusal is None
    assert preview.variants == {"Q4_K_M (cpu)": 9}

    rollout_id = world.create(**wanted.model_dump(mode="json"))
    members = world.members(rollout_id)
    assert sorted(members) == sorted(large + small)
    stored_out = sorted((d, m.detail) for d, m in members.items() if m.state == "ineligible")
    assert [(e.device_id, e.reason) for e in preview.ineligible] == stored_out
    assert preview.ineligible_count == len(small)
    assert sum(m.state == "pending" for m in members.values()) == preview.eligible
    with Session(world.db) as session:
        row = session.get(Rollout, rollout_id)
        assert row is not None
        detail = rollout_detail(session, row)
    assert [(s.name, s.quota) for s in detail.stage_progress] == [
        (p.name, p.cumulative) for p in preview.stages
    ]
    world.step(rollout_id)  # the engine releases the canary
    released = [m for m in world.members(rollout_id).values() if m.stage == 0]
    assert len(released) == preview.stages[0].devices == 2


def test_a_policy_preview_lists_the_devices_that_lack_a_model_it_names(world: World) -> None:
    for device_id in ("dev-a", "dev-b", "dev-c"):
        world.device(device_id)
    world.serve_also("dev-a", "gemma3-small")
    chains = {MODEL: {"tiers": [{"kind": "model", "model": "gemma3-small"}]}}
    world.policy("edge-default", 1, chains)
    wanted = spec(change={"kind": "policy", "policy": "edge-default"})
    preview = preview_of(world, wanted)
    assert (preview.change, preview.eligible) == ("policy edge-default v1", 1)
    assert [e.device_id for e in preview.ineligible] == ["dev-b", "dev-c"]
    assert all("gemma3-small" in e.reason for e in preview.ineligible)
    rollout_id = world.create(**wanted.model_dump(mode="json"))
    stored = {d: m.detail for d, m in world.members(rollout_id).items() if m.state == "ineligible"}
    assert stored == {e.device_id: e.reason for e in preview.ineligible}


def test_a_rival_rollout_is_the_refusal_create_would_give(world: World) -> None:
    small_and_large(world)
    first = world.create(stages={"percents": [100]})
    preview = preview_of(world, spec())
    assert preview.refusal is not None
    assert first in preview.refusal
    with pytest.raises(Conflict, match=first):
        world.create()


def test_no_eligible_device_is_a_refusal_with_every_reason(world: World) -> None:
    for device_id in ("small-1", "small-2"):
        world.device(device_id, hardware=report(ram_gb=4))
    preview = preview_of(world, spec())
    assert preview.eligible == 0
    assert preview.refusal is not None
    assert [e.device_id for e in preview.ineligible] == ["small-1", "small-2"]
    assert [p.cumulative for p in preview.stages] == [0]
    with pytest.raises(InvalidInput):
        world.create()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"target": {"groups": ["nowhere"]}}, "target.groups"),
        ({"target": {"devices": ["ghost"]}}, "target.devices"),
        ({"target": {"facts": {"arch": ["riscv64"]}}}, "target"),
        ({"change": {"model": MODEL, "version": "9.9"}}, "change.version"),
        ({"change": {"model": "nothing", "version": "1.0"}}, "change.model"),
        ({"change": {"kind": "policy", "policy": "nope"}}, "change.policy"),
    ],
)
def test_what_create_refuses_as_a_422_the_preview_refuses_naming_the_same_field(
    world: World, fields: dict[str, Any], field: str
) -> None:
    small_and_large(world)
    wanted = spec(**fields)
    with pytest.raises(InvalidInput) as previewed:
        preview_of(world, wanted)
    with pytest.raises(InvalidInput) as created:
        world.create(**wanted.model_dump(mode="json"))
    assert previewed.value.field == created.value.field == field


def test_the_preview_counts_devices_outside_the_maintenance_window(world: World) -> None:
    world.device("here", hardware=report(ram_gb=32, zone="UTC"))
    world.device("there", hardware=report(ram_gb=32, zone="Asia/Tokyo"))
    now = world.clock().strftime("%H:%M")  # 07:08 UTC; 16:08 in Tokyo
    later = (world.clock().hour + 1) % 24
    window = {"start": now, "end": f"{later:02d}:00"}
    preview = preview_of(world, spec(maintenance_window=window))
    assert (preview.eligible, preview.outside_window) == (2, 1)


def test_a_preview_writes_nothing(world: World) -> None:
    small_and_large(world)
    preview_of(world, spec())
    with Session(world.db) as session:
        assert session.get(Device, "big-00") is not None
        assert session.exec(select(Rollout)).first() is None
