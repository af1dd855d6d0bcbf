"""First-boot progress: the pure step model, its transitions, and boot.json on disk."""

from __future__ import annotations

import itertools
import json
import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.boot_status import (
    BootRecorder,
    BootStatus,
    ModelProgress,
    Step,
    StepState,
    current_step,
    finish,
    fresh,
    load_status,
    model_event,
    settle_models,
    skip,
    start,
    stuck_reason,
    summary,
    trouble,
)

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def states(status: BootStatus) -> dict[str, str]:
    return {step.value: status.step(step).state.value for step in Step}


def test_a_fresh_run_has_every_step_pending_and_starts_at_provisioned() -> None:
    status = fresh(T0, pid=42)
    assert set(states(status).values()) == {"pending"}
    assert current_step(status) is Step.PROVISIONED
    assert stuck_reason(status) == "not started yet"
    assert status.pid == 42


def test_transitions_return_new_values_and_leave_the_old_one_alone() -> None:
    before = fresh(T0)
    after = finish(before, Step.PROVISIONED, at(1), "fleet https://f")
    assert before.step(Step.PROVISIONED).state is StepState.PENDING
    assert after.step(Step.PROVISIONED).state is StepState.DONE
    assert after.step(Step.PROVISIONED).at == at(1)
    assert after.updated_at == at(1)
    assert current_step(after) is Step.DEVICE_KEY


def test_a_transient_failure_keeps_the_step_active_with_the_error() -> None:
    status = start(fresh(T0), Step.ENROLLED, at(1), "enrolling with https://f")
    error = "controller unreachable at https://f: connection refused; retrying in 30 s"
    status = trouble(status, Step.ENROLLED, error, at(2), final=False)
    step = status.step(Step.ENROLLED)
    assert step.state is StepState.ACTIVE
    assert step.error == error
    assert step.detail == "enrolling with https://f"
    assert status.last_error == error
    assert status.last_error_at == at(2)
    # another attempt keeps the last error on show until the step ends
    status = start(status, Step.ENROLLED, at(3), "enrolling with https://f")
    assert status.step(Step.ENROLLED).error == error
    status = finish(status, Step.ENROLLED, at(4), "device dev-1")
    assert status.step(Step.ENROLLED).error is None
    assert status.last_error == error  # history: the last thing that went wrong


def test_a_final_failure_fails_the_step_and_becomes_the_reason_it_is_stuck() -> None:
    status = finish(fresh(T0), Step.PROVISIONED, at(1))
    status = finish(status, Step.DEVICE_KEY, at(1))
    status = trouble(
        status, Step.ENROLLED, "enrollment refused: token tok-1 is used up", at(2), final=True
    )
    assert status.step(Step.ENROLLED).state is StepState.FAILED
    assert current_step(status) is Step.ENROLLED
    assert stuck_reason(status) == "enrollment refused: token tok-1 is used up"
    assert summary(status) == "enrolled: failed: enrollment refused: token tok-1 is used up"


def test_trouble_after_a_step_is_done_only_records_the_last_error() -> None:
    status = finish(fresh(T0), Step.DESIRED_STATE, at(1), "version 3")
    status = trouble(status, Step.DESIRED_STATE, "broker gone; retrying in 4 s", at(2), final=False)
    assert status.step(Step.DESIRED_STATE).state is StepState.DONE
    assert status.last_error == "broker gone; retrying in 4 s"


def test_skipped_steps_count_as_passed_and_serving_ends_the_walk() -> None:
    status = fresh(T0)
    for step in (Step.PROVISIONED, Step.DEVICE_KEY, Step.ENROLLED, Step.DESIRED_STATE):
        status = skip(status, step, at(1), "no fleet configured")
    assert current_step(status) is Step.MODELS
    status = finish(status, Step.MODELS, at(2), "serving gemma3-270m")
    status = finish(status, Step.SERVING, at(3), "the API serves gemma3-270m")
    assert current_step(status) is None
    assert stuck_reason(status) is None
    assert summary(status) == "serving gemma3-270m"


def test_serving_while_an_earlier_step_still_retries_says_both() -> None:
    status = finish(fresh(T0), Step.PROVISIONED, at(1))
    status = finish(status, Step.DEVICE_KEY, at(1))
    status = trouble(status, Step.ENROLLED, "controller unreachable", at(2), final=False)
    status = finish(status, Step.MODELS, at(3), "serving a")
    status = finish(status, Step.SERVING, at(3))
    assert current_step(status) is Step.ENROLLED
    assert summary(status) == "serving; enrolled: active: controller unreachable"


def test_reasons_are_kept_on_one_line_and_bounded() -> None:
    status = trouble(fresh(T0), Step.ENROLLED, "line one\nline two " + "x" * 5000, T0, final=True)
    error = status.step(Step.ENROLLED).error
    assert error is not None
    assert "\n" not in error
    assert error.startswith("line one line two x")
    assert len(error) == 1000


def test_settling_the_models_step() -> None:
    base = start(fresh(T0), Step.MODELS, at(1), "loading a, b")
    done = settle_models(base, at(2), serving=["b", "a"], failed={}, retrying={}, waiting={})
    assert done.step(Step.MODELS).state is StepState.DONE
    assert done.step(Step.MODELS).detail == "serving a, b"

    failed = settle_models(
        done, at(3), serving=["a"], failed={"b": "b.gguf is corrupt"}, retrying={}, waiting={}
    )
    assert failed.step(Step.MODELS).state is StepState.FAILED  # a done step can regress
    assert failed.step(Step.MODELS).error == "not serving b: b.gguf is corrupt"

    retrying = settle_models(
        base, at(3), serving=[], failed={}, retrying={"a": "connection reset"}, waiting={}
    )
    assert retrying.step(Step.MODELS).state is StepState.ACTIVE
    assert retrying.step(Step.MODELS).error == "retrying a: connection reset"

    waiting = settle_models(
        base, at(3), serving=[], failed={}, retrying={}, waiting={"c": "target not installed yet"}
    )
    assert waiting.step(Step.MODELS).state is StepState.ACTIVE
    assert waiting.step(Step.MODELS).detail == "waiting for c (c: target not installed yet)"

    nothing = settle_models(base, at(3), serving=[], failed={}, retrying={}, waiting={})
    assert nothing.step(Step.MODELS).detail == "no models to serve"


