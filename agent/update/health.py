"""The health check after an update: run the model's golden prompts, judge the answers.

A model that loads can still be broken (a bad quantization, the wrong tokenizer, a
file that is validly signed but not what was meant), so an update counts as good only
after it answers. The golden prompts come with the signed TUF target (custom field
``golden_prompts``, as pushed to the registry); a target without any gets one generic
prompt that only asks for a sane, timely answer. :func:`judge` is pure; :func:`run_checks`
asks the loaded model, before any client can reach it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import AgentError
from agent.runtime.base import Embedder, ServedModel
from agent.serving.scheduler import BatchScheduler, GenerationRequest

__all__ = [
    "DEFAULT_PROMPT",
    "GoldenPrompt",
    "HealthSpec",
    "PromptResult",
    "health_spec",
    "judge",
    "run_checks",
]

DEFAULT_MAX_LATENCY_S = 60.0  # per golden prompt, on the slowest device the fleet runs
_MAX_REPLACEMENT_SHARE = 0.5  # more undecodable characters than this is not text


@dataclass(frozen=True)
class GoldenPrompt:
    """A prompt and, optionally, a substring every good answer contains."""

    prompt: str
    expect: str | None = None
    max_tokens: int = 16


DEFAULT_PROMPT = GoldenPrompt("The capital of France is", max_tokens=8)


@dataclass(frozen=True)
class HealthSpec:
    """What the check asks, and how long an answer may take (seconds)."""

    prompts: tuple[GoldenPrompt, ...] = (DEFAULT_PROMPT,)
    max_latency_s: float = DEFAULT_MAX_LATENCY_S


@dataclass(frozen=True)
class PromptResult:
    """One golden prompt's answer: text (or vector summary), time, or the error."""

    prompt: GoldenPrompt
    text: str = ""
    tokens: int = 0  # generated tokens, or the vector's dimension for an embedder
    seconds: float = 0.0
    error: str | None = None
    finite: bool = True  # an embedder's vector has no NaN or infinity


def health_spec(custom: Mapping[str, Any]) -> HealthSpec:
    """The check a signed target asks for, from its custom fields (defaults where absent)."""
    prompts = []
    for raw in custom.get("golden_prompts") or ():
        if not isinstance(raw, Mapping) or not isinstance(raw.get("prompt"), str):
            continue
        expect = raw.get("expect")
        max_tokens = raw.get("max_tokens", 16)
        prompts.append(
            GoldenPrompt(
                raw["prompt"],
                expect if isinstance(expect, str) else None,
                max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 16,
            )
        )
    latency = custom.get("health_max_latency_s")
    if not isinstance(latency, int | float) or latency <= 0:
        latency = DEFAULT_MAX_LATENCY_S
    return HealthSpec(tuple(prompts) or (DEFAULT_PROMPT,), float(latency))


def judge(spec: HealthSpec, results: Sequence[PromptResult]) -> str | None:
    """None when every answer is sane, timely and as expected; else why not (pure)."""
    if len(results) != len(spec.prompts):
        return f"{len(results)} answers for {len(spec.prompts)} golden prompts"
    for n, result in enumerate(results, 1):
        where = f"golden prompt {n} ({result.prompt.prompt[:40]!r})"
        if result.error is not None:
            return f"{where} failed: {result.error}"
        if result.seconds > spec.max_latency_s:
            return f"{where} took {result.seconds:.1f} s (at most {spec.max_latency_s:.0f} s)"
        if result.tokens < 1:
            return f"{where} produced nothing"
        if not result.finite:
            return f"{where} produced NaN or infinite values"
        if result.text and result.text.count("\ufffd") > _MAX_REPLACEMENT_SHARE * len(result.text):
            return f"{where} produced undecodable text"
        expect = result.prompt.expect
        if expect is not None and expect not in result.text:
            return f"{where} answered {result.text[:80]!r}, which lacks {expect!r}"
    return None


async def _ask(model: ServedModel, prompt: GoldenPrompt, timeout_s: float) -> PromptResult:
    started = time.monotonic()
    try:
        if isinstance(model, BatchScheduler):
            tokens = model.decoder.tokenize(prompt.prompt, special=True)
            request = GenerationRequest(tokens, prompt.max_tokens, timeout_s=timeout_s)
            result = await model.submit(request).complete()
            return PromptResult(
                prompt, result.text, result.completion_tokens, time.monotonic() - started
            )
        if isinstance(model, Embedder):
            vectors = await asyncio.to_thread(model.embed, [prompt.prompt])
            finite = bool(np.isfinite(vectors).all()) and not math.isclose(
                float(np.abs(vectors).sum()), 0.0
            )
            return PromptResult(
                prompt, "", int(vectors.shape[-1]), time.monotonic() - started, finite=finite
            )
        return PromptResult(prompt, error=f"no health check for {type(model).__name__}")
    except AgentError as exc:
        return PromptResult(prompt, seconds=time.monotonic() - started, error=exc.message)
    except Exception as exc:  # a broken model may fail in ways no runtime anticipated
        return PromptResult(prompt, seconds=time.monotonic() - started, error=repr(exc))


async def run_checks(model: ServedModel, spec: HealthSpec) -> list[PromptResult]:
    """Ask each golden prompt in turn (bounded by the latency limit plus a margin)."""
    return [await _ask(model, prompt, spec.max_latency_s * 2) for prompt in spec.prompts]
