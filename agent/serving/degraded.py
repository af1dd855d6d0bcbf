"""Degraded mode's state on the device: the policy in force, a breaker per model, the answer cache.

One :class:`DegradedMode` per agent. It changes only when a policy is accepted (from
the local config, the saved state or the fleet's desired state) and when a breaker
moves; every move is handed to the listeners (metrics, the fleet link's events and
reported state). The device keeps enforcing the last accepted policy whether the
fleet is reachable or not.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from agent.errors import InvalidRequest
from agent.serving.answer_cache import SemanticCache
from agent.serving.breaker import Breaker, Transition
from models.policy import CacheTier, Chain, FailureKind, FallbackPolicy, PolicyRef
from models.wire import BreakerState, DegradedModel

__all__ = ["DegradedMode", "PolicyRejected", "parse_policy"]

log = logging.getLogger(__name__)

Listener = Callable[[Transition], None]


class PolicyRejected(InvalidRequest):
    """A policy that does not validate; the last good one stays in force."""


def parse_policy(raw: Mapping[str, Any]) -> FallbackPolicy | None:
    """The policy in a desired state's ``fallback`` (empty: none), or PolicyRejected saying why."""
    if not raw:
        return None
    try:
        return FallbackPolicy.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "policy"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise PolicyRejected(f"invalid fallback policy: {where}: {first['msg']}{more}") from None


class DegradedMode:
    """The policy, breakers and answer cache; thread-safe (breakers are used from threads)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._policy: FallbackPolicy | None = None
        self._breakers: dict[str, Breaker] = {}
        self.source = ""  # where the policy came from: "config", "desired state 12"
        self.cache = SemanticCache()
        self.listeners: list[Listener] = []
        self._background: set[asyncio.Future[None]] = set()

    @property
    def policy(self) -> FallbackPolicy | None:
        return self._policy

    def ref(self) -> PolicyRef | None:
        policy = self._policy
        return policy.ref() if policy is not None else None

    def set_policy(self, policy: FallbackPolicy | None, source: str) -> None:
        """Enforce ``policy`` from now on; breakers keep their state under the new settings."""
        with self._lock:
            self._policy, self.source = policy, source
            for name, breaker in self._breakers.items():
                if policy is not None:
                    breaker.reconfigure(policy.breaker_for(name))
            sizes = [
                t.max_entries
                for c in (policy.chains if policy else {}).values()
                for t in c.tiers
                if isinstance(t, CacheTier)
            ]
        self.cache.resize(max(sizes, default=1000))
        if policy is None:
            log.info("no fallback policy (%s): failures are answered with errors", source)
        else:
            log.info(
                "fallback policy %s v%d from %s: chains for %s",
                policy.name,
                policy.version,
                source,
                ", ".join(sorted(policy.chains)) or "no model",
            )

    def chain(self, model: str) -> Chain | None:
        policy = self._policy
        return policy.chains.get(model) if policy is not None else None

    def breaker(self, model: str) -> Breaker:
        """The breaker of ``model``, made with the policy's settings on first use."""
        with self._lock:
            breaker = self._breakers.get(model)
            if breaker is None:
                policy = self._policy or FallbackPolicy(name="none", version=1)
                breaker = Breaker(model, policy.breaker_for(model), clock=self._clock)
                self._breakers[model] = breaker
            return breaker

    def breakers(self) -> list[Breaker]:
        with self._lock:
            return [self._breakers[name] for name in sorted(self._breakers)]

    def note(self, transition: Transition | None) -> None:
        """Tell the listeners about a breaker's move (None: it did not move)."""
        if transition is None:
            return
        level = logging.INFO if transition.new is BreakerState.CLOSED else logging.WARNING
        log.log(
            level,
            "breaker of %s: %s -> %s: %s",
            transition.model,
            transition.old.value,
            transition.new.value,
            transition.reason,
        )
        for listener in list(self.listeners):
            try:
                listener(transition)
            except Exception:
                log.exception("a breaker listener failed")

    def thermal(self, verdict: tuple[FailureKind, str] | None) -> None:
        """Hold every model with a chain open while too hot (``verdict``); let go once cool.

        Called on a tick, it also announces breakers whose wait has ended (half-open).
        """
        policy = self._policy
        if policy is None:
            return
        for name in policy.chains:
            breaker = self.breaker(name)
            self.note(breaker.hold(*verdict) if verdict is not None else breaker.release_hold())
        for breaker in self.breakers():
            self.note(breaker.poll())  # announce half-open even when no request asks

    def in_background(self, work: Callable[[], None]) -> None:
        """Run blocking ``work`` (filling the answer cache) in a worker thread, unawaited."""
        task = asyncio.get_running_loop().run_in_executor(None, work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def degraded(self) -> list[DegradedModel]:
        """Models whose breaker is not closed, and why: for /readyz and the reported state."""
        out = []
        for breaker in self.breakers():
            view = breaker.view()
            if view.state is BreakerState.CLOSED or view.kind is None:
                continue
            out.append(
                DegradedModel(
                    name=breaker.model,
                    breaker=view.state,
                    kind=view.kind,
                    reason=view.reason[:2000],
                    since=view.since,
                )
            )
        return out
