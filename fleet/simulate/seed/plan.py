"""The plan: every device, its standing and events, and the three rollouts.

Pure: drawn from the config alone (its ``seed`` and ``now``), so the same config always
plans the same fleet; the row modules turn it into rows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from fleet.simulate.hardware import HARDWARE
from fleet.simulate.seed.artifacts import _artifacts
from fleet.simulate.seed.config import (
    _AGENT_VERSIONS,
    _BREAKER_REASONS,
    _EXTRA_TAGS,
    _GOLDEN_FAILURE,
    _HARDWARE_MIX,
    _KINDS,
    _LINKS,
    _ROLES,
    _SITES,
    DAY,
    ENGINE,
    GEMMA,
    HEALTH_CHECK_FAILED,
    HOUR,
    MINILM,
    MINUTE,
    TIMED_OUT,
    SeedConfig,
    _hex,
    _seconds,
    _uniform,
)
from fleet.simulate.seed.records import _Device, _Issued, _Member, _Rollout
from fleet.simulate.seed.rules import device_rank, rollout_spec, stage_quotas
from fleet.simulate.telemetry import MB
from models.policy import FailureKind
from models.wire import (
    DESIRED_LIFETIME,
    BreakerState,
    DegradedModel,
    DesiredModel,
    DesiredState,
    EventKind,
    ModelState,
    ReportedModel,
    ReportedState,
    Severity,
)


class _Fleet:
    """The seeded fleet in memory, except its telemetry (generated while it is written)."""

    def __init__(self, config: SeedConfig) -> None:
        self.config = config
        self.now = config.moment()
        self.start = self.now - timedelta(days=config.days)
        self.rng = random.Random(f"{config.seed}:fleet")  # noqa: S311 (simulated values)
        self.artifacts = _artifacts(config.seed, self.now)
        self.by_key = {(a.name, a.version, a.variant): a for a in self.artifacts}
        self.groups = self._groups()
        self.tokens = {name: f"tok-{_hex(self.rng, 12)}" for name, *_ in self.groups}
        devices = [self._device(i) for i in range(config.devices)]
        self.devices = sorted(devices, key=lambda d: (d.enrolled_at, d.id))
        self.rollouts: dict[str, _Rollout] = {}
        self.yanked: dict[tuple[str, str], tuple[datetime, str]] = {}
        self._completed()
        self._aborted()
        self._active()
        for device in self.devices:
            self._life_events(device)

    # -- groups and devices ---------------------------------------------------------

    def _groups(self) -> list[tuple[str, str, int, float]]:
        """(name, zone, UTC offset, weight): about one group per 250 devices."""
        count = max(2, min(len(_SITES) * len(_ROLES), self.config.devices // 250))
        picked = []
        for i in range(count):
            site, zone, offset = _SITES[i % len(_SITES)]
            role = _ROLES[(i // len(_SITES)) % len(_ROLES)]
            weight = 1.0 / (1 + i) ** 0.6  # a few big sites, a long tail of small ones
            picked.append((f"{role}-{site}", zone, offset, weight))
        return picked

    def _device(self, index: int) -> _Device:
        seed = self.config.seed
        rng = random.Random(f"{seed}:{index}:device")  # noqa: S311 (simulated values)
        group, zone, offset, _ = rng.choices(self.groups, weights=[g[3] for g in self.groups])[0]
        kind = rng.choice(_KINDS)
        tags = {kind, rng.choice(_LINKS)} | {t for t, share in _EXTRA_TAGS if rng.random() < share}
        hardware = HARDWARE[rng.choices(list(_HARDWARE_MIX), list(_HARDWARE_MIX.values()))[0]]
        agent = rng.choices(list(_AGENT_VERSIONS), list(_AGENT_VERSIONS.values()))[0]
        now = self.now
        if rng.random() < 0.12:  # new this week
            enrolled = now - _seconds(rng, 3600, min(7.0, self.config.days) * 86400)
        else:
            enrolled = now - timedelta(days=8 + _uniform(rng, 0, 300))
        enrolled = enrolled.replace(microsecond=0)
        standing, last_seen, revoked = self._standing(rng, enrolled)
        gap = None
        if standing in ("online", "offline") and last_seen is not None and rng.random() < 0.1:
            begin = max(enrolled, self.start) + HOUR
            if last_seen - begin > 14 * HOUR:
                g0 = begin + (last_seen - begin - 13 * HOUR) * rng.random()
                gap = (g0, g0 + _seconds(rng, 3600, 12 * 3600))
        degraded = None
        if standing == "online" and rng.random() < 0.03:
            degraded = now - _seconds(rng, 120, 3 * 3600)
        return _Device(
            index=index,
            id=f"dev-{rng.getrandbits(64):016x}",
            name=f"{group.split('-', 1)[1]}-{kind}-{index:05d}",
            group=group,
            zone=zone,
            utc_offset_h=offset,
            tags=sorted(tags),
            hardware=hardware,
            profile=hardware.profile(index, seed=seed),
            agent_version=agent,
            enrolled_at=enrolled,
            standing=standing,
            last_seen=last_seen,
            revoked_at=revoked,
            gap=gap,
            degraded_since=degraded,
            base_version=1 + rng.randrange(3),
            dropped=rng.randrange(1, 400) if gap is not None and rng.random() < 0.5 else 0,
        )

    def _standing(
        self, rng: random.Random, enrolled: datetime
    ) -> tuple[str, datetime | None, datetime | None]:
        now, u = self.now, rng.random()
        if u < 0.01:
            return "never", None, None
        if u < 0.015:
            revoked = enrolled + (now - HOUR - enrolled) * _uniform(rng, 0.5, 1.0)
            return "revoked", revoked - _seconds(rng, 60, 3600), revoked
        if u < 0.115:
            if rng.random() < 0.6 or enrolled > now - 8 * DAY:
                seen = enrolled + (now - 10 * MINUTE - enrolled) * _uniform(rng, 0.3, 1.0)
            else:
                seen = max(now - timedelta(days=_uniform(rng, 7.5, 30)), enrolled + HOUR)
            return "offline", seen, None
        return "online", now - _seconds(rng, 0, 45), None

    # -- rollouts -------------------------------------------------------------------

    def _entry(self, device: _Device, model: str, version: str) -> DesiredModel:
        return self.by_key[(model, version, device.variant(model))].desired()

    def _update_events(
        self, device: _Device, at: datetime, model: str, version: str, outcome: str
    ) -> datetime:
        """The agent's events for one update (``healthy``, ``rolled_back``, ``downloading``)."""
        artifact = self.by_key[(model, version, device.variant(model))]
        data = {
            "model": model, "version": version, "target": artifact.path, "sha256": artifact.sha256,
        }  # fmt: skip
        rng = random.Random(f"{device.id}:{at.isoformat()}:{model}")  # noqa: S311
        t = at + _seconds(rng, 2, 20)
        for percent in (50, 100):
            t += _seconds(rng, 10, 90)
            done = artifact.size_bytes * percent // 100
            device.event(
                t,
                EventKind.UPDATE_PROGRESS,
                f"{model} {version}: {percent}% downloaded",
                {**data, "bytes": done, "total": artifact.size_bytes},
            )
            if outcome == "downloading":
                return t
        t += _seconds(rng, 1, 5)
        device.event(
            t, EventKind.UPDATE_VERIFIED, f"{model} {version}: downloaded and verified", data
        )
        t += _seconds(rng, 2, 10)
        device.event(
            t, EventKind.UPDATE_INSTALLED, f"{model} {version}: installed, activated", data
        )
        t += _seconds(rng, 10, 60)
        if outcome == "healthy":
            device.event(t, EventKind.UPDATE_HEALTHY, f"{model} {version}: healthy, serving", data)
            device.event(t, EventKind.MODEL_READY, f"{model} {version} ready", {"model": model})
        else:
            device.event(
                t,
                EventKind.UPDATE_ROLLED_BACK,
                f"{model} {version}: health check failed, rolled back: {_GOLDEN_FAILURE}",
                {**data, "reason": _GOLDEN_FAILURE},
                Severity.ERROR,
            )
        return t

    def _rollout(self, created: datetime, created_by: str, spec: dict[str, Any]) -> _Rollout:
        return _Rollout(f"ro-{_hex(self.rng, 10)}", spec, created, created_by)

    def _enlist(self, rollout: _Rollout, devices: Sequence[_Device]) -> list[_Member]:
        """Every targeted device as a member, in release order; the eligible ones."""
        rollout.members = sorted(
            (_Member(d, device_rank(rollout.id, d.id)) for d in devices), key=lambda m: m.rank
        )
        eligible = []
        for member in rollout.members:
            device = member.device
            if rollout.model == GEMMA and device.low_ram:
                member.state = "ineligible"
                member.detail = (
                    "no variant fits this device: Q8_0: runs only on a GPU, the device has "
                    "none; Q4_K_M: needs 2.2 GiB of RAM with headroom, the device has "
                    f"{device.hardware.ram_bytes / 2**30:.1f} GiB"
                )
                continue
            member.variant = device.variant(rollout.model)
            member.placement = "gpu" if member.variant == "Q8_0" else "cpu"
            member.detail = (
                f"{member.variant}: the best variant that fits, on the {member.placement.upper()}"
            )
            member.target = self._entry(device, rollout.model, rollout.version).model_dump(
                mode="json"
            )
            eligible.append(member)
        return eligible

    def _open(self, rollout: _Rollout, eligible: int) -> None:
        """The rollout is created: its audit entry, every member pending since then."""
        for member in rollout.members:
            member.since = max(rollout.created_at, member.device.enrolled_at)
        ineligible = len(rollout.members) - eligible
        rollout.record(
            rollout.created_at,
            "created",
            f"{rollout.model} {rollout.version} to {eligible} device(s) ({ineligible} ineligible)",
            actor=rollout.created_by,
            spec=rollout.spec,
        )

    def _issue(self, rollout: _Rollout, member: _Member, stage: int, at: datetime) -> None:
        """The engine gives the member the change: a new desired state, state ``updating``."""
        device = member.device
        served = device.served_gemma if rollout.model == GEMMA else device.served_minilm
        member.stage, member.issued_at = stage, at
        member.previous = self._entry(device, rollout.model, served).model_dump(mode="json")
        changed = {"gemma" if rollout.model == GEMMA else "minilm": rollout.version}
        member.desired_version = device.issue(at, **changed)
        member.state, member.since = "updating", at
        member.detail = f"its desired state names {rollout.model} {rollout.version}"

    def _finish(
        self, rollout: _Rollout, member: _Member, timeout_s: float, *, fail: bool = False
    ) -> datetime:
        """An issued member reaches its final state; when it did."""
        device = member.device
        assert member.issued_at is not None
        issued = member.issued_at
        if not device.reachable(issued):
            ended = issued + timedelta(seconds=timeout_s)
            member.state, member.failure, member.since = TIMED_OUT, TIMED_OUT, ended
            member.detail = f"no healthy report of the new version within {timeout_s:g} s"
            rollout.record(
                ended, "device_failed", member.detail, device=device.id, failure=TIMED_OUT
            )
            return ended
        outcome = "rolled_back" if fail else "healthy"
        ended = self._update_events(device, issued, rollout.model, rollout.version, outcome)
        device.acted_on, device.changed_at = len(device.issued) - 1, ended
        member.since = ended
        if fail:
            member.state, member.failure = "failed", HEALTH_CHECK_FAILED
            member.detail = f"update_rolled_back: {_GOLDEN_FAILURE}"
            rollout.record(
                ended, "device_failed", member.detail, device=device.id, failure=HEALTH_CHECK_FAILED
            )
            return ended
        member.state = "updated"
        member.detail = "serves the new version and passed its health check"
        if rollout.model == GEMMA:
            device.served_gemma = rollout.version
        else:
            device.served_minilm = rollout.version
        return ended

    def _downloading(self, rollout: _Rollout, member: _Member) -> None:
        """An issued member still updating now: online ones are downloading."""
        device = member.device
        assert member.issued_at is not None
        if device.reachable(member.issued_at):
            self._update_events(
                device, member.issued_at, rollout.model, rollout.version, "downloading"
            )
            device.acted_on = len(device.issued) - 1

    def _gate_checks(
        self, rollout: _Rollout, stage: int, first: datetime, checks: int, devices: int
    ) -> None:
        """Passing gate checks every ``check_interval_s``, with evidence as ``check_gate`` gives."""
        rng = random.Random(f"{rollout.id}:{stage}:checks")  # noqa: S311
        every = timedelta(seconds=rollout.spec["check_interval_s"])
        typical = {"p95_latency_ms": 1800.0, "error_rate": 0.0021, "golden_failure_rate": 0.004}
        for k in range(checks):
            for index, gate in enumerate(rollout.spec["gates"]):
                metric = gate["metric"]
                ref = typical.get(metric, 1.0) * _uniform(rng, 0.9, 1.1)
                value = ref * _uniform(rng, 0.93, 1.06)
                samples = devices * (k + 1) * 2
                evidence: dict[str, Any] = {
                    "metric": metric,
                    "window_s": gate["window_s"],
                    "min_samples": gate["min_samples"],
                    "updated": {"value": value, "samples": samples, "devices": devices},
                    "baseline": {"value": ref, "samples": samples},
                    "control": {
                        "value": ref * 1.01,
                        "samples": 9 * samples,
                        "devices": 9 * devices,
                    },
                    "thresholds": {
                        key: gate[key]
                        for key in (
                            "max_increase_percent",
                            "max_decrease_percent",
                            "max_value",
                            "min_value",
                        )
                    },
                }
                verdict, decision, reasons = "pass", "pass", []
                if k == 0 and metric == "golden_failure_rate":  # no health checks yet
                    evidence["updated"] = {"value": None, "samples": 0, "devices": devices}
                    reasons = [f"0 sample(s) of the updated devices, {gate['min_samples']} needed"]
                    verdict, decision = "insufficient", "wait"
                else:
                    changes = {}
                    if gate["max_increase_percent"] is not None:
                        for name, reference in (("baseline", ref), ("control", ref * 1.01)):
                            changes[name] = round((value - reference) * 100 / reference, 3)
                    evidence["change_percent"] = changes
                evidence["verdict"] = verdict
                rollout.checks.append(
                    {
                        "rollout_id": rollout.id, "stage": stage, "gate": index,
                        "at": first + every * k, "verdict": verdict, "decision": decision,
                        "reasons": reasons, "evidence": evidence,
                    }
                )  # fmt: skip

    def _completed(self) -> None:
        """gemma3-270m 1.1 to every group six days ago: canary, 25%, 100%; completed."""
        created = self.now - 6 * DAY
        spec = rollout_spec(
            "gemma 1.1 everywhere", GEMMA, "1.1",
            target={"groups": [g[0] for g in self.groups]},
            canary={"count": 10}, percents=[25, 100],
            gates=[
                {"metric": "error_rate", "window_s": 900, "max_value": 0.02},
                {"metric": "p95_latency_ms", "window_s": 900, "max_increase_percent": 25},
            ],
            abort_rules=[{"failure": "any", "threshold_percent": 30, "min_devices": 10}],
            soak_s=1800, check_interval_s=300, device_timeout_s=3600,
        )  # fmt: skip
        rollout = self._rollout(created, "alice", spec)
        self.rollouts["completed"] = rollout
        for device in self.devices:  # what every device ran before: what it was set up with
            # renewed every 20 days or so (fleet.desired's RENEW_BEFORE), never expired
            renewed = self.now - timedelta(days=2 + int(device.id[-4:], 16) % 17)
            device.issued.append(_Issued(max(device.enrolled_at + MINUTE, renewed), "1.0", "1.0"))
        targeted = [
            d
            for d in self.devices
            if d.enrolled_at < created and (d.revoked_at is None or d.revoked_at > created)
        ]
        eligible = self._enlist(rollout, targeted)
        self._open(rollout, len(eligible))
        quotas = stage_quotas(10, [25, 100], len(eligible))
        t, released = created + MINUTE, 0
        for stage, quota in enumerate(quotas):
            if stage:
                rollout.record(
                    t, "stage_started", f"stage {stage - 1} passed its gates; stage {stage} starts",
                    stage=stage,
                )  # fmt: skip
            ends = t
            for member in eligible[released:quota]:
                self._issue(
                    rollout, member, stage, t + timedelta(seconds=int(member.rank[:4], 16) % 600)
                )
                ends = max(ends, self._finish(rollout, member, 3600))
            released = quota
            rollout.record(
                ends, "stage_installed",
                f"stage {stage}: every released device finished; soaking 1800 s", stage=stage,
            )  # fmt: skip
            self._gate_checks(rollout, stage, ends, 7, quota)
            t = ends + 30 * MINUTE
        rollout.stage, rollout.phase, rollout.stage_started_at = (
            len(quotas) - 1,
            "soaking",
            t - HOUR,
        )
        rollout.soak_started_at, rollout.next_check_at = t - 30 * MINUTE, t + 5 * MINUTE
        rollout.status, rollout.finished_at, rollout.updated_at = "completed", t, t
        rollout.record(t, "completed", "every stage passed; the last was 100%")
        # Devices enrolled since got what the rollout left behind, 1.1, from their group's state.
        for device in self.devices:
            if device.enrolled_at >= created and not device.low_ram:
                device.issued = [_Issued(device.enrolled_at + MINUTE, "1.1", "1.0")]
                device.served_gemma = "1.1"

    def _aborted(self) -> None:
        """minilm-l6 2.0 to the pilot devices three days ago: aborted by failed health checks."""
        created = self.now - 3 * DAY
        spec = rollout_spec(
            "minilm 2.0 pilot", MINILM, "2.0",
            target={"tags": ["pilot"]}, canary={"percent": 10}, percents=[100],
            gates=[{"metric": "golden_failure_rate", "window_s": 1800, "max_value": 0.01}],
            abort_rules=[{"failure": HEALTH_CHECK_FAILED, "threshold_count": 3}],
            soak_s=3600, check_interval_s=300,
        )  # fmt: skip
        rollout = self._rollout(created, "bob", spec)
        self.rollouts["aborted"] = rollout
        targeted = [
            d
            for d in self.devices
            if "pilot" in d.tags
            and d.enrolled_at < created
            and (d.revoked_at is None or d.revoked_at > created)
        ]
        eligible = self._enlist(rollout, targeted)
        self._open(rollout, len(eligible))
        canary = eligible[: stage_quotas(None, [10, 100], len(eligible))[0]] if eligible else []
        failures = finished = 0
        ended = created + MINUTE
        for member in canary:
            self._issue(rollout, member, 0, created + MINUTE)
            if not member.device.reachable(created + MINUTE):
                continue  # still updating when the rollout was aborted, long before its timeout
            fail = failures < 3
            ended = max(ended, self._finish(rollout, member, 3600, fail=fail))
            failures += int(fail)
            finished += 1
        aborted = ended + MINUTE
        if failures >= 3:
            reason = (
                f"abort rule: 3 device(s) {HEALTH_CHECK_FAILED}, threshold 3 ({finished} finished)"
            )
            actor = ENGINE
        else:  # too few reachable pilot devices for the rule: an admin stopped it
            reason, actor = "aborted by bob: embeddings drift on the pilot devices", "bob"
        restored = []
        for member in canary:
            device = member.device
            member.state, member.since = "rolled_back", aborted
            member.detail = f"rollout aborted: restored {MINILM} 1.0"
            member.desired_version = device.issue(aborted, minilm="1.0")
            if device.reachable(aborted):
                device.changed_at = self._update_events(device, aborted, MINILM, "1.0", "healthy")
                device.acted_on, device.served_minilm = len(device.issued) - 1, "1.0"
            restored.append(device.id)
        rollout.status, rollout.reason = "aborted", reason
        rollout.finished_at = rollout.updated_at = aborted
        rollout.record(
            aborted, "aborted",
            f"{reason}; {len(restored)} device(s) rolled back to their previous model",
            actor=actor, rolled_back=len(restored), devices=restored[:100],
        )  # fmt: skip
        self.yanked[(MINILM, "2.0")] = (aborted + HOUR, f"health checks failed in {rollout.id}")

    def _active(self) -> None:
        """gemma3-270m 1.2 to most groups: its second stage (10%) is rolling, 45 minutes in.

        The canary stage installed (an offline canary timed out after 90 minutes), soaked
        15 minutes through passing gate checks, and the engine advanced. The second stage
        issues a tenth of its devices at a time (``max_concurrent``: 50 of 10,000) in
        waves of 6 minutes: its eighth wave is downloading now (the cap is full), later
        devices are queued, and no issued device times out for 45 minutes, so the
        engine's next steps change nothing until then.
        """
        timeout_s, wave = 5400.0, 6 * MINUTE
        targets = [g[0] for g in self.groups[: max(1, round(len(self.groups) * 0.6))]]
        spec = rollout_spec(
            "gemma 1.2", GEMMA, "1.2",
            target={"groups": targets}, canary={"count": 20}, percents=[10, 50, 100],
            gates=[
                {"metric": "p95_latency_ms", "window_s": 1800, "max_increase_percent": 20},
                {"metric": "error_rate", "window_s": 1800, "max_value": 0.02},
                {"metric": "golden_failure_rate", "window_s": 1800, "max_value": 0.05},
            ],
            abort_rules=[{"failure": "any", "threshold_percent": 25, "min_devices": 20}],
            soak_s=900, check_interval_s=300, max_concurrent=50, device_timeout_s=timeout_s,
        )  # fmt: skip
        rollout = self._rollout(self.now - 150 * MINUTE, "alice", spec)
        self.rollouts["active"] = rollout
        chosen = set(targets)
        eligible = self._enlist(
            rollout, [d for d in self.devices if d.group in chosen and d.revoked_at is None]
        )
        quotas = stage_quotas(20, [10, 50, 100], len(eligible))
        canary, stage1 = eligible[: quotas[0]], eligible[quotas[0] : quotas[1]]
        cap = max(2, min(50, len(stage1) // 10))
        spec["max_concurrent"] = cap
        # The canary lasts until its last device finished: an offline one's timeout.
        stage1_at = self.now - 45 * MINUTE
        created = stage1_at - 22 * MINUTE
        if any(not m.device.reachable(max(created, m.device.enrolled_at) + MINUTE) for m in canary):
            created -= timedelta(seconds=timeout_s)
        rollout.created_at = rollout.stage_started_at = created
        rollout.updated_at = self.now - timedelta(seconds=2)
        self._open(rollout, len(eligible))
        ends = created + MINUTE
        for member in canary:
            self._issue(rollout, member, 0, max(created, member.device.enrolled_at) + MINUTE)
            ends = max(ends, self._finish(rollout, member, timeout_s))
        if not eligible:
            return
        rollout.record(
            ends, "stage_installed",
            "stage 0 (canary): every released device finished; soaking 900 s", stage=0,
        )  # fmt: skip
        self._gate_checks(rollout, 0, ends, 4, len(canary))
        stage1_at = max(stage1_at, ends + 15 * MINUTE)
        rollout.stage, rollout.stage_started_at = 1, stage1_at
        rollout.record(
            stage1_at, "stage_started", "stage 0 (canary) passed its gates; stage 1 (10%) starts",
            stage=1,
        )  # fmt: skip
        current = int((self.now - stage1_at) / wave)  # the wave issued last, still downloading
        online = health_failures = 0
        for member in stage1:
            device = member.device
            number = online // cap  # offline devices take no slot: they go with the next wave
            if device.reachable(self.now - 3 * MINUTE):
                online += 1
            if number > current:
                member.stage, member.state, member.since = 1, "queued", stage1_at
                member.detail = "released in stage 1"
                continue
            issued = min(stage1_at + wave * number, self.now - 3 * MINUTE)
            self._issue(rollout, member, 1, issued)
            if number == current or not device.reachable(issued):
                self._downloading(rollout, member)  # offline ones have 45 minutes left
                continue
            fail = health_failures < 2 and online % 97 == 13
            health_failures += int(fail)
            self._finish(rollout, member, timeout_s, fail=fail)

    # -- what else happened on each device --------------------------------------------

    def _life_events(self, device: _Device) -> None:
        rng = random.Random(f"{self.config.seed}:{device.index}:events")  # noqa: S311
        if device.last_seen is None:
            return
        hello = {"agent_version": device.agent_version}
        first = device.enrolled_at + MINUTE
        device.event(first, EventKind.ONLINE, "connected", hello)
        if device.gap is not None:
            device.event(
                device.gap[0], EventKind.OFFLINE, "connection lost", severity=Severity.WARNING
            )
            device.event(device.gap[1], EventKind.ONLINE, "connected", hello)
        begin = max(first, self.start)
        span = (device.last_seen - begin).total_seconds()
        for _ in range(rng.choice((0, 0, 1, 1, 2))):  # agent restarts
            if span > 600:
                device.event(
                    begin + _seconds(rng, 0, span), EventKind.ONLINE, "agent started", hello
                )
        if device.standing in ("offline", "revoked"):
            device.event(
                device.last_seen, EventKind.OFFLINE, "disconnected", severity=Severity.WARNING
            )
        episodes = rng.choice((1, 1, 2, 3)) if rng.random() < 0.08 else 0
        for _ in range(episodes if span > 3600 else 0):
            self._breaker(device, rng, begin + _seconds(rng, 0, span - 1800), close=True)
        if device.degraded_since is not None:
            self._breaker(device, rng, device.degraded_since, close=False)
        if rng.random() < 0.005 and span > 600:
            device.event(
                begin + _seconds(rng, 0, span),
                EventKind.MODEL_FAILED,
                f"{GEMMA}: out of memory while loading",
                {"model": GEMMA, "reason": "out of memory", "kind": "out_of_memory"},
                Severity.ERROR,
            )

    def _breaker(self, device: _Device, rng: random.Random, at: datetime, *, close: bool) -> None:
        kind = _breaker_kind(device, rng)
        opened = {"model": GEMMA, "from": "closed", "to": "open", "kind": kind}
        device.event(at, EventKind.BREAKER_OPENED, _BREAKER_REASONS[kind], opened, Severity.WARNING)
        if close:
            half = at + _seconds(rng, 30, 300)
            probing = {"model": GEMMA, "from": "open", "to": "half_open"}
            device.event(half, EventKind.BREAKER_HALF_OPEN, "probing", probing)
            closed = {"model": GEMMA, "from": "half_open", "to": "closed"}
            device.event(
                half + _seconds(rng, 5, 60), EventKind.BREAKER_CLOSED, "probes passed", closed
            )

    # -- rows -------------------------------------------------------------------------

    def desired_state(self, device: _Device) -> dict[str, Any]:
        last = device.issued[-1]
        state = DesiredState(
            device_id=device.id,
            version=device.desired_version(),
            issued_at=last.at,
            expires=last.at + DESIRED_LIFETIME,
            models=[
                self._entry(device, GEMMA, last.gemma),
                self._entry(device, MINILM, last.minilm),
            ],
        )
        return state.model_dump(mode="json")

    def reported_state(self, device: _Device) -> dict[str, Any] | None:
        if device.last_seen is None:
            return None
        rng = random.Random(f"{self.config.seed}:{device.index}:reported")  # noqa: S311
        gpu = device.hardware.has_gpu
        served = (
            (GEMMA, device.served_gemma, "llama.cpp", "cuda:0" if gpu else "cpu",
             device.profile.model_memory_bytes),
            (MINILM, device.served_minilm, "onnxruntime", "cpu", 90 * MB),
        )  # fmt: skip
        models = [
            ReportedModel(
                name=name,
                version=version,
                sha256=self.by_key[(name, version, device.variant(name))].sha256,
                state=ModelState.READY,
                runtime=runtime,
                device=where,
                memory_bytes=memory,
            )
            for name, version, runtime, where, memory in served
        ]
        degraded = []
        if device.degraded_since is not None:
            kind = _breaker_kind(device, random.Random(f"{device.id}:degraded"))  # noqa: S311
            degraded.append(
                DegradedModel(
                    name=GEMMA,
                    breaker=BreakerState.OPEN,
                    kind=FailureKind(kind),
                    reason=_BREAKER_REASONS[kind],
                    since=device.degraded_since,
                )
            )
        acted = device.issued[device.acted_on]
        missed = device.last_seen < acted.at  # gone before that state was issued
        converged = (acted.gemma, acted.minilm) == (device.served_gemma, device.served_minilm)
        earliest = max(device.enrolled_at + MINUTE, device.changed_at or device.enrolled_at)
        reported_at = max(earliest, device.last_seen - _seconds(rng, 0, 6 * 3600))
        reported_at = min(reported_at, device.last_seen)
        report = device.hardware.report(device.name, device.agent_version).model_copy(
            update={"timezone": device.zone, "probed_at": reported_at - MINUTE}
        )
        state = ReportedState(
            device_id=device.id,
            desired_version=max(1, device.base_version + device.acted_on - int(missed)),
            converged=converged,
            models=models,
            agent_version=device.agent_version,
            device=report,
            degraded=degraded,
            reported_at=reported_at,
        )
        return state.model_dump(mode="json", exclude_none=True)


def _breaker_kind(device: _Device, rng: random.Random) -> str:
    kinds = ["slow", "error", "overloaded"]
    if device.hardware.has_gpu:
        kinds += ["thermal", "gpu_fault"]
    if device.hardware.ram_bytes < 5 * 10**9:
        kinds.append("out_of_memory")
    return rng.choice(kinds)
