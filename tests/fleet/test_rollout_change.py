"""What a rollout changes (fleet.rollout.change: a model, a policy) and how an abort undoes it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleet.rollout.change import Change, ModelChange, Parts, PolicyChange
from fleet.tables import EventRow
from models.policy import FallbackPolicy, PolicyRef
from models.wire import DesiredModel, EventKind, ModelState, ReportedModel, ReportedState, TargetRef


def target(name: str, version: str, variant: str = "Q4_K_M") -> TargetRef:
    digest = f"{name}{version}{variant}".encode().hex().ljust(64, "0")[:64]
    return TargetRef(path=f"{name}/{version}/{variant}.gguf", length=1234, sha256=digest)


def model(name: str, version: str | None = None, *, with_target: bool = True) -> DesiredModel:
    ref = target(name, version) if with_target and version is not None else None
    return DesiredModel(name=name, version=version, target=ref)


GEMMA_10 = model("gemma3-270m", "1.0")
GEMMA_11 = model("gemma3-270m", "1.1")
MINILM = model("minilm", "2.0")
QWEN = model("qwen", "0.5")
CHANGE = ModelChange(name="gemma3-270m", version="1.1")


def apply(models: Sequence[DesiredModel], entry: DesiredModel) -> list[DesiredModel]:
    return list(CHANGE.apply(Parts(tuple(models)), entry).models)


def capture(models: Sequence[DesiredModel]) -> dict[str, Any] | None:
    return CHANGE.capture(Parts(tuple(models)))


def restore(models: Sequence[DesiredModel], captured: dict[str, Any] | None) -> list[DesiredModel]:
    return list(CHANGE.restore(Parts(tuple(models)), captured).models)


def names(models: Sequence[DesiredModel]) -> list[tuple[str, str | None]]:
    return [(m.name, m.version) for m in models]


def test_key_is_per_model() -> None:
    """One live rollout per model per device: two models may roll out side by side."""
    assert CHANGE.key == "model:gemma3-270m"
    assert ModelChange(name="minilm", version="9").key == "model:minilm"


def test_is_a_change() -> None:
    change: Change[DesiredModel] = CHANGE  # the engine is generic over this protocol
    assert change.key == "model:gemma3-270m"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ([GEMMA_10], [GEMMA_11]),
        ([GEMMA_10, MINILM, QWEN], [GEMMA_11, MINILM, QWEN]),
        ([MINILM, GEMMA_10, QWEN], [MINILM, GEMMA_11, QWEN]),  # stays in the middle
        ([MINILM, QWEN, GEMMA_10], [MINILM, QWEN, GEMMA_11]),
        ([], [GEMMA_11]),  # absent: appended
        ([MINILM, QWEN], [MINILM, QWEN, GEMMA_11]),
        ([GEMMA_11, MINILM], [GEMMA_11, MINILM]),  # already there: unchanged
    ],
)
def test_apply_replaces_in_place_or_appends(
    before: list[DesiredModel], after: list[DesiredModel]
) -> None:
    """Other models and their order are untouched: a reorder would be a needless change."""
    assert apply(before, GEMMA_11) == after


def test_apply_does_not_mutate_its_input() -> None:
    before = [MINILM, GEMMA_10, QWEN]
    copy = list(before)
    result = apply(before, GEMMA_11)
    assert before == copy
    assert result is not before


def test_apply_accepts_a_tuple() -> None:
    assert apply((MINILM, GEMMA_10), GEMMA_11) == [MINILM, GEMMA_11]


def test_apply_removes_duplicates_of_the_model() -> None:
    """A desired state holds one entry per model; apply leaves exactly one, at the first place."""
    result = apply([GEMMA_10, MINILM, model("gemma3-270m", "0.9")], GEMMA_11)
    assert result == [GEMMA_11, MINILM]


def test_apply_uses_the_given_entry_as_is() -> None:
    """The entry carries this device's variant; the change must not rebuild it."""
    entry = DesiredModel(
        name="gemma3-270m", version="1.1", target=target("gemma3-270m", "1.1", "F16")
    )
    (result,) = apply([GEMMA_10], entry)
    assert result is entry


def test_capture_returns_the_json_of_the_entry() -> None:
    captured = capture([MINILM, GEMMA_10, QWEN])
    assert captured == {
        "schema_version": 1,
        "name": "gemma3-270m",
        "version": "1.0",
        "target": {
            "schema_version": 1,
            "path": "gemma3-270m/1.0/Q4_K_M.gguf",
            "length": 1234,
            "sha256": target("gemma3-270m", "1.0").sha256,
        },
    }
    assert json.loads(json.dumps(captured)) == captured  # stored in a JSON column


def test_capture_without_a_target() -> None:
    """A device may serve what its store holds, with no signed target: captured as such."""
    unpinned = model("gemma3-270m", None)
    assert capture([unpinned]) == {
        "schema_version": 1,
        "name": "gemma3-270m",
        "version": None,
        "target": None,
    }


@pytest.mark.parametrize("models", [[], [MINILM, QWEN]])
def test_capture_of_an_absent_model_is_none(models: list[DesiredModel]) -> None:
    assert capture(models) is None


def test_restore_none_removes_the_model() -> None:
    """The model was not there before the rollout: an abort takes it away again."""
    assert restore([MINILM, GEMMA_11, QWEN], None) == [MINILM, QWEN]
    assert restore([MINILM], None) == [MINILM]
    assert restore([], None) == []


