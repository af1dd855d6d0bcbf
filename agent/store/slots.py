"""A/B slots for model updates: install beside the running model, switch atomically, roll back.

Each model name owns one folder under ``root``::

    <root>/<name>/state.json    which slot is active, which is the fallback, the update in flight
    <root>/<name>/a/            one installed model: its artifact and ``manifest.json``
    <root>/<name>/b/            the other one

An update moves through phases, one durable ``state.json`` write each::

    begin ──► downloading ──► verified ──► installed ──► activated ──► healthy
                   │              │            │             │
                   └──────────────┴────────────┴─► failed ◄──┘ (rollback: back to previous)

``activate`` is the only switch of what is served: one atomic rewrite of ``state.json`` (temp
file, fsync, ``os.replace``, fsync of the folder) makes the new slot active and the old one
``previous``, the known-good copy kept for rollback. Nothing the state calls servable is ever
being written: a slot is cleared only after the state has stopped pointing at it (cleared slots
are first renamed aside, so they vanish at once), and its ``manifest.json`` is renamed in only
after the artifact's hash has been checked and the artifact made durable. A SIGKILL or power
cut between any two syscalls therefore leaves the old state or the new one;
:meth:`ABSlots.recover` (run at start-up) then finishes or undoes whatever was in between, e.g.
an update activated but never confirmed healthy is rolled back.

The decisions are pure: :func:`next_state` (state and event in, state out) and
:func:`recovery_plan` (state and what the slots hold in, one action out) never touch the disk.
:class:`ABSlots` is the thin I/O shell around them. It is synchronous (call it from a worker
thread in async code) and assumes one updater per ``root`` at a time.

    SlotError                   every slot error (a family on agent.errors' tree)
    ├── SlotRejected            Rejected: the same again fails the same way: fix input or order
    │   ├── InvalidName         the model name could leave ``root`` or is not a model name
    │   ├── InvalidTransition   not allowed in the current phase (e.g. activate before install)
    │   ├── InvalidUpdate       the announced version or sha256 is malformed
    │   ├── ArtifactRejected    the file is not the artifact ``begin`` announced (the update is
    │   │                       marked failed), or an installed slot no longer holds it
    │   ├── NoActiveModel       nothing verified to serve for this name
    │   └── CorruptState        ``state.json`` is unreadable: disk trouble, not a crash
    └── SlotUnavailable         Transient: an OS error (disk full, I/O error); state is the old
                                or the new one, so the same call may pass later

OS and pydantic errors are translated here.
"""

from __future__ import annotations

import errno
import json
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Final, Literal

from pydantic import TypeAdapter, ValidationError

from agent.errors import AgentError, ConfigError, Rejected, Transient
from agent.files import atomic_file, format_of, fsync_dir, fsync_file, mkdir_durable, sha256_file
from models.manifest import ModelManifest, RuntimeParams
from models.values import MODEL_NAME, SHA256, VERSION

