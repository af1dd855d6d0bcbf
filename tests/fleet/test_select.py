"""Which registered artifact a desired model means: one answer, or a reason."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from fleet.errors import Conflict, NotFound
from fleet.registry.select import choose_artifact

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass
class Row:
    version: str
    variant: str = "default"
    age_days: int = 0
    yanked: bool = False
    name: str = "gemma3-270m"
    yank_reason: str = ""

    @property
    def created_at(self) -> datetime:
        return T0 + timedelta(days=self.age_days)

    @property
    def yanked_at(self) -> datetime | None:
        return T0 if self.yanked else None


ROWS = [
    Row("1.0", age_days=1),
    Row("1.1", age_days=2),
    Row("1.1", "Q8_0", age_days=2),
    Row("1.2", age_days=3, yanked=True, yank_reason="bad answers"),
]


def test_no_version_means_the_newest_one_not_yanked_and_its_default_variant() -> None:
    assert choose_artifact(ROWS, None, None) is ROWS[1]


def test_a_named_version_and_variant_are_taken_as_given() -> None:
    assert choose_artifact(ROWS, "1.0", None) is ROWS[0]
    assert choose_artifact(ROWS, "1.1", "Q8_0") is ROWS[2]


@pytest.mark.parametrize(
    ("version", "variant", "error", "why"),
    [
        ("1.2", None, Conflict, "bad answers"),  # yanked: never sent, even by name
        ("9.9", None, NotFound, "no version '9.9'"),
        ("1.1", "Q2_K", NotFound, "no variant 'Q2_K'"),
    ],
)
def test_what_cannot_be_sent_says_why(
    version: str, variant: str | None, error: type[Exception], why: str
) -> None:
    with pytest.raises(error, match=why):
        choose_artifact(ROWS, version, variant)


def test_several_variants_without_a_default_need_a_choice() -> None:
    rows = [Row("2.0", "Q4_K_M"), Row("2.0", "Q8_0")]
    with pytest.raises(Conflict, match="choose one"):
        choose_artifact(rows, "2.0", None)


def test_every_version_yanked_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="every version"):
        choose_artifact([Row("1.0", yanked=True)], None, None)
