"""Request bodies of the Ollama API, validated strictly at the edge.

Every field and option Ollama documents is either honoured or refused with a 400
naming it, never silently dropped; unknown fields are ignored, as Ollama does. The
rule for a refused knob: the values that ask for nothing different from what the
agent does anyway pass (``mirostat`` 0, ``use_mmap`` true, ``keep_alive`` above 0),
any other value is refused with the reason.

The agent serves a fixed set of models, each loaded once with the runtime settings
in its configuration, so Ollama's *load-time* options (``num_gpu``, ``num_thread``,
``num_batch``...) cannot change per request, and ``keep_alive`` cannot unload a
model. ``num_ctx`` is checked against the loaded model's context when the request
reaches it (:meth:`Options.check_context`), since only then is the model known.

Where an option is absent the agent uses Ollama's own defaults
(:data:`OLLAMA_DEFAULTS`), so an app that tuned nothing gets what it would from Ollama.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from agent.api.schemas import Text
from agent.errors import InvalidRequest, ModelNotFound
from agent.runtime.base import RANDOM_SEED, SamplingParams
from agent.serving.grammars import JSON_OBJECT_GBNF, schema_grammar
from agent.serving.tools import Tool, render_call

__all__ = [
    "OLLAMA_DEFAULTS",
    "ChatMessage",
    "ChatRequest",
    "EmbedRequest",
    "GenerateRequest",
    "Options",
    "ShowRequest",
    "keep_alive_seconds",
    "served_name",
]

MAX_TOP_LOGPROBS = 20  # Ollama's limit
MAX_STOPS = 16
PENALTY_WINDOW = 64  # tokens the repetition penalties look back over (the runtime's fixed window)
_SEED_MAX = 2**63 - 1

# Ollama's defaults for what a request leaves out (api/types.go, DefaultOptions).
OLLAMA_DEFAULTS: Mapping[str, float | int] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "repeat_penalty": 1.1,
    "repeat_last_n": PENALTY_WINDOW,
}

# Options whose value is fixed by how the agent runs: the values that pass, and why.
_FIXED: dict[str, tuple[tuple[object, ...], str]] = {
    "numa": ((False,), "the agent does not pin models to NUMA nodes"),
    "low_vram": ((False,), "a model's GPU offload is set in the agent's config (gpu_layers)"),
    "f16_kv": ((True,), "the KV cache is always f16"),
    "logits_all": ((False,), "ask for logprobs instead"),
    "vocab_only": ((False,), "the agent serves whole models"),
    "use_mmap": ((True,), "models are always memory-mapped"),
    "use_mlock": ((False,), "the agent does not lock model memory"),
    "embedding_only": ((False,), "embedding models are served on /api/embed"),
    "num_gpu": ((), "set gpu_layers in the model's runtime config"),
    "main_gpu": ((), "the agent places models by its config and device probe"),
    "num_batch": ((), "set batch_tokens in the model's runtime config"),
    "num_thread": ((), "set threads in the model's runtime config"),
    "num_keep": ((), "the agent never shifts the context: a prompt that does not fit is refused"),
    "typical_p": ((1.0,), "locally typical sampling is not supported"),
    "tfs_z": ((1.0,), "tail-free sampling was removed from llama.cpp"),
    "mirostat": ((0,), "mirostat sampling is not supported"),
    "penalize_newline": (
        (True,),
        "llama.cpp penalises newlines like every other token and cannot exempt them",
    ),
}
_LOAD_TIME = frozenset(
    {"numa", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap", "use_mlock"}
    | {"embedding_only", "num_gpu", "main_gpu", "num_batch", "num_thread"}
)


Finite = Annotated[float, Field(allow_inf_nan=False)]


def _refuse(name: str, why: str) -> ValueError:
    return ValueError(f"'{name}' cannot be honoured: {why}")


class Options(BaseModel):
    """``options``: sampling knobs honoured per request, load-time ones refused (see _FIXED)."""

    model_config = ConfigDict(extra="ignore")

    # runtime options the agent honours
    temperature: Annotated[Finite | None, Field(ge=0.0)] = None
    top_p: Annotated[Finite | None, Field(ge=0.0, le=1.0)] = None
    top_k: Annotated[int | None, Field(ge=0)] = None
    min_p: Annotated[Finite | None, Field(ge=0.0, le=1.0)] = None
    seed: Annotated[int | None, Field(ge=-_SEED_MAX, le=_SEED_MAX)] = None
    num_predict: int | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOPS)] | None = None
    repeat_penalty: Annotated[Finite | None, Field(gt=0.0)] = None
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    repeat_last_n: int | None = None
    num_ctx: Annotated[int | None, Field(ge=1)] = None
    # honoured as Ollama does: they only matter when mirostat is on, which is refused
    mirostat_tau: Finite | None = None
    mirostat_eta: Finite | None = None
    # fixed by how the agent runs: only the values in _FIXED pass
    numa: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    num_batch: int | None = None
    num_thread: int | None = None
    num_keep: int | None = None
    typical_p: Finite | None = None
    tfs_z: Finite | None = None
    mirostat: int | None = None
    penalize_newline: bool | None = None

    @model_validator(mode="after")
    def _honourable(self) -> Options:
        for name, (allowed, why) in _FIXED.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                kind = "a load-time option: " if name in _LOAD_TIME else ""
                raise _refuse(name, f"{kind}{why}")
        n = self.num_predict
        if n is not None and n != -1 and n < 1:
            why = (
                "-2 (fill the context) is not supported; send a number of tokens"
                if n == -2
                else "send -1 (the model's default length) or a number of tokens from 1"
            )
            raise _refuse("num_predict", why)
        if self.repeat_last_n not in (None, 0, PENALTY_WINDOW):
            raise _refuse(
                "repeat_last_n",
                f"the penalties look back over {PENALTY_WINDOW} tokens; send "
                f"{PENALTY_WINDOW}, or 0 to turn them off",
            )
        return self

    def sampling(self, grammar: str | None) -> SamplingParams:
        """The sampler for these options, Ollama's defaults filling what is left out."""

        def pick(value: float | None, name: str) -> float:
            return float(OLLAMA_DEFAULTS[name]) if value is None else value

        penalised = self.repeat_last_n != 0
        seed = self.seed if self.seed is not None and self.seed >= 0 else RANDOM_SEED
        return SamplingParams(
            temperature=pick(self.temperature, "temperature"),
            top_p=pick(self.top_p, "top_p"),
            top_k=int(pick(self.top_k, "top_k")),
            min_p=pick(self.min_p, "min_p"),
            seed=seed,
            frequency_penalty=(self.frequency_penalty or 0.0) if penalised else 0.0,
            presence_penalty=(self.presence_penalty or 0.0) if penalised else 0.0,
            repeat_penalty=pick(self.repeat_penalty, "repeat_penalty") if penalised else 1.0,
            grammar=grammar,
        )

    def max_tokens(self) -> int | None:
        """``num_predict``; -1 (Ollama's "no limit") is the model's configured default."""
        return None if self.num_predict in (None, -1) else self.num_predict

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def check_context(self, model: str, context_length: int) -> None:
        """``num_ctx`` larger than the loaded model's context cannot be had per request."""
        if self.num_ctx is not None and self.num_ctx > context_length:
            raise InvalidRequest(
                f"options.num_ctx: {self.num_ctx} is more than model {model!r}'s context of "
                f"{context_length} tokens. The agent loads each model once with the context "
                "in its config (runtime.context_length) and cannot resize it per request; "
                f"send num_ctx of at most {context_length}",
                param="options.num_ctx",
            )