def test_update_events_show_download_progress_then_install_then_health_check() -> None:
    data = {"model": "gemma3-270m", "version": "2", "target": "gemma.gguf", "sha256": "a" * 64}
    status = fresh(T0)
    for earlier in (Step.PROVISIONED, Step.DEVICE_KEY, Step.ENROLLED, Step.DESIRED_STATE):
        status = finish(status, earlier, T0)
    status = model_event(
        status, "update_progress", "45%", {**data, "bytes": 45 * 2**20, "total": 100 * 2**20}, T0
    )
    step = status.step(Step.MODELS)
    assert step.state is StepState.ACTIVE
    assert step.progress == ModelProgress(
        model="gemma3-270m",
        phase="downloading",
        version="2",
        done_bytes=45 * 2**20,
        total_bytes=100 * 2**20,
    )
    assert step.progress.percent == 45
    assert summary(status) == "models: active: downloading gemma3-270m 2 (45%)"
    status = model_event(status, "update_progress", "", {**data, "bytes": 10, "total": 10}, T0)
    assert status.step(Step.MODELS).progress is not None
    assert status.step(Step.MODELS).progress.phase == "verifying"
    status = model_event(status, "update_verified", "", data, T0)
    assert status.step(Step.MODELS).detail == "installing gemma3-270m 2"
    status = model_event(status, "update_installed", "", data, T0)
    assert status.step(Step.MODELS).detail == "health check of gemma3-270m 2"
    status = model_event(status, "update_failed", "gemma3-270m 2: download failed", data, T0)
    assert status.step(Step.MODELS).state is StepState.ACTIVE  # the reconcile decides
    assert status.last_error == "gemma3-270m 2: download failed"
    assert model_event(status, "telemetry_dropped", "", {}, T0) is status


def test_the_file_round_trips_and_unknown_content_is_refused() -> None:
    status = trouble(fresh(T0, pid=7), Step.ENROLLED, "nope", at(1), final=True)
    assert load_status(status.model_dump_json().encode()) == status
    assert load_status(b"{}") is None
    assert load_status(b"not json") is None


def test_the_recorder_writes_each_change_atomically_and_tells_its_listeners(
    tmp_path: Path,
) -> None:
    path = tmp_path / "boot.json"
    clock = iter(at(i) for i in range(100))
    recorder = BootRecorder(path, clock=lambda: next(clock), pid=99)
    heard: list[str] = []
    recorder.listeners.append(lambda s: heard.append(summary(s)))
    recorder.finish(Step.PROVISIONED, "fleet https://f")
    recorder.trouble(Step.DEVICE_KEY, "cannot read device.key: permission denied", final=True)
    on_disk = json.loads(path.read_text())
    assert on_disk["pid"] == 99
    assert on_disk["steps"]["provisioned"]["state"] == "done"
    assert on_disk["steps"]["device_key"]["state"] == "failed"
    assert on_disk["last_error"] == "cannot read device.key: permission denied"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # status is readable; nothing secret
    assert [p.name for p in tmp_path.iterdir()] == ["boot.json"]  # no temporary files left
    assert heard == [
        "device key: pending: not started yet",
        "device key: failed: cannot read device.key: permission denied",
    ]
    assert load_status(path.read_bytes()) == recorder.status


def test_a_recorder_that_cannot_write_keeps_going(tmp_path: Path) -> None:
    recorder = BootRecorder(tmp_path / "missing-folder" / "boot.json")
    recorder.finish(Step.PROVISIONED)
    assert recorder.is_done(Step.PROVISIONED)
    assert not (tmp_path / "missing-folder").exists()


def test_a_listener_that_raises_does_not_stop_the_step() -> None:
    recorder = BootRecorder(None)

    def broken(_: BootStatus) -> None:
        raise RuntimeError("bug")

    recorder.listeners.append(broken)
    recorder.finish(Step.SERVING)
    assert recorder.is_done(Step.SERVING)


def test_concurrent_reports_are_all_kept_and_heard_in_order(tmp_path: Path) -> None:
    recorder = BootRecorder(tmp_path / "boot.json")
    heard: list[BootStatus] = []

    def listen(status: BootStatus) -> None:
        os.sched_yield()  # let the other threads run, as a listener's socket send may
        heard.append(status)

    recorder.listeners.append(listen)
    steps = list(Step)

    def report(step: Step) -> None:
        for i in range(50):
            recorder.start(step, f"try {i}")
        recorder.finish(step, "done")

    threads = [threading.Thread(target=report, args=(step,)) for step in steps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {recorder.status.step(s).state for s in steps} == {StepState.DONE}
    on_disk = load_status((tmp_path / "boot.json").read_bytes())
    assert on_disk == recorder.status
    assert len(heard) == len(steps) * 51
    # each change is heard after the one it was made from: one step moves at a time
    for before, after in itertools.pairwise(heard):
        moved = [s for s in steps if before.step(s) != after.step(s)]
        assert len(moved) == 1, moved
    assert heard[-1] == recorder.status  # systemd's STATUS= is not left on a stale line