__all__ = [
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

Slot = Literal["a", "b"]
SLOTS: Final[tuple[Slot, Slot]] = ("a", "b")
STATE: Final = "state.json"
MANIFEST: Final = "manifest.json"
_SCHEMA: Final = 1
_MAX_RECOVERY_STEPS: Final = 8  # each action strictly narrows the state; 4 is the longest chain

_STATE_TMP = f".{STATE}."  # prefix of the temporary files a state write leaves if killed
_TRASH = ".trash-"  # prefix of slots renamed aside to be deleted


# --- errors -----------------------------------------------------------------------------------


class SlotError(AgentError):
    """Every slot error; :func:`agent.errors.retryable` tells the two branches apart."""


class SlotRejected(SlotError, Rejected):
    """The operation cannot succeed as asked; retrying it unchanged fails the same way."""


class InvalidName(SlotRejected):
    """The model name is not a plain model name (it could escape ``root``)."""


class InvalidTransition(SlotRejected):
    """The operation does not apply in the model's current phase."""


class InvalidUpdate(SlotRejected):
    """The announced version or sha256 is malformed."""


class ArtifactRejected(SlotRejected):
    """The artifact is not the one announced, or not a model file the agent can run."""


class NoActiveModel(SlotRejected):
    """No verified, intact slot is active for this model."""


class CorruptState(SlotRejected):
    """``state.json`` exists but cannot be read as a slot state."""


class SlotUnavailable(SlotError, Transient):
    """An OS error interrupted the operation; what is on disk is the old or the new state."""


# --- state ------------------------------------------------------------------------------------


class Phase(StrEnum):
    """Where an update stands; ``healthy`` and ``failed`` are final."""

    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    INSTALLED = "installed"
    ACTIVATED = "activated"
    HEALTHY = "healthy"
    FAILED = "failed"


_OPEN: Final = frozenset({Phase.DOWNLOADING, Phase.VERIFIED, Phase.INSTALLED})  # in the spare slot
_SERVED: Final = frozenset({Phase.ACTIVATED, Phase.HEALTHY})  # in the active slot


def _other(slot: Slot) -> Slot:
    return "b" if slot == "a" else "a"


@dataclass(frozen=True)
class Pending:
    """The latest update: which slot it goes to, what it must be, how far it got."""

    slot: Slot
    version: str
    sha256: str
    phase: Phase = Phase.DOWNLOADING
    reason: str | None = None  # why it failed; None unless phase is FAILED

    def __post_init__(self) -> None:
        if not VERSION.fullmatch(self.version):
            raise ValueError(f"invalid version {self.version!r}: use letters, digits and .+_-")
        if not SHA256.fullmatch(self.sha256):
            raise ValueError(f"sha256 must be 64 lower-case hex digits, got {self.sha256!r}")
        if (self.phase is Phase.FAILED) != (self.reason is not None):
            raise ValueError("a reason is recorded exactly when the update failed")


@dataclass(frozen=True)
class SlotState:
    """The content of ``state.json``: a value, checked for consistency when built."""

    active: Slot | None = None  # the slot served; None: nothing installed (or all lost)
    previous: Slot | None = None  # the last known-good slot, kept for rollback
    pending: Pending | None = None  # the latest update, in flight or finished
    rollback_reason: str | None = None  # why the last rollback happened
    schema_version: int = _SCHEMA

    def __post_init__(self) -> None:
        if self.schema_version != _SCHEMA:
            raise ValueError(f"unknown schema_version {self.schema_version}")
        if self.active is not None and self.active == self.previous:
            raise ValueError("the active slot cannot also be the previous one")
        pending = self.pending
        if pending is None:
            return
        if pending.phase in _OPEN and pending.slot in (self.active, self.previous):
            raise ValueError(f"an update in flight cannot use the served slot {pending.slot}")
        if pending.phase in _SERVED and pending.slot != self.active:
            raise ValueError(f"an {pending.phase} update must be in the active slot")

    def spare(self) -> Slot:
        """The slot an update goes to: never the active one."""
        if self.active is not None:
            return _other(self.active)
        return _other(self.previous) if self.previous is not None else "a"


_STATE_JSON: Final = TypeAdapter(SlotState)


# --- events and the pure state machine ---------------------------------------------------------


@dataclass(frozen=True)
class Begin:
    """An update to ``version`` (hashing to ``sha256``) starts downloading into the spare slot."""

    version: str
    sha256: str


@dataclass(frozen=True)
class Verified:
    """The downloaded artifact hashes to the announced sha256."""


@dataclass(frozen=True)
class Installed:
    """Artifact and manifest are durable in the update's slot."""


@dataclass(frozen=True)
class Activated:
    """The update's slot is served; the one served before is kept as ``previous``."""


@dataclass(frozen=True)
class Healthy:
    """The activated update passed its health check."""


@dataclass(frozen=True)
class RolledBack:
    """Serve ``previous`` again; the slot served until now is no longer trusted.

    Without a previous slot this is refused, unless ``allow_empty`` (recovery), which then
    leaves nothing active rather than serve an unconfirmed or damaged slot.
    """

    reason: str
    allow_empty: bool = False


@dataclass(frozen=True)
class Failed:
    """The update in flight cannot finish (bad artifact, download refused)."""

    reason: str


@dataclass(frozen=True)
class Restarted:
    """Recovery: the update goes back to downloading (its slot is cleared or resumed)."""


@dataclass(frozen=True)
class PreviousLost:
    """Recovery: the previous slot is damaged, so it is no rollback target any more."""


Event = (
    Begin
    | Verified
    | Installed
    | Activated
    | Healthy
    | RolledBack
    | Failed
    | Restarted
    | PreviousLost
)


def _require(state: SlotState, *phases: Phase, doing: str) -> Pending:
    pending = state.pending
    if pending is None or pending.phase not in phases:
        now = "no update" if pending is None else f"update {pending.version} is {pending.phase}"
        wanted = " or ".join(phases)
        raise InvalidTransition(f"cannot {doing}: {now}, expected one that is {wanted}")
    return pending


def next_state(state: SlotState, event: Event) -> SlotState:
    """The state after ``event``; raises :class:`InvalidTransition` when it does not apply.

    ``Begin`` with the version and hash already in flight returns ``state`` unchanged (the
    download resumes). ``Begin`` is refused while an update is activated but not yet confirmed.
    """
    match event:
        case Begin(version, sha256):
            pending = state.pending
            if pending is not None and pending.phase is Phase.ACTIVATED:
                raise InvalidTransition(
                    f"update {pending.version} is activated: mark it healthy or roll it back first"
                )
            if (
                pending is not None
                and pending.phase in _OPEN
                and (pending.version, pending.sha256) == (version, sha256)
            ):
                return state
            slot = state.spare()
            try:
                new = Pending(slot, version, sha256)
            except ValueError as exc:
                raise InvalidUpdate(f"cannot begin: {exc}") from None
            previous = None if state.previous == slot else state.previous
            return replace(state, previous=previous, pending=new)
        case Verified():
            pending = _require(state, Phase.DOWNLOADING, Phase.VERIFIED, doing="verify")
            return replace(state, pending=replace(pending, phase=Phase.VERIFIED))
        case Installed():
            pending = _require(state, Phase.VERIFIED, Phase.INSTALLED, doing="install")
            return replace(state, pending=replace(pending, phase=Phase.INSTALLED))
        case Activated():
            pending = _require(state, Phase.INSTALLED, doing="activate")
            return replace(
                state,
                active=pending.slot,
                previous=state.active,
                pending=replace(pending, phase=Phase.ACTIVATED),
            )
        case Healthy():
            pending = _require(state, Phase.ACTIVATED, Phase.HEALTHY, doing="mark healthy")
            return replace(state, pending=replace(pending, phase=Phase.HEALTHY))
        case RolledBack(reason, allow_empty):
            if state.previous is None and not allow_empty:
                raise InvalidTransition("cannot roll back: no previous slot is kept")
            if state.active is None and state.previous is None:
                raise InvalidTransition("cannot roll back: nothing is active")
            pending = state.pending
            if pending is not None and pending.phase in _SERVED:
                pending = replace(pending, phase=Phase.FAILED, reason=reason)
            return replace(
                state, active=state.previous, previous=None, pending=pending, rollback_reason=reason
            )
        case Failed(reason):
            pending = _require(state, *_OPEN, doing="fail the update")
            return replace(state, pending=replace(pending, phase=Phase.FAILED, reason=reason))
        case Restarted():
            pending = _require(state, Phase.DOWNLOADING, Phase.VERIFIED, doing="restart")
            return replace(state, pending=replace(pending, phase=Phase.DOWNLOADING))
        case PreviousLost():
            return replace(state, previous=None)


# --- recovery: what the slots hold, and the pure plan ------------------------------------------


@dataclass(frozen=True)
class SlotContents:
    """What one slot folder holds, as read at start-up (no hashing: install hashed it)."""

    has_manifest: bool = False  # a manifest.json is there, readable or not
    manifest: ModelManifest | None = None  # it, parsed; None when absent or unreadable
    artifact_size: int | None = None  # size of the manifest's file; None when it is missing

    @property
    def intact(self) -> bool:
        """A complete install: a readable manifest and its artifact at the recorded size."""
        return self.manifest is not None and self.artifact_size == self.manifest.size_bytes

    def holds(self, sha256: str) -> bool:
        """A complete install of the artifact hashing to ``sha256``."""
        return self.intact and self.manifest is not None and self.manifest.sha256 == sha256


@dataclass(frozen=True)
class Keep:
    """Nothing to do: the state is consistent (an installed update stays pending)."""

    reason: str


@dataclass(frozen=True)
class Resume:
    """The update goes on downloading into its slot, keeping what is there (a ``.part``)."""

    reason: str


@dataclass(frozen=True)
class Restart:
    """The update's slot holds something stale: clear it and download again."""

    reason: str


@dataclass(frozen=True)
class FinishInstall:
    """The install completed before the crash; only the state write was lost."""

    reason: str


@dataclass(frozen=True)
class FailUpdate:
    """The update's slot no longer holds what the state says was installed."""

    reason: str


@dataclass(frozen=True)
class RollBack:
    """Serve the previous slot again (or nothing, if there is none)."""

    reason: str


@dataclass(frozen=True)
class ForgetPrevious:
    """The previous slot is damaged: stop counting on it for rollback."""

    reason: str


RecoveryAction = Keep | Resume | Restart | FinishInstall | FailUpdate | RollBack | ForgetPrevious


def recovery_plan(state: SlotState, slots: Mapping[Slot, SlotContents]) -> RecoveryAction:
    """The one next step that brings ``state`` back to a settled, servable shape.

    In order: a damaged previous slot is forgotten; an update activated but not confirmed
    healthy is rolled back (to nothing if no intact previous slot is kept: an unconfirmed model
    may be what crashed the agent); a damaged active slot is rolled back; an installed update
    stays pending (or fails if its slot lost it); a verified one whose install completed is
    marked installed, else goes back to downloading; a slot holding an older install than the
    update in flight is cleared (restart); a download in progress is left to resume.

    Apply it, observe again and ask again until the answer is :class:`Keep`; each step is one
    crash-safe write, so a crash during recovery is recovered the same way.
    """
    empty = SlotContents()
    previous, active, pending = state.previous, state.active, state.pending
    if previous is not None and not slots.get(previous, empty).intact:
        return ForgetPrevious(f"previous slot {previous} is not an intact install")
    if pending is not None and pending.phase is Phase.ACTIVATED:
        return RollBack(f"update {pending.version} was activated but never confirmed healthy")
    if active is not None and not slots.get(active, empty).intact:
        return RollBack(f"active slot {active} is not an intact install")
    if pending is None or pending.phase not in _OPEN:
        return Keep("no update in flight")
    contents = slots.get(pending.slot, empty)
    if pending.phase is Phase.INSTALLED:
        if contents.holds(pending.sha256):
            return Keep(f"update {pending.version} is installed, waiting to be activated")
        return FailUpdate(f"slot {pending.slot} no longer holds update {pending.version}")
    if pending.phase is Phase.VERIFIED and contents.holds(pending.sha256):
        return FinishInstall(f"update {pending.version} was installed before the restart")
    if contents.has_manifest:
        return Restart(f"slot {pending.slot} still holds an earlier install")
    if pending.phase is Phase.VERIFIED:
        return Resume(f"update {pending.version} was verified but not installed: fetch it again")
    return Keep(f"update {pending.version} can resume downloading")


# --- names ------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """``name`` if it is a plain model name (lower-case, no separators, no dots first)."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid model name {name!r}: 1-64 of a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name


# --- the I/O shell ----------------------------------------------------------------------------


class ABSlots:
    """A/B slots for every model under ``root``; see the module docstring for the layout."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # paths and reads

    def folder(self, name: str) -> Path:
        """``<root>/<name>``, refusing any name that would resolve elsewhere."""
        folder = self.root / check_name(name)
        if folder.resolve().parent != self.root.resolve():
            raise InvalidName(f"model name {name!r} escapes {self.root}")
        return folder

    def slot_path(self, name: str, slot: Slot) -> Path:
        if slot not in SLOTS:
            raise InvalidName(f"no slot {slot!r}")
        return self.folder(name) / slot

    def state(self, name: str) -> SlotState:
        """The saved state; an empty one when the model has none yet."""
        path = self.folder(name) / STATE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return SlotState()
        except OSError as exc:
            raise SlotUnavailable(f"cannot read {path}: {exc}") from exc
        try:
            return _STATE_JSON.validate_json(raw)
        except ValidationError as exc:
            raise CorruptState(f"{path} is not a slot state: {exc}") from exc

    def contents(self, name: str, slot: Slot) -> SlotContents:
        folder = self.slot_path(name, slot)
        path = folder / MANIFEST
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return SlotContents()
        except OSError as exc:
            raise SlotUnavailable(f"cannot read {path}: {exc}") from exc
        try:
            manifest = ModelManifest.model_validate_json(raw)
        except ValidationError:
            return SlotContents(has_manifest=True)
        try:
            size: int | None = (folder / manifest.file).stat().st_size
        except FileNotFoundError:
            size = None
        except OSError as exc:
            raise SlotUnavailable(f"cannot stat {folder / manifest.file}: {exc}") from exc
        return SlotContents(has_manifest=True, manifest=manifest, artifact_size=size)

    def active_manifest(self, name: str) -> ModelManifest:
        """The manifest of the slot served, checked to be an intact install."""
        return self._active(name)[1]

    def active_path(self, name: str) -> Path:
        """The artifact to serve: one whose hash was checked before it entered its slot."""
        slot, manifest = self._active(name)
        return self.slot_path(name, slot) / manifest.file

    def _active(self, name: str) -> tuple[Slot, ModelManifest]:
        state = self.state(name)
        if state.active is None:
            raise NoActiveModel(f"model {name!r} has no active slot in {self.root}")
        contents = self.contents(name, state.active)
        if not contents.intact or contents.manifest is None:
            raise NoActiveModel(
                f"active slot {state.active} of model {name!r} is not an intact install; "
                "run recover"
            )
        return state.active, contents.manifest

    # operations

    def begin(self, name: str, version: str, sha256: str) -> Path:
        """Start an update: the spare slot, cleared, is returned for the download.

        Beginning the update already in flight again keeps the slot (a ``.part`` resumes).
        """
        folder = self.folder(name)
        with _os_errors(f"begin {name} {version}"):
            mkdir_durable(folder)
            state = self.state(name)
            new = next_state(state, Begin(version, sha256.lower()))
            assert new.pending is not None
            slot = new.pending.slot
            if new != state:
                self._save(name, new)  # first: the state stops counting on the slot...
                _clear(folder, slot)  # ...then the slot goes
            else:
                mkdir_durable(folder / slot)
            return folder / slot

    def install(
        self,
        name: str,
        verified_file: Path,
        *,
        runtime: RuntimeParams | None = None,
        extra_files: Mapping[str, Path] | None = None,
    ) -> ModelManifest:
        """Move the downloaded artifact into the update's slot, with its manifest.

        The artifact is hashed again (whatever the caller checked): a mismatch marks the
        update failed and raises :class:`ArtifactRejected`. ``extra_files`` (target name →
        source, such as a tokenizer) are copied in. Returns the slot's manifest.
        """
        with _os_errors(f"install {name}"):
            folder = self.folder(name)
            state = self.state(name)
            pending = _require(state, Phase.DOWNLOADING, Phase.VERIFIED, doing="install")
            slot = folder / pending.slot
            if not verified_file.is_file():
                raise ArtifactRejected(f"{verified_file} is not a file")
            try:
                manifest = ModelManifest(
                    name=name,
                    version=pending.version,
                    format=format_of(verified_file),
                    file=verified_file.name,
                    sha256=sha256_file(verified_file),
                    size_bytes=verified_file.stat().st_size,
                    runtime=runtime or RuntimeParams(),
                )
            except (ConfigError, ValidationError) as exc:
                self._save(name, next_state(state, Failed(f"not a model file: {exc}")))
                raise ArtifactRejected(f"{verified_file}: {exc}") from exc
            if manifest.sha256 != pending.sha256:
                reason = f"sha256 {manifest.sha256} is not the announced {pending.sha256}"
                self._save(name, next_state(state, Failed(reason)))
                raise ArtifactRejected(f"{verified_file}: {reason}")
            extras = dict(extra_files or {})
            for target in extras:
                if target in {MANIFEST, manifest.file} or not MODEL_NAME.fullmatch(target.lower()):
                    raise ArtifactRejected(f"invalid side file name {target!r}")
            state = next_state(state, Verified())
            self._save(name, state)
            mkdir_durable(slot)
            (slot / MANIFEST).unlink(missing_ok=True)  # no stale manifest beside the new file
            fsync_dir(slot)
            _move_durable(verified_file, slot / manifest.file)
            for target, source in extras.items():
                with atomic_file(slot / target) as tmp:
                    shutil.copyfile(source, tmp)
            with atomic_file(slot / MANIFEST) as tmp:
                tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2))
            self._save(name, next_state(state, Installed()))
            return manifest

    def activate(self, name: str) -> Path:
        """Serve the installed update: one atomic state write. Returns the new active path."""
        with _os_errors(f"activate {name}"):
            state = self.state(name)
            pending = _require(state, Phase.INSTALLED, doing="activate")
            if not self.contents(name, pending.slot).holds(pending.sha256):
                reason = f"slot {pending.slot} no longer holds update {pending.version}"
                self._save(name, next_state(state, Failed(reason)))
                raise ArtifactRejected(reason)
            self._save(name, next_state(state, Activated()))
            return self.active_path(name)

    def mark_healthy(self, name: str) -> None:
        """Confirm the activated update; its predecessor stays as the rollback target."""
        with _os_errors(f"mark {name} healthy"):
            self._save(name, next_state(self.state(name), Healthy()))

    def fail(self, name: str, reason: str) -> None:
        """Give up the update in flight (e.g. the download was refused); nothing served changes."""
        with _os_errors(f"fail the update of {name}"):
            self._save(name, next_state(self.state(name), Failed(reason)))

    def rollback(self, name: str, reason: str, *, allow_empty: bool = False) -> Path | None:
        """Serve the previous slot again, recording ``reason``. Returns the new active path.

        With ``allow_empty``, a model without a previous slot is left with nothing active
        (None) rather than keep serving what just failed.
        """
        with _os_errors(f"roll back {name}"):
            state = self.state(name)
            if state.previous is not None and not self.contents(name, state.previous).intact:
                raise InvalidTransition(
                    f"cannot roll back {name!r}: previous slot {state.previous} is damaged"
                )
            new = next_state(state, RolledBack(reason, allow_empty=allow_empty))
            self._save(name, new)
            return self.active_path(name) if new.active is not None else None

    def recover(self, name: str) -> list[RecoveryAction]:
        """Settle whatever a crash left, one crash-safe step at a time; returns the steps.

        Also removes what interrupted writes leave behind (temporary state files, slots
        renamed aside). Safe to run at every start-up and any number of times.
        """
        with _os_errors(f"recover {name}"):
            folder = self.folder(name)
            if not folder.is_dir():
                return []
            _purge_leftovers(folder)
            taken: list[RecoveryAction] = []
            for _ in range(_MAX_RECOVERY_STEPS):
                state = self.state(name)
                seen = {slot: self.contents(name, slot) for slot in SLOTS}
                action = recovery_plan(state, seen)
                if isinstance(action, Keep):
                    return taken
                taken.append(action)
                self._apply(name, state, action)
            raise AssertionError(
                f"recovery of {name!r} did not settle: {taken}"
            )  # pragma: no cover

    def _apply(self, name: str, state: SlotState, action: RecoveryAction) -> None:
        match action:
            case RollBack(reason):
                self._save(name, next_state(state, RolledBack(reason, allow_empty=True)))
            case FailUpdate(reason):
                self._save(name, next_state(state, Failed(reason)))
            case Restart():
                assert state.pending is not None
                self._save(name, next_state(state, Restarted()))
                _clear(self.folder(name), state.pending.slot)
            case Resume():
                self._save(name, next_state(state, Restarted()))
            case FinishInstall():
                self._save(name, next_state(state, Installed()))
            case ForgetPrevious():
                self._save(name, next_state(state, PreviousLost()))
            case Keep():  # pragma: no cover - recover() stops before applying it
                pass

    def _save(self, name: str, state: SlotState) -> None:
        """Replace ``state.json`` atomically and durably."""
        folder = self.folder(name)
        with atomic_file(folder / STATE) as tmp:
            tmp.write_bytes(_STATE_JSON.dump_json(state, indent=2))


# --- durable file-system steps ----------------------------------------------------------------


@contextmanager
def _os_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise SlotUnavailable(f"cannot {doing}: {exc}") from exc


def _move_durable(source: Path, dest: Path) -> None:
    """Move ``source`` to ``dest`` (a rename, or a copy across file systems), durably."""
    if source.resolve() == dest.resolve():
        fsync_file(dest)
        fsync_dir(dest.parent)
        return
    try:
        source.replace(dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic_file(dest) as tmp:
            shutil.copyfile(source, tmp)
        source.unlink()
        return
    fsync_file(dest)
    fsync_dir(dest.parent)


def _clear(folder: Path, slot: Slot) -> None:
    """Empty ``folder/slot`` at once: rename it aside, recreate it, then delete the old one."""
    path = folder / slot
    if path.exists():
        trash = folder / f"{_TRASH}{slot}-{secrets.token_hex(6)}"
        path.replace(trash)
        fsync_dir(folder)
        shutil.rmtree(trash)
    mkdir_durable(path)


def _purge_leftovers(folder: Path) -> None:
    """Delete temporary state files and slots renamed aside by interrupted operations."""
    for entry in folder.iterdir():
        if entry.name.startswith(_STATE_TMP) and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)
        elif entry.name.startswith(_TRASH) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