_GO_DURATION = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: float | str) -> float:
    """Ollama's ``keep_alive``: seconds as a number, or a Go duration such as "5m" or "-1"."""
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    if not _GO_DURATION.match(text):
        raise ValueError(
            f"'keep_alive' must be seconds or a duration such as \"5m\", not {value!r}"
        )
    total = sum(
        float(amount) * _UNIT_S[unit]
        for amount, unit in re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", text)
    )
    return -total if text.startswith("-") else total


def _check_keep_alive(value: float | str | None) -> float | str | None:
    if value is not None and keep_alive_seconds(value) == 0:
        raise _refuse(
            "keep_alive",
            "0 asks to unload the model, and the agent keeps the models it serves loaded; "
            "omit keep_alive or send a duration",
        )
    return value


KeepAlive = Annotated[float | str | None, AfterValidator(_check_keep_alive)]


def _refuse_images(value: list[str] | None) -> list[str] | None:
    if value:
        raise _refuse("images", "the models this agent serves read text only")
    return value


Images = Annotated[list[str] | None, AfterValidator(_refuse_images)]


class CalledFunction(BaseModel):
    """A function an earlier assistant turn called; Ollama sends arguments as an object."""

    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)

    def as_json(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


class AssistantToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    function: CalledFunction


class ChatMessage(BaseModel):
    """One chat turn; a ``tool`` turn carries a call's result, named by ``tool_name``."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: Text | None = None
    images: Images = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None  # an earlier turn's reasoning: not shown to the model again

    def rendered(self) -> dict[str, str]:
        """The turn as the chat template sees it: calls and results in the agent's shape."""
        text = self.content or ""
        if self.role == "tool":
            source = f" ({self.tool_name})" if self.tool_name else ""
            return {"role": "user", "content": f"Tool result{source}: {text}"}
        if self.role == "assistant" and self.tool_calls:
            calls = [(c.function.name, c.function.as_json()) for c in self.tool_calls]
            return {"role": "assistant", "content": render_call(calls)}
        return {"role": self.role, "content": text}


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(BaseModel):
    """``tools[]``: Ollama's tools are functions, as OpenAI's are."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: FunctionSpec


def _check_format(value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(value, str) and value not in ("", "json"):
        raise ValueError(f'format must be "json" or a JSON schema object, not {value!r}')
    return value


Format = Annotated[str | dict[str, Any] | None, AfterValidator(_check_format)]


class GenerationFields(BaseModel):
    """What ``/api/chat`` and ``/api/generate`` share."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    stream: bool = True  # Ollama streams unless told not to
    format: Format = None
    options: Options = Field(default_factory=Options)
    keep_alive: KeepAlive = None
    think: bool | Literal["high", "medium", "low"] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None

    @model_validator(mode="after")
    def _supported(self) -> GenerationFields:
        if self.think not in (None, False):
            raise _refuse("think", "the models this agent serves do not think aloud")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def grammar(self) -> str | None:
        """The grammar ``format`` asks for: any JSON object, or JSON valid against a schema."""
        if self.format in (None, ""):
            return None
        if isinstance(self.format, str):
            return JSON_OBJECT_GBNF  # "json", the only other string _check_format lets in
        return schema_grammar(self.format, param="format")

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatRequest(GenerationFields):
    """``POST /api/chat``; no messages at all asks only that the model be loaded."""

    messages: Annotated[list[ChatMessage], Field(max_length=4096)] = Field(default_factory=list)
    tools: Annotated[list[ToolSpec] | None, Field(max_length=128)] = None

    def tool_set(self) -> list[Tool]:
        """The tools offered; Ollama has no tool_choice, so the model may always answer in text."""
        tools = [
            Tool.of(
                t.function.name,
                t.function.description,
                t.function.parameters,
                param=f"tools[{i}].function",
            )
            for i, t in enumerate(self.tools or [])
        ]
        if tools and self.format not in (None, ""):
            raise InvalidRequest(
                "format and tools both shape the answer, and a formatted answer could never "
                "be a tool call; send only one of them",
                param="format",
            )
        return tools


# /api/generate fields the agent cannot honour: the values that ask for nothing, and why.
_GENERATE_REFUSED: dict[str, tuple[tuple[object, ...], str]] = {
    "suffix": ((None, ""), "fill-in-the-middle is not supported"),
    "template": (
        (None, ""),
        "Go prompt templates are not supported: send raw=true with the prompt already formatted",
    ),
    "context": (
        (None, []),
        "the agent keeps no token context between requests: send the conversation to /api/chat",
    ),
    "width": ((None,), "the agent does not generate images"),
    "height": ((None,), "the agent does not generate images"),
    "steps": ((None,), "the agent does not generate images"),
}


class GenerateRequest(GenerationFields):
    """``POST /api/generate``; no prompt at all asks only that the model be loaded."""

    prompt: Text | None = None
    system: Text | None = None
    raw: bool = False
    images: Images = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None

    @model_validator(mode="after")
    def _generate_supported(self) -> GenerateRequest:
        for name, (allowed, why) in _GENERATE_REFUSED.items():
            if getattr(self, name) not in allowed:
                raise _refuse(name, why)
        if self.raw and self.system:
            raise _refuse(
                "system",
                "with raw=true no template is applied, so there is no place for a system "
                "prompt: put it in the prompt yourself",
            )
        return self


class EmbedRequest(BaseModel):
    """``POST /api/embed``: one text or many, each one vector."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=2048)]
    truncate: bool = True
    dimensions: Annotated[int | None, Field(ge=1)] = None
    options: Options = Field(default_factory=Options)
    keep_alive: KeepAlive = None

    @model_validator(mode="after")
    def _embedding_options(self) -> EmbedRequest:
        meaningless = sorted(
            name
            for name in self.options.model_fields_set
            if getattr(self.options, name) is not None and name != "num_ctx"
        )
        if meaningless:
            raise _refuse(f"options.{meaningless[0]}", "it means nothing to an embedding model")
        return self

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ShowRequest(BaseModel):
    """``POST /api/show``; older clients send the model as ``name``."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    verbose: bool = False  # Ollama adds tokenizer arrays; the agent has nothing more to add

    @model_validator(mode="before")
    @classmethod
    def _legacy_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "model" not in data and "name" in data:
            return {**data, "model": data["name"]}
        return data


def served_name(name: str, served: Mapping[str, str], pending: Collection[str] = ()) -> str:
    """The served model an Ollama name means: ``x``, ``x:latest`` or ``x:<its version>``.

    ``served`` maps each served name to its version; ``pending`` names models that are
    configured but loading or failed (asking for them is a 503, not a 404).
    """
    base, colon, tag = name.partition(":")
    if not colon and (name in served or name in pending):
        return name
    if colon and tag == "latest" and (base in served or base in pending):
        return base
    if colon and tag and served.get(base) == tag:
        return base
    raise ModelNotFound(f"model {name!r} not found", param="model")
