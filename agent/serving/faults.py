"""Fault injection: make a real model fail, or slow down, on request (drills and tests).

Degraded mode has to be proven against the real runtime, so the faults go where the
runtime's own failures come from: the decode step. :class:`FaultyDecoder` wraps any
:class:`~agent.serving.scheduler.BatchDecoder` and, before each step, asks the app's
:class:`FaultInjector` whether its model has a :class:`Fault` set. A fault can

- sleep ``delay_s`` in the scheduler thread before the step (latency past a slow-call
  threshold: the real model really is slower, for every request in the batch);
- raise :class:`~agent.errors.ModelFailed` carrying ``failure`` (an error, out of memory,
  a GPU fault) instead of decoding, for a share ``error_rate`` of the steps, once
  ``after_steps`` steps have passed since it was set (a stream that fails midway).

The scheduler fails only the requests of a batch whose step raised, so one fault
behaves like the real thing. Nothing here is mounted or wrapped unless the operator
turns ``fault_injection`` on; a fault stays until it is cleared or replaced.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from agent.errors import ModelFailed
from agent.runtime.base import RuntimeInfo, SamplingParams, TokenLogprob
from agent.runtime.llama_cpp import BatchEntry
from agent.serving.scheduler import BatchDecoder
from models.manifest import ModelManifest
from models.policy import FailureKind

__all__ = ["MAX_DELAY_S", "Fault", "FaultInjector", "FaultyDecoder"]

log = logging.getLogger(__name__)

MAX_DELAY_S = 30.0  # the longest delay one decode step may be given


class Fault(BaseModel):
    """What to do to one model's decode steps; also the body of ``PUT /v1/faults/{model}``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)  # share of steps that raise
    failure: FailureKind = FailureKind.ERROR  # the kind the raised ModelFailed carries
    after_steps: int = Field(default=0, ge=0)  # steps that pass unharmed before any raise
    delay_s: float = Field(default=0.0, ge=0.0, le=MAX_DELAY_S)  # added to every step

    def fails(self, passed: int, draw: Callable[[], float]) -> bool:
        """Whether the step after ``passed`` steps since the fault was set raises.

        ``draw`` (uniform in [0, 1)) is consulted only for a fractional rate, so rates
        0 and 1 are deterministic and use no randomness.
        """
        if passed < self.after_steps or self.error_rate <= 0.0:
            return False
        return self.error_rate >= 1.0 or draw() < self.error_rate


@dataclass
class _Armed:
    fault: Fault
    passed: int = 0  # decode steps of the model since the fault was set


class FaultInjector:
    """The faults set on each model, by name; one per app, shared by every decoder.

    Thread-safe: the API sets and clears faults from the event loop while each
    model's scheduler thread reads them every step.
    """

    def __init__(self) -> None:
        self._armed: dict[str, _Armed] = {}
        self._lock = threading.Lock()

    def set(self, model: str, fault: Fault) -> None:
        """Set (or replace) ``model``'s fault; its step count starts again from zero."""
        with self._lock:
            self._armed[model] = _Armed(fault)
        log.warning("fault injection: set on model %r: %s", model, fault.model_dump_json())

    def clear(self, model: str) -> bool:
        """Remove ``model``'s fault; False if it had none."""
        with self._lock:
            removed = self._armed.pop(model, None)
        if removed is None:
            return False
        log.warning(
            "fault injection: cleared on model %r after %d decode steps", model, removed.passed
        )
        return True

    def get(self, model: str) -> Fault | None:
        with self._lock:
            armed = self._armed.get(model)
        return armed.fault if armed is not None else None

    def all(self) -> dict[str, Fault]:
        with self._lock:
            return {name: armed.fault for name, armed in sorted(self._armed.items())}

    def step(self, model: str) -> tuple[Fault, int] | None:
        """Count one decode step of ``model``: its fault and the steps that passed before it.

        None when the model has no fault (nothing is counted then).
        """
        with self._lock:
            armed = self._armed.get(model)
            if armed is None:
                return None
            passed = armed.passed
            armed.passed += 1
            return armed.fault, passed


class FaultyDecoder:
    """A :class:`BatchDecoder` that applies its model's fault, if any, to every decode step.

    Everything but :meth:`decode` goes straight to the wrapped decoder. ``sleep`` and
    ``draw`` (uniform in [0, 1), for fractional error rates) are the clock and the dice:
    tests pass fakes; both are used only in the scheduler thread that calls :meth:`decode`.
    """

    def __init__(
        self,
        inner: BatchDecoder,
        injector: FaultInjector,
        *,
        sleep: Callable[[float], None] = time.sleep,
        draw: Callable[[], float] | None = None,
    ) -> None:
        self.inner = inner
        self.n_slots = inner.n_slots
        self.n_ctx_slot = inner.n_ctx_slot
        self.n_batch = inner.n_batch
        self.n_vocab = inner.n_vocab
        self._injector = injector
        self._name = inner.manifest.name
        self._sleep = sleep
        self._draw = draw if draw is not None else _fresh_draw()

    @property
    def manifest(self) -> ModelManifest:
        return self.inner.manifest

    @property
    def info(self) -> RuntimeInfo:
        return self.inner.info

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        return self.inner.tokenize(text, special=special)

    def piece(self, token: int) -> bytes:
        return self.inner.piece(token)

    def is_eog(self, token: int) -> bool:
        return self.inner.is_eog(token)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        return self.inner.apply_chat_template(messages)

    def decode(self, entries: Sequence[BatchEntry]) -> list[int]:
        """Decode one step, after the fault's delay; or raise the fault's ModelFailed."""
        armed = self._injector.step(self._name)
        if armed is not None:
            fault, passed = armed
            if fault.delay_s > 0:
                self._sleep(fault.delay_s)
            if fault.fails(passed, self._draw):
                raise ModelFailed(
                    f"injected fault: {fault.failure.value} in model {self._name!r} "
                    f"(decode step {passed + 1} since the fault was set)",
                    failure=fault.failure,
                )
        return self.inner.decode(entries)

    def check_grammar(self, grammar: str, *, param: str) -> None:
        self.inner.check_grammar(grammar, param=param)

    def logprobs(self, index: int, token: int, top: int) -> TokenLogprob:
        return self.inner.logprobs(index, token, top)

    def set_sampler(self, seq: int, params: SamplingParams) -> None:
        self.inner.set_sampler(seq, params)

    def sample(self, seq: int, index: int) -> int:
        return self.inner.sample(seq, index)

    def share(self, source: int, target: int) -> None:
        self.inner.share(source, target)

    def forget(self, seq: int, keep: int) -> bool:
        return self.inner.forget(seq, keep)

    def close(self) -> None:
        self.inner.close()


def _fresh_draw() -> Callable[[], float]:
    # Not for security: which decode steps a drill fails.
    return random.Random().random  # noqa: S311
