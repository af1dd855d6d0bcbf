"""One model update, end to end: verify, download, install, activate, health-check, roll back.

The desired state (already verified: :mod:`models.director`) names a target by path,
length and hash. :meth:`Updater.ensure` makes the model's active slot hold exactly it:

1. refresh TUF metadata and check the target is listed with the same length and hash;
2. download it into the spare slot, resuming a ``.part`` left by a cut or a restart,
   hashing while writing and stopping at the signed length (:mod:`agent.update.download`);
   a newer desired state pre-empts this step (:mod:`agent.update.preempt`): the download
   stops, its ``.part`` stays for a resume, and one ``update_failed`` says ``superseded``
   (severity info);
3. install it (hashed again as it enters the slot) and activate it: one atomic switch;
4. load it beside the model still being served and ask its golden prompts
   (:mod:`agent.update.health`); only a healthy model is handed back to be published,
   otherwise the previous slot is made active again and the outcome says why.

Nothing here stops the old model serving: the caller publishes the new one only after
step 4 passes. A crash anywhere leaves slots that :meth:`ModelStore.recover` settles
at start-up (an activated but unconfirmed update is rolled back), and the next
:meth:`ensure` resumes or restarts. So that a model that kills the agent while loading
cannot crash it forever, each desired state gets :attr:`UpdateConfig.max_activations`
activations of a target (counted durably in ``update.json`` beside the slots).

Each update ends in exactly one event, which the controller's rollouts count:
``update_healthy``, ``update_failed`` (with the ``phase`` it failed in) or
``update_rolled_back`` (phase ``health``; also sent once, from the durable count, for a
target that kept killing the agent). Every update event's data names the model, the
version being installed, the target path and its sha256 (:func:`target_data`), so the
controller can match it to what it asked for; nobody else reports the same update again
(:mod:`agent.link.outcomes`).

:func:`next_step` (pure) decides between up to date, give up and update. Whether a
failure is tried again is read from the error's branch (:func:`agent.errors.retryable`),
the same way for every step: a transient one (network, disk I/O) is retried with backoff
by the link; a rejected one (tampered or unusable metadata, a bad artifact, a corrupt slot
state) is reported once and not tried again for that desired state; a new desired state
tries again, and so does a restart.

A model that is already active with the target's sha256 (baked into a firmware image, or
installed by hand) is not downloaded again, but its file is hashed once against the
target before it counts as current (``verified`` beside the slots records it); a file
that does not match is replaced by the target, downloaded and checked as any update.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
from pydantic import ValidationError

from agent.errors import AgentError, Rejected, retryable
from agent.files import atomic_write
from agent.runtime.base import ServedModel
from agent.store import ModelStore
from agent.store.slots import SlotError, SlotState, SlotUnavailable
from agent.update.download import DownloadConfig, DownloadError, download, part_path
from agent.update.health import health_spec, judge, run_checks
from agent.update.preempt import Preempted, Preemption, preemptible
from agent.update.tuf_client import TufError
from models.director import TrustError, check_targets
from models.manifest import ModelFormat, ModelManifest, RuntimeParams
from models.wire import DesiredModel, EventKind, Severity, TargetRef

__all__ = [
    "Emit",
    "GiveUp",
    "TargetRejected",
    "UpToDate",
    "Update",
    "UpdateAttempts",
    "UpdateConfig",
    "UpdateOutcome",
    "UpdateSource",
    "Updater",
    "memory_problem",
    "next_step",
    "target_data",
]

log = logging.getLogger(__name__)

ATTEMPTS = "update.json"
VERIFIED = "verified"  # the sha256 of the active file, hashed once against its target


class TargetRejected(Rejected):
    """A verified target this device cannot install: unusable metadata, or too big for it."""


@dataclass(frozen=True)
class UpdateConfig:
    """How updates behave; the defaults suit a device on a slow, flaky link."""

    download: DownloadConfig = field(default_factory=DownloadConfig)
    max_activations: int = 3  # activations of one target per desired state before giving up
    progress_every_s: float = 2.0  # seconds between UPDATE_PROGRESS events


class UpdateSource(Protocol):
    """Where verified target metadata and artifacts come from (the fleet controller)."""

    def verified_targets(self, paths: list[str]) -> Mapping[str, Any]:
        """Refresh TUF metadata, then each path's verified ``TargetFile`` (None: unlisted).

        Blocking (a worker thread calls it). Raises ``TufRejected`` or ``TufUnavailable``.
        """
        ...

    def artifact_url(self, sha256: str) -> str: ...

    @property
    def http(self) -> httpx.AsyncClient: ...


class Emit(Protocol):
    """Reports an event to the fleet (the link spools it)."""

    def __call__(
        self,
        kind: EventKind,
        message: str = "",
        *,
        severity: Severity = Severity.INFO,
        data: dict[str, Any] | None = None,
    ) -> None: ...


Loader = Callable[[ModelManifest, Path], ServedModel]

Result = Literal["current", "updated", "rolled_back", "failed", "given_up", "superseded"]


@dataclass
class UpdateOutcome:
    """What :meth:`Updater.ensure` did; ``model`` is the healthy new model to publish."""

    name: str
    result: Result
    version: str | None = None
    error: str | None = None
    retry: bool = False  # a transient failure: try again later
    model: ServedModel | None = None


# --- the pure decision --------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateAttempts:
    """Activations of one target under one desired state, and a final verdict if any."""

    desired_version: int
    sha256: str
    activations: int = 0
    gave_up: str | None = None  # why the update will not be tried again for this state


@dataclass(frozen=True)
class UpToDate:
    """The active slot holds the target."""


@dataclass(frozen=True)
class GiveUp:
    """The update of this target failed for good under this desired state."""

    reason: str


@dataclass(frozen=True)
class Update:
    """Download (or resume), install, activate and check the target."""


def next_step(
    active_sha256: str | None,
    target: TargetRef,
    desired_version: int,
    attempts: UpdateAttempts | None,
    max_activations: int,
) -> UpToDate | GiveUp | Update:
    if active_sha256 == target.sha256:
        return UpToDate()
    if (
        attempts is None
        or attempts.desired_version != desired_version
        or attempts.sha256 != target.sha256
    ):
        return Update()
    if attempts.gave_up is not None:
        return GiveUp(attempts.gave_up)
    if attempts.activations >= max_activations:
        return GiveUp(
            f"the agent stopped {attempts.activations} times while checking this update "
            "(killed or crashed); not trying it again for this desired state"
        )
    return Update()


def memory_problem(custom: Mapping[str, Any], ram_total_bytes: int | None) -> str | None:
    """Why a target's signed RAM requirement rules this device out, or None (pure).

    Checked before downloading: a model that cannot fit must not cost the transfer. A
    target without ``ram_bytes`` (or a device that could not measure its RAM) passes.
    """
    needed = custom.get("ram_bytes")
    if not isinstance(needed, int) or isinstance(needed, bool) or ram_total_bytes is None:
        return None
    if needed > ram_total_bytes:
        return (
            f"the model needs {needed / 2**30:.1f} GiB of RAM; this device has "
            f"{ram_total_bytes / 2**30:.1f} GiB"
        )
    return None


def target_data(wanted: DesiredModel) -> dict[str, Any]:
    """What every event about updating ``wanted`` carries, so the fleet can match it (pure).

    The model, the version being installed (the desired state's until the signed
    metadata's is known), the target's path and its sha256.
    """
    target = wanted.target
    assert target is not None
    return {
        "model": wanted.name,
        "version": wanted.version or target.sha256[:12],
        "target": target.path,
        "sha256": target.sha256,
    }


# --- the shell ------------------------------------------------------------------------------


class _Progress:
    """Throttled UPDATE_PROGRESS events."""

    def __init__(self, emit: Emit, data: dict[str, Any], every_s: float) -> None:
        self._emit, self._data, self._every_s = emit, data, every_s
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self._every_s:
            return
        self._last = now
        percent = 100 * done // total if total else 100
        self._emit(
            EventKind.UPDATE_PROGRESS,
            f"{self._data['model']} {self._data['version']}: {percent}% downloaded",
            data={**self._data, "bytes": done, "total": total},
        )


class Updater:
    """Brings one model at a time to its desired target; see the module docstring."""

    def __init__(
        self,
        store: ModelStore,
        source: UpdateSource,
        emit: Emit,
        config: UpdateConfig | None = None,
        *,
        ram_total_bytes: int | None = None,
    ) -> None:
        self.store = store
        self.source = source
        self.emit = emit
        self.config = config or UpdateConfig()
        self.ram_total_bytes = ram_total_bytes
        # model name -> ((desired version, target sha256), why): refused, not tried again
        self._refused: dict[str, tuple[tuple[int, str], str]] = {}

    async def ensure(
        self,
        desired_version: int,
        wanted: DesiredModel,
        load: Loader,
        preemption: Preemption | None = None,
    ) -> UpdateOutcome:
        """Make ``wanted.target`` the active, healthy version of ``wanted.name``.

        A rejected failure is final for this desired state and target: later calls for
        them answer ``given_up`` without trying (or reporting) again. Once ``preemption``
        is requested (a newer desired state waits) the update stops before or during its
        download, keeping the ``.part``, and answers ``superseded``; from activation on
        it always runs to its end.
        """
        target = wanted.target
        assert target is not None
        key = (desired_version, target.sha256)
        refused = self._refused.get(wanted.name)
        if refused is not None and refused[0] == key:
            return UpdateOutcome(wanted.name, "given_up", error=refused[1])
        data = target_data(wanted)
        outcome = await self._ensure(desired_version, data, target, load, preemption)
        if outcome.result == "failed" and not outcome.retry:
            self._refused[wanted.name] = (key, outcome.error or "refused")
        return outcome

    async def _ensure(
        self,
        desired_version: int,
        data: dict[str, Any],
        target: TargetRef,
        load: Loader,
        preemption: Preemption | None,
    ) -> UpdateOutcome:
        name = data["model"]
        slots = self.store.slots
        try:
            state = await asyncio.to_thread(slots.state, name)
            attempts = await asyncio.to_thread(self._read_attempts, name)
        except SlotError as exc:
            return self._failed(data, "read the slots", exc)
        step = next_step(
            await asyncio.to_thread(self._active_sha, name, state),
            target,
            desired_version,
            attempts,
            self.config.max_activations,
        )
        if isinstance(step, UpToDate):
            if await asyncio.to_thread(self._verified, name, target.sha256):
                return UpdateOutcome(name, "current", data["version"])
            return await self._update(desired_version, data, target, load, preemption)
        if isinstance(step, GiveUp):
            if attempts is not None and attempts.gave_up is None:  # not said yet: say it once
                return await self._crashed(desired_version, data, target, step.reason)
            return UpdateOutcome(name, "given_up", data["version"], error=step.reason)
        return await self._update(desired_version, data, target, load, preemption)

    async def _update(
        self,
        desired_version: int,
        data: dict[str, Any],
        target: TargetRef,
        load: Loader,
        preemption: Preemption | None,
    ) -> UpdateOutcome:
        name = data["model"]
        try:
            verified = await asyncio.to_thread(self.source.verified_targets, [target.path])
            check_targets([target], verified)
        except (TrustError, TufError) as exc:
            return self._failed(data, "verify", exc)
        custom: dict[str, Any] = dict(getattr(verified[target.path], "custom", None) or {})
        version = str(custom.get("version") or data["version"])
        data = {**data, "version": version}  # the signed version from here on
        try:
            runtime = RuntimeParams.model_validate(custom.get("runtime") or {})
            fmt = ModelFormat(str(custom.get("format") or Path(target.path).suffix.lstrip(".")))
        except (ValidationError, ValueError) as exc:
            unusable = TargetRejected(f"the signed target's metadata is unusable: {exc}")
            return self._failed(data, "verify", unusable)
        too_big = memory_problem(custom, self.ram_total_bytes)
        if too_big is not None:
            return self._failed(data, "verify", TargetRejected(too_big))
        if preemption is not None and (preempted := preemption.requested) is not None:
            return self._superseded(data, preempted)  # before the slot is touched
        slots = self.store.slots
        try:
            slot = await asyncio.to_thread(slots.begin, name, version, target.sha256)
        except SlotError as exc:
            return self._failed(data, "begin", exc)
        dest = slot / f"{name}.{fmt.value}"
        try:
            fetched = await preemptible(
                download(
                    self.source.http,
                    self.source.artifact_url(target.sha256),
                    dest,
                    length=target.length,
                    sha256=target.sha256,
                    config=self.config.download,
                    progress=_Progress(self.emit, data, self.config.progress_every_s),
                ),
                preemption,
            )
        except DownloadError as exc:
            if not retryable(exc):
                await asyncio.to_thread(self._fail_slot, name, str(exc))
            return self._failed(data, "download", exc)
        if isinstance(fetched, Preempted):
            return self._superseded(data, fetched, part_path(dest))
        self.emit(
            EventKind.UPDATE_VERIFIED, f"{name} {version}: downloaded and verified", data=data
        )
        try:
            manifest = await asyncio.to_thread(self._install, name, dest, runtime)
            await asyncio.to_thread(self._count_activation, name, desired_version, target)
            path = await asyncio.to_thread(slots.activate, name)
        except SlotError as exc:
            return self._failed(data, "install", exc)
        self.emit(EventKind.UPDATE_INSTALLED, f"{name} {version}: installed, activated", data=data)
        model, problem = await self._check(load, manifest, path, custom)
        if problem is None:
            await asyncio.to_thread(slots.mark_healthy, name)
            await asyncio.to_thread(self._clear_attempts, name)
            self.emit(EventKind.UPDATE_HEALTHY, f"{name} {version}: healthy, serving", data=data)
            return UpdateOutcome(name, "updated", version, model=model)
        return await self._roll_back(name, desired_version, target, version, problem, data)

    async def _check(
        self, load: Loader, manifest: ModelManifest, path: Path, custom: Mapping[str, Any]
    ) -> tuple[ServedModel | None, str | None]:
        try:
            model = await asyncio.to_thread(load, manifest, path)
        except AgentError as exc:
            return None, f"health check failed: the model does not load: {exc.message}"
        except Exception as exc:  # a malformed file may fail in ways no runtime anticipated
            return None, f"health check failed: the model does not load: {exc!r}"
        spec = health_spec(custom)
        problem = judge(spec, await run_checks(model, spec))
        if problem is None:
            return model, None
        await asyncio.to_thread(model.close)
        return None, f"health check failed: {problem}"

    async def _roll_back(
        self,
        name: str,
        desired_version: int,
        target: TargetRef,
        version: str,
        reason: str,
        data: dict[str, Any],
    ) -> UpdateOutcome:
        log.error("update of %s to %s: %s; rolling back", name, version, reason)
        serving: Path | None = None
        try:
            serving = await asyncio.to_thread(
                self.store.slots.rollback, name, reason, allow_empty=True
            )
            await asyncio.to_thread(self._give_up, name, desired_version, target, reason)
        except SlotError as exc:
            reason = f"{reason}; and the rollback failed: {exc}"
        after = "the previous version serves" if serving is not None else "nothing else to serve"
        self.emit(
            EventKind.UPDATE_ROLLED_BACK,
            f"{name} {version}: {reason}; {after}",
            severity=Severity.ERROR,
            data={**data, "phase": "health", "reason": reason},
        )
        return UpdateOutcome(name, "rolled_back", version, error=reason)

    async def _crashed(
        self, desired_version: int, data: dict[str, Any], target: TargetRef, reason: str
    ) -> UpdateOutcome:
        """The agent died checking this target too often; start-up rolled it back. Say so once.

        Recorded as given up first, so a restart does not say it again.
        """
        name = data["model"]
        try:
            await asyncio.to_thread(self._give_up, name, desired_version, target, reason)
        except SlotError as exc:
            log.warning("cannot record that the update of %s was given up: %s", name, exc)
        log.error("update of %s to %s: %s", name, data["version"], reason)
        self.emit(
            EventKind.UPDATE_ROLLED_BACK,
            f"{name} {data['version']}: {reason}",
            severity=Severity.ERROR,
            data={**data, "phase": "health", "reason": reason},
        )
        return UpdateOutcome(name, "rolled_back", data["version"], error=reason)

    def _superseded(
        self, data: dict[str, Any], preempted: Preempted, part: Path | None = None
    ) -> UpdateOutcome:
        """A newer desired state took over: one calm event; a download keeps its ``.part``.

        Not a failure of the update, so nothing is remembered as refused: a later desire
        for the same target resumes from the ``.part``. ``part`` is None when the
        download had not begun (pre-empted while the metadata was being verified).
        """
        reason = f"superseded by desired version {preempted.by}"
        stopped: dict[str, Any] = {"phase": "verify"}
        if part is not None:
            try:
                stopped = {"phase": "download", "bytes": part.stat().st_size}
            except OSError:
                stopped = {"phase": "download", "bytes": 0}
        log.info("update of %s to %s: %s (%s)", data["model"], data["version"], reason, stopped)
        self.emit(
            EventKind.UPDATE_FAILED,
            f"{data['model']} {data['version']}: stopped ({stopped['phase']}), {reason}",
            data={
                **data,
                **stopped,
                "reason": reason,
                "superseded": True,
                "superseded_by": preempted.by,
                "rejected": False,
                "retry": False,
            },
        )
        return UpdateOutcome(data["model"], "superseded", data["version"], error=reason)

    def _failed(
        self, data: dict[str, Any], phase: str, exc: AgentError | TrustError
    ) -> UpdateOutcome:
        """Report a failure once; whether to try again is the error's branch."""
        name, reason, retry = data["model"], str(exc), retryable(exc)
        log.error("update of %s failed while trying to %s: %s", name, phase, reason)
        self.emit(
            EventKind.UPDATE_FAILED,
            f"{name}: update failed ({phase}): {reason}",
            severity=Severity.ERROR,
            data={
                **data,
                "phase": phase,
                "reason": reason,
                "rejected": not retry,
                "retry": retry,
            },
        )
        return UpdateOutcome(name, "failed", data["version"], error=reason, retry=retry)

    # blocking helpers (worker threads)

    def _active_sha(self, name: str, state: SlotState) -> str | None:
        if state.active is None:
            return None
        contents = self.store.slots.contents(name, state.active)
        return contents.manifest.sha256 if contents.intact and contents.manifest else None

    def _install(self, name: str, file: Path, runtime: RuntimeParams) -> ModelManifest:
        slots = self.store.slots
        extra: dict[str, Path] = {}
        tokenizer = runtime.tokenizer
        if tokenizer:  # an ONNX update keeps the tokenizer of the version it replaces
            state = slots.state(name)
            if state.active is not None:
                current = slots.slot_path(name, state.active) / tokenizer
                if current.is_file():
                    extra[tokenizer] = current
        return slots.install(name, file, runtime=runtime, extra_files=extra)

    def _fail_slot(self, name: str, reason: str) -> None:
        try:
            self.store.slots.fail(name, reason)
        except SlotError as exc:
            log.warning("cannot record the failed update of %s: %s", name, exc)

    def _verified(self, name: str, sha256: str) -> bool:
        """Whether the active file hashes to ``sha256`` (once per file: then recorded)."""
        marker = self.store.slots.folder(name) / VERIFIED
        try:
            if marker.read_text().strip() == sha256:
                return True
        except OSError:
            pass
        try:
            with self.store.slots.active_path(name).open("rb") as f:
                found = hashlib.file_digest(f, "sha256").hexdigest()
        except (OSError, SlotError) as exc:
            log.warning("cannot hash the active file of %s: %s", name, exc)
            return False
        if found != sha256:
            log.warning("the active %s does not hash to its target: replacing it", name)
            return False
        try:
            atomic_write(marker, f"{sha256}\n".encode())
        except OSError as exc:
            log.warning("cannot record that %s was verified: %s", name, exc)
        return True

    def _attempts_path(self, name: str) -> Path:
        return self.store.slots.folder(name) / ATTEMPTS

    def _read_attempts(self, name: str) -> UpdateAttempts | None:
        try:
            return UpdateAttempts(**json.loads(self._attempts_path(name).read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable %s of %s: %s", ATTEMPTS, name, exc)
            return None

    def _write_attempts(self, name: str, attempts: UpdateAttempts) -> None:
        try:
            atomic_write(self._attempts_path(name), json.dumps(asdict(attempts)).encode())
        except OSError as exc:
            raise SlotUnavailable(f"cannot record the attempts at updating {name}: {exc}") from exc

    def _count_activation(self, name: str, desired_version: int, target: TargetRef) -> None:
        now = self._read_attempts(name)
        if now is None or (now.desired_version, now.sha256) != (desired_version, target.sha256):
            now = UpdateAttempts(desired_version, target.sha256)
        self._write_attempts(
            name, UpdateAttempts(desired_version, target.sha256, now.activations + 1)
        )

    def _give_up(self, name: str, desired_version: int, target: TargetRef, reason: str) -> None:
        now = self._read_attempts(name)
        activations = now.activations if now is not None else 1
        self._write_attempts(
            name, UpdateAttempts(desired_version, target.sha256, activations, reason)
        )

    def _clear_attempts(self, name: str) -> None:
        self._attempts_path(name).unlink(missing_ok=True)
