"""What a rollout changes (fleet.rollout.change.ModelChange) and how an abort undoes it."""

from __future__ import annotations

import json

import pytest

from fleet.rollout.change import Change, ModelChange
from models.wire import DesiredModel, TargetRef


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


def names(models: list[DesiredModel]) -> list[tuple[str, str | None]]:
    return [(m.name, m.version) for m in models]


def test_key_is_per_model() -> None:
    """One live rollout per model per device: two models may roll out side by side."""
    assert CHANGE.key == "model:gemma3-270m"
    assert ModelChange(name="minilm", version="9").key == "model:minilm"


def test_is_a_change() -> None:
    change: Change = CHANGE  # the engine is generic over this protocol
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
    assert CHANGE.apply(before, GEMMA_11) == after


def test_apply_does_not_mutate_its_input() -> None:
    before = [MINILM, GEMMA_10, QWEN]
    copy = list(before)
    result = CHANGE.apply(before, GEMMA_11)
    assert before == copy
    assert result is not before


def test_apply_accepts_a_tuple() -> None:
    assert CHANGE.apply((MINILM, GEMMA_10), GEMMA_11) == [MINILM, GEMMA_11]


def test_apply_removes_duplicates_of_the_model() -> None:
    """A desired state holds one entry per model; apply leaves exactly one, at the first place."""
    result = CHANGE.apply([GEMMA_10, MINILM, model("gemma3-270m", "0.9")], GEMMA_11)
    assert result == [GEMMA_11, MINILM]


def test_apply_uses_the_given_entry_as_is() -> None:
    """The entry carries this device's variant; the change must not rebuild it."""
    entry = DesiredModel(
        name="gemma3-270m", version="1.1", target=target("gemma3-270m", "1.1", "F16")
    )
    (result,) = CHANGE.apply([GEMMA_10], entry)
    assert result is entry


def test_capture_returns_the_json_of_the_entry() -> None:
    captured = CHANGE.capture([MINILM, GEMMA_10, QWEN])
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
    assert CHANGE.capture([unpinned]) == {
        "schema_version": 1,
        "name": "gemma3-270m",
        "version": None,
        "target": None,
    }


@pytest.mark.parametrize("models", [[], [MINILM, QWEN]])
def test_capture_of_an_absent_model_is_none(models: list[DesiredModel]) -> None:
    assert CHANGE.capture(models) is None


def test_restore_none_removes_the_model() -> None:
    """The model was not there before the rollout: an abort takes it away again."""
    assert CHANGE.restore([MINILM, GEMMA_11, QWEN], None) == [MINILM, QWEN]
    assert CHANGE.restore([MINILM], None) == [MINILM]
    assert CHANGE.restore([], None) == []


def test_restore_puts_the_old_entry_back_in_place() -> None:
    before = [MINILM, GEMMA_10, QWEN]
    captured = CHANGE.capture(before)
    during = CHANGE.apply(before, GEMMA_11)
    assert names(during) == [("minilm", "2.0"), ("gemma3-270m", "1.1"), ("qwen", "0.5")]
    assert CHANGE.restore(during, captured) == before


def test_restore_after_a_json_round_trip() -> None:
    """The capture is read back from the database: the restored entry is equal, target and all."""
    captured = json.loads(json.dumps(CHANGE.capture([GEMMA_10])))
    (restored,) = CHANGE.restore([GEMMA_11], captured)
    assert restored == GEMMA_10
    assert restored.target == GEMMA_10.target


def test_restore_when_the_model_was_removed_meanwhile_appends_it() -> None:
    """An admin removed the model mid-rollout: an abort still restores what was there."""
    captured = CHANGE.capture([GEMMA_10, MINILM])
    assert CHANGE.restore([MINILM], captured) == [MINILM, GEMMA_10]


def test_capture_apply_restore_round_trip_for_every_position() -> None:
    others = [MINILM, QWEN]
    for index in range(3):
        before = [*others[:index], GEMMA_10, *others[index:]]
        captured = CHANGE.capture(before)
        assert CHANGE.restore(CHANGE.apply(before, GEMMA_11), captured) == before
    absent = [MINILM, QWEN]
    assert CHANGE.restore(CHANGE.apply(absent, GEMMA_11), CHANGE.capture(absent)) == absent
