"""Drift between desired and reported state: every kind, and in-sync cases."""

from __future__ import annotations

from fleet.state import DriftKind, compute_drift
from models.wire import (
    DesiredModel,
    DesiredState,
    ModelState,
    ReportedModel,
    ReportedState,
    TargetRef,
)

DEVICE = "dev-0123456789abcdef"


def desired(*models: tuple[str, str | None], version: int = 3) -> DesiredState:
    return DesiredState(
        device_id=DEVICE,
        version=version,
        models=[DesiredModel(name=n, version=v) for n, v in models],
    )


def reported(*models: tuple[str, str | None, ModelState], applied: int | None = 3) -> ReportedState:
    return ReportedState(
        device_id=DEVICE,
        desired_version=applied,
        converged=False,
        agent_version="0.1.0",
        models=[
            ReportedModel(
                name=n, version=v, state=s, error="boom" if s is ModelState.FAILED else None
            )
            for n, v, s in models
        ],
    )


def kinds(drift_items: list) -> list[tuple[DriftKind, str | None]]:  # type: ignore[type-arg]
    return [(i.kind, i.model) for i in drift_items]


def test_no_desired_state_means_unmanaged_and_in_sync() -> None:
    drift = compute_drift(None, reported(("a", "1", ModelState.READY)))
    assert not drift.managed
    assert drift.in_sync
    assert drift.items == []


def test_desired_but_never_reported() -> None:
    drift = compute_drift(desired(("a", None)), None)
    assert drift.managed
    assert not drift.in_sync
    assert kinds(drift.items) == [(DriftKind.NO_REPORT, None)]


def test_in_sync_when_everything_desired_is_ready() -> None:
    drift = compute_drift(
        desired(("a", "1"), ("b", None)),
        reported(("a", "1", ModelState.READY), ("b", "7", ModelState.READY)),
    )
    assert drift.managed
    assert drift.in_sync


def test_every_kind_of_drift() -> None:
    drift = compute_drift(
        desired(("gone", None), ("old", "2"), ("slow", None), ("broken", None), ("lost", "1")),
        reported(
            ("old", "1", ModelState.READY),
            ("slow", "1", ModelState.LOADING),
            ("broken", "1", ModelState.FAILED),
            ("lost", None, ModelState.MISSING),
            ("stray", "1", ModelState.READY),
            applied=2,
        ),
    )
    assert kinds(drift.items) == [
        (DriftKind.NOT_APPLIED, None),
        (DriftKind.MISSING, "gone"),
        (DriftKind.VERSION_MISMATCH, "old"),
        (DriftKind.LOADING, "slow"),
        (DriftKind.FAILED, "broken"),
        (DriftKind.MISSING, "lost"),
        (DriftKind.EXTRA, "stray"),
    ]
    by_model = {i.model: i for i in drift.items}
    assert (by_model["old"].desired, by_model["old"].actual) == ("2", "1")
    assert "boom" in by_model["broken"].message
    assert "version 2" in drift.items[0].message
    assert "3" in drift.items[0].message


def test_never_applied_any_desired_state() -> None:
    drift = compute_drift(
        desired(("a", None)), reported(("a", "1", ModelState.READY), applied=None)
    )
    assert kinds(drift.items) == [(DriftKind.NOT_APPLIED, None)]
    assert drift.items[0].actual is None


def test_applied_a_newer_version_than_stored_is_not_drift() -> None:
    """A device ahead of this replica's read (a race between replicas) is not behind."""
    drift = compute_drift(
        desired(("a", None), version=3), reported(("a", "1", ModelState.READY), applied=4)
    )
    assert drift.in_sync


def test_version_mismatch_wins_over_state() -> None:
    drift = compute_drift(desired(("a", "2")), reported(("a", "1", ModelState.FAILED)))
    assert kinds(drift.items) == [(DriftKind.VERSION_MISMATCH, "a")]


def test_empty_desired_makes_every_running_model_extra() -> None:
    drift = compute_drift(desired(), reported(("a", "1", ModelState.READY)))
    assert kinds(drift.items) == [(DriftKind.EXTRA, "a")]


def test_a_signed_target_is_compared_by_its_bytes_not_its_version_label() -> None:
    target = TargetRef(path="gemma/1.0/default.gguf", length=10, sha256="aa" * 32)
    wanted = DesiredState(
        device_id=DEVICE,
        version=3,
        models=[DesiredModel(name="gemma", version="1.0", target=target)],
    )

    def running(sha256: str) -> ReportedState:
        model = ReportedModel(
            name="gemma", version="q4_k_m-1.0.0", sha256=sha256, state=ModelState.READY
        )
        return ReportedState(
            device_id=DEVICE, desired_version=3, converged=True, agent_version="0.1.0",
            models=[model],
        )  # fmt: skip

    assert compute_drift(wanted, running("aa" * 32)).in_sync  # the same file, another label
    drift = compute_drift(wanted, running("bb" * 32))  # e.g. the update was rolled back
    assert kinds(drift.items) == [(DriftKind.VERSION_MISMATCH, "gemma")]