def test_restore_puts_the_old_entry_back_in_place() -> None:
    before = [MINILM, GEMMA_10, QWEN]
    captured = capture(before)
    during = apply(before, GEMMA_11)
    assert names(during) == [("minilm", "2.0"), ("gemma3-270m", "1.1"), ("qwen", "0.5")]
    assert restore(during, captured) == before


def test_restore_after_a_json_round_trip() -> None:
    """The capture is read back from the database: the restored entry is equal, target and all."""
    captured = json.loads(json.dumps(capture([GEMMA_10])))
    (restored,) = restore([GEMMA_11], captured)
    assert restored == GEMMA_10
    assert restored.target == GEMMA_10.target


def test_restore_when_the_model_was_removed_meanwhile_appends_it() -> None:
    """An admin removed the model mid-rollout: an abort still restores what was there."""
    captured = capture([GEMMA_10, MINILM])
    assert restore([MINILM], captured) == [MINILM, GEMMA_10]


def test_capture_apply_restore_round_trip_for_every_position() -> None:
    others = [MINILM, QWEN]
    for index in range(3):
        before = [*others[:index], GEMMA_10, *others[index:]]
        captured = capture(before)
        assert restore(apply(before, GEMMA_11), captured) == before
    absent = [MINILM, QWEN]
    assert restore(apply(absent, GEMMA_11), capture(absent)) == absent


def test_a_model_change_keeps_the_fallback_policy() -> None:
    parts = Parts((GEMMA_10, MINILM), {"name": "edge", "version": 1})
    assert CHANGE.apply(parts, GEMMA_11).fallback == parts.fallback
    assert CHANGE.restore(parts, None).fallback == parts.fallback


# -- a fallback policy ---------------------------------------------------------------

POLICY = FallbackPolicy(name="edge-default", version=2)
BODY = POLICY.model_dump(mode="json")
REF = POLICY.ref()
POLICY_CHANGE = PolicyChange("edge-default", 2, BODY, REF.digest)
OLD = FallbackPolicy(name="edge-default", version=1).model_dump(mode="json")
ISSUED = datetime(2025, 6, 1, 12, tzinfo=UTC)


def reported(policy: PolicyRef | None) -> ReportedState:
    return ReportedState(
        device_id="dev-1",
        converged=True,
        agent_version="0.9",
        models=[ReportedModel(name="minilm", state=ModelState.READY)],
        policy=policy,
    )


def rejected(at: datetime, **data: Any) -> EventRow:
    return EventRow(
        device_id="dev-1",
        event_id=f"e{at.timestamp()}",
        ts=at,
        kind=EventKind.POLICY_REJECTED.value,
        severity="warning",
        message="refused",
        data=data,
        stored_at=at,
    )


def test_a_policy_change_is_one_per_device_and_says_what_it_sends() -> None:
    change: Change[PolicyRef] = POLICY_CHANGE
    assert change.key == "policy"
    assert change.title == "policy edge-default v2"
    assert POLICY_CHANGE.ref == REF
    assert change.entry_of(REF.model_dump(mode="json")) == REF


def test_a_policy_change_replaces_the_fallback_and_leaves_the_models() -> None:
    before = Parts((GEMMA_10, MINILM), dict(OLD))
    after = POLICY_CHANGE.apply(before, REF)
    assert after.models == before.models
    assert after.fallback == BODY
    captured = json.loads(json.dumps(POLICY_CHANGE.capture(before)))
    assert POLICY_CHANGE.restore(after, captured) == before
    assert POLICY_CHANGE.restored(captured) == "policy edge-default v1"


def test_a_policy_change_over_no_policy_restores_none() -> None:
    before = Parts((MINILM,))
    assert POLICY_CHANGE.capture(before) is None
    after = POLICY_CHANGE.apply(before, REF)
    assert POLICY_CHANGE.restore(after, None) == before
    assert "no fallback policy" in POLICY_CHANGE.restored(None)


def test_a_device_is_updated_when_it_reports_the_digest() -> None:
    assert not POLICY_CHANGE.satisfied(REF, None)
    assert not POLICY_CHANGE.satisfied(REF, reported(None))
    old_ref = FallbackPolicy(name="edge-default", version=1).ref()
    assert not POLICY_CHANGE.satisfied(REF, reported(old_ref))
    assert POLICY_CHANGE.satisfied(REF, reported(REF))
    seen = POLICY_CHANGE.observe(REF, reported(REF), [], ISSUED)
    assert (seen.serves_target, seen.healthy, seen.rejected) == (True, True, None)
    assert seen.success == "enforces policy edge-default v2"


def test_a_rejection_since_the_policy_was_issued_fails_it() -> None:
    before = rejected(ISSUED - timedelta(seconds=5), reason="old news")
    other = rejected(ISSUED + timedelta(seconds=5), reason="another one", digest="0" * 64)
    mine = rejected(ISSUED + timedelta(seconds=9), reason="chains.x: unknown model")
    assert POLICY_CHANGE.observe(REF, reported(None), [before, other], ISSUED).rejected is None
    seen = POLICY_CHANGE.observe(REF, reported(None), [mine, before, other], ISSUED)
    assert seen.rejected == "chains.x: unknown model"
    assert seen.serves_target is False
