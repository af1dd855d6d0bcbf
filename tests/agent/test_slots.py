"""A/B slots: the pure state machine and recovery plan, then every operation on real folders.

Crashes are simulated by leaving on disk exactly what a crash between two syscalls would
leave (a state file from one step, slot contents from the next), then recovering; the last
test SIGKILLs a real updater at random points and checks a verified file is always served.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import agent.files as files_module
import agent.store.slots as slots_module
from agent.store.slots import (
    MANIFEST,
    STATE,
    ABSlots,
    Activated,
    ArtifactRejected,
    Begin,
    CorruptState,
    Failed,
    FailUpdate,
    FinishInstall,
    ForgetPrevious,
    Healthy,
    Installed,
    InvalidName,
    InvalidTransition,
    InvalidUpdate,
    Keep,
    NoActiveModel,
    Pending,
    Phase,
    PreviousLost,
    Restart,
    Restarted,
    Resume,
    RollBack,
    RolledBack,
    SlotContents,
    SlotRejected,
    SlotState,
    Verified,
    check_name,
    next_state,
    recovery_plan,
)
from models.manifest import ModelFormat, ModelManifest

REPO = Path(__file__).resolve().parents[2]
NAME = "llm"
SHA1, SHA2, SHA3 = "1" * 64, "2" * 64, "3" * 64


# --- the pure state machine -------------------------------------------------------------------


def run(state: SlotState, *events: object) -> SlotState:
    for event in events:
        state = next_state(state, event)  # type: ignore[arg-type]
    return state


def test_a_first_install_goes_to_slot_a_and_has_nothing_to_fall_back_to() -> None:
    state = run(SlotState(), Begin("1", SHA1))
    assert state == SlotState(pending=Pending("a", "1", SHA1))
    state = run(state, Verified(), Installed(), Activated())
    assert state.active == "a"
    assert state.previous is None
    assert state.pending == Pending("a", "1", SHA1, Phase.ACTIVATED)
    state = run(state, Healthy())
    assert state.pending is not None
    assert state.pending.phase is Phase.HEALTHY


def test_updates_alternate_slots_and_keep_the_last_good_one_for_rollback() -> None:
    first = run(SlotState(), Begin("1", SHA1), Verified(), Installed(), Activated(), Healthy())
    second = run(first, Begin("2", SHA2))
    assert second.pending == Pending("b", "2", SHA2)
    second = run(second, Verified(), Installed())
    assert second.active == "a"  # nothing switches before activation
    second = run(second, Activated(), Healthy())
    assert (second.active, second.previous) == ("b", "a")
    third = run(second, Begin("3", SHA3))
    # the spare slot was the rollback target: it is being overwritten, so it is forgotten
    assert (third.active, third.previous, third.pending) == ("b", None, Pending("a", "3", SHA3))


def test_beginning_the_update_in_flight_again_resumes_it() -> None:
    state = run(SlotState(), Begin("1", SHA1), Verified())
    assert next_state(state, Begin("1", SHA1)) is state
    superseded = next_state(state, Begin("2", SHA2))
    assert superseded.pending == Pending("a", "2", SHA2)


def test_a_finished_or_failed_update_is_replaced_by_the_next_begin() -> None:
    failed = run(SlotState(), Begin("1", SHA1), Failed("bad"))
    assert failed.pending == Pending("a", "1", SHA1, Phase.FAILED, "bad")
    assert next_state(failed, Begin("1", SHA1)).pending == Pending("a", "1", SHA1)


def test_rollback_of_an_activated_update_serves_previous_and_records_why() -> None:
    state = run(SlotState(), Begin("1", SHA1), Verified(), Installed(), Activated(), Healthy())
    state = run(state, Begin("2", SHA2), Verified(), Installed(), Activated())
    back = next_state(state, RolledBack("crashed on load"))
    assert (back.active, back.previous) == ("a", None)
    assert back.pending == Pending("b", "2", SHA2, Phase.FAILED, "crashed on load")
    assert back.rollback_reason == "crashed on load"
    with pytest.raises(InvalidTransition, match="no previous"):
        next_state(back, RolledBack("again"))


def test_a_healthy_update_can_still_be_rolled_back_by_an_operator() -> None:
    state = run(SlotState(), Begin("1", SHA1), Verified(), Installed(), Activated(), Healthy())
    state = run(state, Begin("2", SHA2), Verified(), Installed(), Activated(), Healthy())
    back = next_state(state, RolledBack("operator"))
    assert (back.active, back.previous) == ("a", None)
    assert back.pending is not None
    assert back.pending.phase is Phase.FAILED


def test_rollback_to_nothing_only_when_recovery_allows_it() -> None:
    state = run(SlotState(), Begin("1", SHA1), Verified(), Installed(), Activated())
    with pytest.raises(InvalidTransition):
        next_state(state, RolledBack("unconfirmed"))
    empty = next_state(state, RolledBack("unconfirmed", allow_empty=True))
    assert (empty.active, empty.previous) == (None, None)
    with pytest.raises(InvalidTransition, match="nothing is active"):
        next_state(empty, RolledBack("again", allow_empty=True))


@pytest.mark.parametrize(
    ("events", "refused"),
    [
        ((), Verified()),
        ((), Installed()),
        ((), Activated()),
        ((), Healthy()),
        ((), Failed("x")),
        ((Begin("1", SHA1),), Installed()),  # not verified yet
        ((Begin("1", SHA1),), Activated()),
        ((Begin("1", SHA1), Verified()), Activated()),
        ((Begin("1", SHA1), Verified(), Installed()), Healthy()),
        ((Begin("1", SHA1), Verified(), Installed()), Restarted()),
        ((Begin("1", SHA1), Verified(), Installed(), Activated()), Begin("2", SHA2)),
        ((Begin("1", SHA1), Verified(), Installed(), Activated()), Failed("x")),
        ((Begin("1", SHA1), Verified(), Installed(), Activated(), Healthy()), Activated()),
    ],
)
def test_events_out_of_order_are_refused(events: tuple[object, ...], refused: object) -> None:
    state = run(SlotState(), *events)
    with pytest.raises(InvalidTransition):
        next_state(state, refused)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("version", "sha256"),
    [("1", "0" * 63), ("1", "G" * 64), ("1", "A" * 64), ("", SHA1), ("../1", SHA1), ("1 2", SHA1)],
)
def test_malformed_updates_are_refused(version: str, sha256: str) -> None:
    with pytest.raises(InvalidUpdate):
        next_state(SlotState(), Begin(version, sha256))


def test_inconsistent_states_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="also be the previous"):
        SlotState(active="a", previous="a")
    with pytest.raises(ValueError, match="in flight"):
        SlotState(active="a", pending=Pending("a", "1", SHA1))
    with pytest.raises(ValueError, match="active slot"):
        SlotState(active="a", pending=Pending("b", "1", SHA1, Phase.ACTIVATED))
    with pytest.raises(ValueError, match="reason"):
        Pending("a", "1", SHA1, Phase.FAILED)


def test_previous_lost_forgets_the_rollback_target() -> None:
    state = SlotState(active="b", previous="a")
    assert next_state(state, PreviousLost()) == SlotState(active="b")


# --- the pure recovery plan -------------------------------------------------------------------


def installed(sha256: str = SHA1) -> SlotContents:
    manifest = ModelManifest(
        name=NAME, version="1", format=ModelFormat.GGUF, file="m.gguf", sha256=sha256, size_bytes=3
    )
    return SlotContents(has_manifest=True, manifest=manifest, artifact_size=3)


EMPTY = SlotContents()
TRUNCATED = replace(installed(), artifact_size=1)
UNREADABLE = SlotContents(has_manifest=True)
GOOD_A = SlotState(active="a")


def spare(phase: Phase) -> SlotState:
    return replace(GOOD_A, pending=Pending("b", "2", SHA2, phase))


def served_b(phase: Phase) -> SlotState:
    return SlotState(active="b", previous="a", pending=Pending("b", "2", SHA2, phase))


failed_spare = replace(GOOD_A, pending=Pending("b", "2", SHA2, Phase.FAILED, "x"))
first_unconfirmed = SlotState(active="a", pending=Pending("a", "1", SHA1, Phase.ACTIVATED))


@pytest.mark.parametrize(
    ("state", "a", "b", "action"),
    [
        (SlotState(), EMPTY, EMPTY, Keep),
        (GOOD_A, installed(), EMPTY, Keep),
        (SlotState(active="b", previous="a"), installed(), installed(SHA2), Keep),
        # downloading: resume what is there, unless it is an older install
        (replace(GOOD_A, pending=Pending("b", "2", SHA2)), installed(), EMPTY, Keep),
        (replace(GOOD_A, pending=Pending("b", "2", SHA2)), installed(), installed(SHA3), Restart),
        (replace(GOOD_A, pending=Pending("b", "2", SHA2)), installed(), UNREADABLE, Restart),
        # verified: finish an install that completed, else fetch again
        (spare(Phase.VERIFIED), installed(), installed(SHA2), FinishInstall),
        (spare(Phase.VERIFIED), installed(), EMPTY, Resume),
        (spare(Phase.VERIFIED), installed(), installed(SHA3), Restart),
        # installed: wait for activation, unless the slot lost it
        (spare(Phase.INSTALLED), installed(), installed(SHA2), Keep),
        (spare(Phase.INSTALLED), installed(), TRUNCATED, FailUpdate),
        # activated but never confirmed: roll back
        (served_b(Phase.ACTIVATED), installed(), installed(SHA2), RollBack),
        (first_unconfirmed, installed(), EMPTY, RollBack),
        (served_b(Phase.HEALTHY), installed(), installed(SHA2), Keep),
        # damaged slots
        (SlotState(active="b", previous="a"), installed(), TRUNCATED, RollBack),
        (SlotState(active="b", previous="a"), UNREADABLE, installed(SHA2), ForgetPrevious),
        (GOOD_A, EMPTY, EMPTY, RollBack),
        (failed_spare, installed(), EMPTY, Keep),
    ],
)  # fmt: skip
def test_recovery_plan(state: SlotState, a: SlotContents, b: SlotContents, action: type) -> None:
    assert type(recovery_plan(state, {"a": a, "b": b})) is action


# --- the shell, on real folders ---------------------------------------------------------------


def artifact(
    folder: Path, version: str, size: int = 4096, name: str = "m.gguf"
) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    data = version.encode() * (size // len(version))
    path = folder / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def deploy(store: ABSlots, tmp_path: Path, version: str, *, healthy: bool = True) -> str:
    path, sha = artifact(tmp_path / "incoming", version)
    store.begin(NAME, version, sha)
    store.install(NAME, path)
    store.activate(NAME)
    if healthy:
        store.mark_healthy(NAME)
    return sha


def served(store: ABSlots) -> bytes:
    path = store.active_path(NAME)
    manifest = store.active_manifest(NAME)
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest.sha256
    return data


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.endswith(".tmp") or "trash" in p.name)


@pytest.fixture
def store(tmp_path: Path) -> ABSlots:
    return ABSlots(tmp_path / "slots")


def test_install_activate_and_serve_end_to_end(store: ABSlots, tmp_path: Path) -> None:
    with pytest.raises(NoActiveModel):
        store.active_path(NAME)
    path, sha = artifact(tmp_path / "incoming", "v1")
    target = store.begin(NAME, "v1", sha)
    assert target == store.root / NAME / "a"
    assert target.is_dir()
    assert not any(target.iterdir())
    manifest = store.install(NAME, path)
    assert not path.exists()  # moved, not copied
    assert (manifest.version, manifest.sha256, manifest.file) == ("v1", sha, "m.gguf")
    assert store.state(NAME).pending == Pending("a", "v1", sha, Phase.INSTALLED)
    with pytest.raises(NoActiveModel):
        store.active_path(NAME)  # installed is not served yet
    assert store.activate(NAME) == target / "m.gguf"
    store.mark_healthy(NAME)
    assert served(store) == b"v1" * 2048
    saved = json.loads((store.root / NAME / STATE).read_text())
    assert saved["active"] == "a"
    assert saved["pending"]["phase"] == "healthy"
    assert leftovers(store.root) == []
    assert store.recover(NAME) == []


def test_an_update_goes_beside_the_served_model_then_switches(
    store: ABSlots, tmp_path: Path
) -> None:
    deploy(store, tmp_path, "v1")
    path, sha = artifact(tmp_path / "incoming", "v2")
    assert store.begin(NAME, "v2", sha) == store.root / NAME / "b"
    store.install(NAME, path)
    assert served(store) == b"v1" * 2048  # still v1 until activation
    store.activate(NAME)
    assert served(store) == b"v2" * 2048
    state = store.state(NAME)
    assert (state.active, state.previous) == ("b", "a")


def test_rollback_serves_the_previous_slot_and_records_why(store: ABSlots, tmp_path: Path) -> None:
    deploy(store, tmp_path, "v1")
    deploy(store, tmp_path, "v2", healthy=False)
    assert store.rollback(NAME, "health check failed: p95 too slow") == (
        store.root / NAME / "a" / "m.gguf"
    )
    assert served(store) == b"v1" * 2048
    state = store.state(NAME)
    assert state.rollback_reason == "health check failed: p95 too slow"
    assert state.pending is not None
    assert (state.pending.phase, state.pending.reason) == (
        Phase.FAILED,
        "health check failed: p95 too slow",
    )
    with pytest.raises(InvalidTransition):
        store.rollback(NAME, "twice")
    deploy(store, tmp_path, "v3")  # the failed slot is reused
    assert served(store) == b"v3" * 2048


def test_a_wrong_artifact_fails_the_update_and_serving_goes_on(
    store: ABSlots, tmp_path: Path
) -> None:
    deploy(store, tmp_path, "v1")
    path, _ = artifact(tmp_path / "incoming", "v2")
    store.begin(NAME, "v2", SHA2)
    with pytest.raises(ArtifactRejected, match="not the announced"):
        store.install(NAME, path)
    pending = store.state(NAME).pending
    assert pending is not None
    assert pending.phase is Phase.FAILED
    assert path.exists()  # not moved in
    assert served(store) == b"v1" * 2048
    with pytest.raises(InvalidTransition):
        store.activate(NAME)


def test_a_file_that_is_no_model_or_absent_is_rejected(store: ABSlots, tmp_path: Path) -> None:
    path, sha = artifact(tmp_path / "incoming", "v1", name="m.bin")
    store.begin(NAME, "v1", sha)
    with pytest.raises(ArtifactRejected):
        store.install(NAME, tmp_path / "missing.gguf")
    with pytest.raises(ArtifactRejected, match="unknown model format"):
        store.install(NAME, path)
    assert store.state(NAME).pending == Pending(
        "a",
        "v1",
        sha,
        Phase.FAILED,
        store.state(NAME).pending.reason,  # type: ignore[union-attr]
    )


def test_a_download_straight_into_the_slot_installs_in_place_with_side_files(
    store: ABSlots, tmp_path: Path
) -> None:
    data = b"onnx" * 1000
    sha = hashlib.sha256(data).hexdigest()
    slot = store.begin(NAME, "v1", sha)
    (slot / "m.onnx").write_bytes(data)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    manifest = store.install(NAME, slot / "m.onnx", extra_files={"tokenizer.json": tokenizer})
    assert manifest.format is ModelFormat.ONNX
    store.activate(NAME)
    assert served(store) == data
    assert (slot / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in slot.iterdir()) == sorted([MANIFEST, "m.onnx", "tokenizer.json"])


def test_begin_again_keeps_a_partial_download(store: ABSlots) -> None:
    slot = store.begin(NAME, "v1", SHA1)
    (slot / "m.gguf.part").write_bytes(b"half")
    assert store.begin(NAME, "v1", SHA1) == slot
    assert (slot / "m.gguf.part").read_bytes() == b"half"
    store.begin(NAME, "v2", SHA2)  # another update: the slot starts empty
    assert not any(slot.iterdir())


def test_an_update_cannot_begin_over_an_unconfirmed_one(store: ABSlots, tmp_path: Path) -> None:
    deploy(store, tmp_path, "v1", healthy=False)
    with pytest.raises(InvalidTransition, match="mark it healthy or roll it back"):
        store.begin(NAME, "v2", SHA2)


def test_fail_gives_up_the_download(store: ABSlots, tmp_path: Path) -> None:
    deploy(store, tmp_path, "v1")
    store.begin(NAME, "v2", SHA2)
    store.fail(NAME, "server sent the wrong bytes")
    pending = store.state(NAME).pending
    assert pending == Pending("b", "v2", SHA2, Phase.FAILED, "server sent the wrong bytes")
    assert served(store) == b"v1" * 2048


# --- recovery from what a crash leaves ------------------------------------------------------


def write_state(store: ABSlots, state: SlotState) -> None:
    (store.root / NAME / STATE).write_bytes(slots_module._STATE_JSON.dump_json(state))


def test_recover_a_crash_between_begins_state_write_and_clearing_the_slot(
    store: ABSlots, tmp_path: Path
) -> None:
    deploy(store, tmp_path, "v1")
    deploy(store, tmp_path, "v2")
    # begin("v3") wrote its state (slot a, no longer previous) and died before clearing a
    write_state(store, SlotState(active="b", pending=Pending("a", "v3", SHA3)))
    assert [type(a) for a in store.recover(NAME)] == [Restart]
    assert not any((store.root / NAME / "a").iterdir())
    assert store.state(NAME).pending == Pending("a", "v3", SHA3)
    assert served(store) == b"v2" * 2048


def test_recover_a_crash_while_downloading_keeps_the_part(store: ABSlots, tmp_path: Path) -> None:
    deploy(store, tmp_path, "v1")
    slot = store.begin(NAME, "v2", SHA2)
    (slot / "m.gguf.part").write_bytes(b"half")
    assert store.recover(NAME) == []
    assert (slot / "m.gguf.part").exists()
    assert served(store) == b"v1" * 2048


def test_recover_a_crash_after_the_install_but_before_its_state_write(
    store: ABSlots, tmp_path: Path
) -> None:
    deploy(store, tmp_path, "v1")
    path, sha = artifact(tmp_path / "incoming", "v2")
    store.begin(NAME, "v2", sha)
    store.install(NAME, path)
    verified = store.state(NAME)
    assert verified.pending is not None
    write_state(store, replace(verified, pending=replace(verified.pending, phase=Phase.VERIFIED)))
    assert [type(a) for a in store.recover(NAME)] == [FinishInstall]
    assert store.state(NAME) == verified
    store.activate(NAME)
    assert served(store) == b"v2" * 2048


def test_recover_a_crash_after_the_move_but_before_the_manifest(
    store: ABSlots, tmp_path: Path
) -> None:
    deploy(store, tmp_path, "v1")
    path, sha = artifact(tmp_path / "incoming", "v2")
    slot = store.begin(NAME, "v2", sha)
    state = store.state(NAME)
    assert state.pending is not None
    write_state(store, replace(state, pending=replace(state.pending, phase=Phase.VERIFIED)))
    path.replace(slot / "m.gguf")
    assert [type(a) for a in store.recover(NAME)] == [Resume]
    assert store.state(NAME) == state  # downloading again, in the same slot
    store.install(NAME, slot / "m.gguf")  # the file already there is verified and kept
    store.activate(NAME)
    assert served(store) == b"v2" * 2048


def test_recover_keeps_an_installed_update_pending(store: ABSlots, tmp_path: Path) -> None:
    deploy(store, tmp_path, "v1")
    path, sha = artifact(tmp_path / "incoming", "v2")
    store.begin(NAME, "v2", sha)
    store.install(NAME, path)
    before = store.state(NAME)
    assert store.recover(NAME) == []
    assert store.state(NAME) == before
    (store.root / NAME / "b" / MANIFEST).unlink()  # the disk lost it
    assert [type(a) for a in store.recover(NAME)] == [FailUpdate]
    assert store.state(NAME).pending.phase is Phase.FAILED  # type: ignore[union-attr]
    assert served(store) == b"v1" * 2048


def test_recover_rolls_back_an_update_never_confirmed_healthy(
    store: ABSlots, tmp_path: Path
) -> None:
    deploy(store, tmp_path, "v1")
    deploy(store, tmp_path, "v2", healthy=False)  # then the agent died loading it
    [action] = store.recover(NAME)
    assert isinstance(action, RollBack)
    assert served(store) == b"v1" * 2048
    state = store.state(NAME)
    assert state.rollback_reason == action.reason
    assert "never confirmed healthy" in action.reason


def test_recover_an_unconfirmed_first_install_serves_nothing(
    store: ABSlots, tmp_path: Path
) -> None:
    deploy(store, tmp_path, "v1", healthy=False)
    assert [type(a) for a in store.recover(NAME)] == [RollBack]
    with pytest.raises(NoActiveModel):
        store.active_path(NAME)
    deploy(store, tmp_path, "v2")  # and the next update goes on from there
    assert served(store) == b"v2" * 2048


def test_recover_falls_back_from_a_damaged_active_slot(store: ABSlots, tmp_path: Path) -> None:
    deploy(store, tmp_path, "v1")
    deploy(store, tmp_path, "v2")
    (store.root / NAME / "b" / "m.gguf").write_bytes(b"short")
    with pytest.raises(NoActiveModel, match="not an intact install"):
        store.active_path(NAME)
    assert [type(a) for a in store.recover(NAME)] == [RollBack]
    assert served(store) == b"v1" * 2048


def test_recover_forgets_a_damaged_previous_slot(store: ABSlots, tmp_path: Path) -> None:
    deploy(store, tmp_path, "v1")
    deploy(store, tmp_path, "v2", healthy=False)
    (store.root / NAME / "a" / MANIFEST).write_text("{")
    # the unconfirmed update has nothing intact to fall back to: serve nothing, not it
    assert [type(a) for a in store.recover(NAME)] == [ForgetPrevious, RollBack]
    with pytest.raises(NoActiveModel):
        store.active_path(NAME)


def test_a_crash_during_the_state_write_is_harmless(store: ABSlots, tmp_path: Path) -> None:
    deploy(store, tmp_path, "v1")
    before = store.state(NAME)
    # killed after writing (part of) the temporary file, before os.replace
    tmp = store.root / NAME / f".{STATE}.0123456789ab.tmp"
    tmp.write_text('{"active": "b", "prev')
    trash = store.root / NAME / ".trash-b-0123456789ab"
    (trash / "sub").mkdir(parents=True)
    assert store.state(NAME) == before
    assert served(store) == b"v1" * 2048
    assert store.recover(NAME) == []
    assert not tmp.exists()
    assert not trash.exists()


def test_a_corrupt_state_file_is_reported_not_guessed(store: ABSlots, tmp_path: Path) -> None:
    deploy(store, tmp_path, "v1")
    (store.root / NAME / STATE).write_text('{"active": "a", "previous": "a"}')
    with pytest.raises(CorruptState):
        store.state(NAME)
    with pytest.raises(SlotRejected):
        store.recover(NAME)


def test_recover_of_an_unknown_model_does_nothing(store: ABSlots) -> None:
    assert store.recover(NAME) == []
    assert not store.root.exists()


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../x",
        "x/..",
        "a/b",
        "/etc",
        "/abs/path",
        "a\\b",
        "..\\x",
        "%2e%2e",
        "a%2fb",
        "a%5cb",
        ".hidden",
        "-x",
        "Upper",
        "a\x00b",
        "a\nb",
        "x" * 65,
        "ｌｌｍ",  # fullwidth letters
        "a\u2215b",  # division slash
    ],
)
def test_names_that_could_leave_the_root_are_refused(store: ABSlots, name: str) -> None:
    with pytest.raises(InvalidName):
        check_name(name)
    for call in (
        lambda: store.begin(name, "1", SHA1),
        lambda: store.active_path(name),
        lambda: store.recover(name),
        lambda: store.state(name),
        lambda: store.rollback(name, "x"),
    ):
        with pytest.raises(InvalidName):
            call()
    assert not store.root.exists()


def test_plain_names_are_accepted() -> None:
    for name in ("llm", "gemma3-270m-q4_k_m", "a.b", "0", "x" * 64):
        assert check_name(name) == name


# --- SIGKILL at random points -----------------------------------------------------------------


def child(root: str, incoming: str) -> None:
    """Recover, say so, then deploy updates forever (every third rolled back) until killed."""
    store = ABSlots(Path(root))
    store.recover(NAME)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    n = 0
    while True:
        n += 1
        version = f"v{os.getpid()}-{n}"
        path, sha = artifact(Path(incoming), version, size=64 << 10)
        store.begin(NAME, version, sha)
        store.install(NAME, path)
        store.activate(NAME)
        if n % 3 == 0:
            store.rollback(NAME, "simulated failing health check")
        else:
            store.mark_healthy(NAME)


@pytest.mark.integration  # SIGKILLs child processes that run the slots
def test_sigkill_at_any_point_leaves_a_verified_model_to_serve(tmp_path: Path) -> None:
    store = ABSlots(tmp_path / "slots")
    deploy(store, tmp_path, "v0")
    rng = random.Random(1234)
    code = "import sys; from tests.agent.test_slots import child; child(sys.argv[1], sys.argv[2])"
    seen: set[bytes] = set()
    actions: list[str] = []
    started = time.monotonic()
    kills = 0
    while kills < 20 and time.monotonic() - started < 7:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(store.root), str(tmp_path / "incoming")],
            cwd=REPO,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready == b"ready\n", proc.communicate()[1].decode()[-2000:]
        time.sleep(rng.random() * 0.06)  # a few update cycles, cut anywhere
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        kills += 1
        actions += [type(a).__name__ for a in store.recover(NAME)]
        seen.add(served(store))  # hashes to the active manifest's sha256
        assert store.recover(NAME) == []  # settled
        state = store.state(NAME)
        assert state.pending is None or state.pending.phase is not Phase.ACTIVATED
    assert kills >= 5
    assert len(seen) > 2, f"no update got through, the kills tested nothing ({actions})"


def test_the_public_api() -> None:
    assert sorted(slots_module.__all__) == sorted(
        [
            "MANIFEST",
            "SLOTS",
            "STATE",
            "ABSlots",
            "Activated",
            "ArtifactRejected",
            "Begin",
            "CorruptState",
            "Event",
            "FailUpdate",
            "Failed",
            "FinishInstall",
            "ForgetPrevious",
            "Healthy",
            "Installed",
            "InvalidName",
            "InvalidTransition",
            "InvalidUpdate",
            "Keep",
            "NoActiveModel",
            "Pending",
            "Phase",
            "PreviousLost",
            "RecoveryAction",
            "Restart",
            "Restarted",
            "Resume",
            "RollBack",
            "RolledBack",
            "Slot",
            "SlotContents",
            "SlotError",
            "SlotRejected",
            "SlotState",
            "SlotUnavailable",
            "Verified",
            "check_name",
            "next_state",
            "recovery_plan",
        ]
    )
    rejected = [InvalidName, InvalidTransition, InvalidUpdate, ArtifactRejected, NoActiveModel]
    assert all(issubclass(error, SlotRejected) for error in [*rejected, CorruptState])
    assert issubclass(slots_module.SlotUnavailable, slots_module.SlotError)
    assert not issubclass(slots_module.SlotUnavailable, SlotRejected)


def test_an_os_error_is_transient_and_leaves_the_old_state(
    store: ABSlots, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deploy(store, tmp_path, "v1")
    path, sha = artifact(tmp_path / "incoming", "v2")
    store.begin(NAME, "v2", sha)
    store.install(NAME, path)
    before = store.state(NAME)

    def failing_fsync(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files_module, "fsync_file", failing_fsync)
    with pytest.raises(slots_module.SlotUnavailable, match="Input/output error"):
        store.activate(NAME)
    monkeypatch.undo()
    assert store.state(NAME) == before
    assert leftovers(store.root) == []
    assert served(store) == b"v1" * 2048
    store.activate(NAME)  # the same call passes once the disk does
    assert served(store) == b"v2" * 2048
