"""Which bytes a device's Range header asks for, when the controller streams an artifact."""

from __future__ import annotations

import pytest

from fleet.api.artifacts import requested_span

ETAG = '"abc"'


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "whole"),
        ("bytes=0-99", (0, 100)),
        ("bytes=100-199", (100, 200)),
        ("BYTES = 5 - 9", (5, 10)),
        ("bytes=990-", (990, 1000)),
        ("bytes=990-5000", (990, 1000)),  # past the end: up to the end
        ("bytes=-10", (990, 1000)),
        ("bytes=-5000", (0, 1000)),
        ("bytes=999-999", (999, 1000)),
        ("bytes=1000-", "unsatisfiable"),
        ("bytes=1000-1001", "unsatisfiable"),
        ("bytes=-0", "unsatisfiable"),
        ("bytes=0-9,20-29", "whole"),  # several ranges: the whole artifact
        ("bytes=9-0", "whole"),
        ("bytes=-", "whole"),
        ("bytes=a-b", "whole"),
        ("items=0-9", "whole"),
        ("bytes 0-9", "whole"),
        ("", "whole"),
    ],
)
def test_one_range_or_the_whole_artifact(header: str | None, expected: object) -> None:
    assert requested_span(header, None, ETAG, 1000) == expected


def test_if_range_resumes_only_the_same_artifact() -> None:
    assert requested_span("bytes=10-", ETAG, ETAG, 1000) == (10, 1000)
    assert requested_span("bytes=10-", '"other"', ETAG, 1000) == "whole"
    assert requested_span("bytes=10-", f"W/{ETAG}", ETAG, 1000) == "whole"  # weak: never


def test_nothing_of_an_empty_artifact_can_be_asked_for() -> None:
    assert requested_span("bytes=0-", None, ETAG, 0) == "unsatisfiable"
    assert requested_span("bytes=-1", None, ETAG, 0) == "unsatisfiable"
