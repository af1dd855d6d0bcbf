"""Ollama's shapes for answers and models: pure functions from the agent's values.

Kept apart from the routes so the routes stay about flow, and these stay easy to
check against the ``ollama`` client's types (``ollama._types``). Durations are in
nanoseconds and times in RFC 3339, as Ollama sends them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from agent.api.ollama_schemas import OLLAMA_DEFAULTS
from agent.api.openai_shapes import chat_logprobs
from agent.runtime.base import RuntimeInfo, TokenLogprob
from agent.serving.scheduler import GenerationResult
from agent.serving.tools import ToolCall
from models.manifest import ModelManifest

__all__ = [
    "NEVER",
    "details",
    "listed_name",
    "logprobs",
    "model_info",
    "parameters",
    "running",
    "stats",
    "tag",
    "timestamp",
    "tool_calls",
]

NEVER = "9999-12-31T23:59:59Z"  # /api/ps expires_at: the agent keeps its models loaded
_SIZE = re.compile(r"^\d+(\.\d+)?[KMBT]$")  # llama.cpp's type name, e.g. "270M", "7B"
_VARIANT = {"Small": "S", "Medium": "M", "Large": "L"}


def timestamp(unix_s: float) -> str:
    """RFC 3339 in UTC with microseconds, the way Ollama writes ``created_at``."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return max(round(seconds * 1e9), 0)


def stats(result: GenerationResult, total_s: float) -> dict[str, int]:
    """The counters of a finished answer: nothing is loaded per request, so load is 0."""
    return {
        "total_duration": _ns(total_s),
        "load_duration": 0,
        "prompt_eval_count": result.prompt_tokens,
        "prompt_eval_duration": _ns(result.ttft_s),
        "eval_count": result.completion_tokens,
        "eval_duration": _ns(result.total_s - result.ttft_s),
    }


def tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """``message.tool_calls``: Ollama sends each call's arguments as an object, not text."""
    return [
        {"function": {"index": i, "name": call.name, "arguments": call.parsed_arguments()}}
        for i, call in enumerate(calls)
    ]


def logprobs(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """``logprobs``: each generated token with its likeliest rivals, as OpenAI's chat has it."""
    return list(chat_logprobs(entries)["content"])


def listed_name(manifest: ModelManifest) -> str:
    """How a model is listed: Ollama names carry a tag, and ``latest`` never goes stale."""
    return f"{manifest.name}:latest"


def _quantization(ftype: str) -> str:
    """llama.cpp's "Q4_K - Medium" as Ollama writes it, "Q4_K_M"."""
    kind, _, variant = ftype.partition(" - ")
    suffix = _VARIANT.get(variant.strip())
    return f"{kind.strip()}_{suffix}" if suffix else kind.strip()


def details(manifest: ModelManifest, info: RuntimeInfo) -> dict[str, Any]:
    """``details``: read from llama.cpp's description ("gemma3 270M Q4_K - Medium") when known."""
    words = str(info.details.get("description", "")).split(" ", 2)
    family = words[0] if len(words) == 3 else ""
    size = words[1] if len(words) == 3 and _SIZE.match(words[1]) else ""
    return {
        "parent_model": "",
        "format": manifest.format.value,
        "family": family,
        "families": [family] if family else [],
        "parameter_size": size,
        "quantization_level": _quantization(words[2]) if len(words) == 3 else "",
    }


def tag(manifest: ModelManifest, info: RuntimeInfo, modified_at: float) -> dict[str, Any]:
    """One entry of ``/api/tags``."""
    name = listed_name(manifest)
    return {
        "name": name,
        "model": name,
        "modified_at": timestamp(modified_at),
        "size": manifest.size_bytes,
        "digest": manifest.sha256,
        "details": details(manifest, info),
    }


def running(
    manifest: ModelManifest, info: RuntimeInfo, context_length: int | None
) -> dict[str, Any]:
    """One entry of ``/api/ps``: loaded until the agent is told otherwise, so never expiring."""
    name = listed_name(manifest)
    size = info.memory_bytes or manifest.size_bytes
    entry = {
        "name": name,
        "model": name,
        "size": size,
        "digest": manifest.sha256,
        "details": details(manifest, info),
        "expires_at": NEVER,
        "size_vram": 0 if info.device == "cpu" else size,
    }
    if context_length is not None:
        entry["context_length"] = context_length
    return entry


def parameters(context_length: int, max_tokens: int) -> str:
    """``parameters`` as Ollama lists them: what a request that sets nothing gets."""
    values: Mapping[str, float | int] = {
        "num_ctx": context_length,
        "num_predict": max_tokens,
        **OLLAMA_DEFAULTS,
    }
    return "\n".join(f"{name:<30} {value}" for name, value in values.items())


def model_info(
    manifest: ModelManifest, info: RuntimeInfo, context_length: int | None
) -> dict[str, Any]:
    """``model_info``: the architecture's keys Ollama clients read, and the agent's own."""
    arch = details(manifest, info)["family"] or manifest.format.value
    out: dict[str, Any] = {"general.architecture": arch, "general.basename": manifest.name}
    if context_length is not None:
        out[f"{arch}.context_length"] = context_length
    if manifest.runtime.embedding_dim is not None:
        out[f"{arch}.embedding_length"] = manifest.runtime.embedding_dim
    out.update(
        {
            "edgefleet.version": manifest.version,
            "edgefleet.sha256": manifest.sha256,
            "edgefleet.runtime": info.runtime,
            "edgefleet.device": info.device,
            "edgefleet.provider": info.provider,
        }
    )
    return out
