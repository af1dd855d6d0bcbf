"""OpenAI's shapes for what a choice carries beyond its text: logprobs and tool calls.

Pure functions from the serving layer's values to JSON-ready dicts, so the routes
stay about flow and these stay easy to check against the ``openai`` client's types.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.runtime.base import TokenLogprob
from agent.serving.tools import ToolCall

__all__ = ["chat_logprobs", "completion_logprobs", "tool_call_deltas", "tool_calls"]


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion: content tokens with their rivals."""
    content = [
        {
            "token": _text(entry.piece),
            "logprob": entry.logprob,
            "bytes": list(entry.piece),
            "top_logprobs": [
                {"token": _text(piece), "logprob": lp, "bytes": list(piece)}
                for piece, lp in entry.top
            ],
        }
        for entry in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], *, offset: int = 0) -> dict[str, Any]:
    """``choices[].logprobs`` of a text completion, in the legacy parallel-lists shape.

    ``offset`` is where the generated text starts in the choice's text (after an echo).
    """
    tokens, offsets = [], []
    at = offset
    for entry in entries:
        text = _text(entry.piece)
        tokens.append(text)
        offsets.append(at)
        at += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_text(piece): lp for piece, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """``message.tool_calls`` of a whole answer."""
    return [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in calls
    ]


def tool_call_deltas(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """``delta.tool_calls`` of a stream: each call whole, with its index."""
    return [{"index": i, **call} for i, call in enumerate(tool_calls(calls))]
