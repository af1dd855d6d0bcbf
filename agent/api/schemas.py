"""Request bodies of the OpenAI-compatible API, validated strictly at the edge.

Every parameter OpenAI defines is either honoured or refused with a 400 naming it
(:data:`_REFUSED`), never silently dropped: an app that asks for audio, predicted
outputs or stored completions learns at once that it will not get them. Unknown
vendor fields are still ignored, as OpenAI-compatible servers do. A few
llama.cpp-style extensions (``top_k``, ``min_p``, ``repeat_penalty``,
``ignore_eos``, ``grammar``) are accepted too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.errors import InvalidRequest
from agent.runtime.base import RANDOM_SEED, SamplingParams
from agent.serving.grammars import JSON_OBJECT_GBNF, schema_grammar
from agent.serving.tools import Tool, ToolChoice, check_choice, render_call, tool_grammar

__all__ = [
    "AssistantToolCall",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "EmbeddingRequest",
    "GenerationFields",
]

MAX_STOPS = 4
MAX_CHOICES = 16  # n; the model's slot count is the real limit, checked when it is leased
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions allow 5
_SEED_MAX = 2**63 - 1

# OpenAI parameters the agent cannot honour, with the values that ask for nothing.
_REFUSED: dict[str, tuple[object, ...]] = {
    "audio": (None,),
    "functions": (None,),  # the pre-tools API: send ``tools``
    "function_call": (None,),
    "modalities": (None, ["text"]),
    "moderation": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "prompt_cache_retention": (None,),
    "prompt_cache_options": (None,),
    "suffix": (None, ""),
}
_WHY = {
    "functions": "the functions API is superseded: send tools instead",
    "function_call": "the functions API is superseded: send tool_choice instead",
    "store": "this agent stores no completions",
    "metadata": "this agent stores no completions to tag",
    "suffix": "fill-in-the-middle is not supported",
}


def _refuse_unsupported(data: Any) -> Any:
    if isinstance(data, dict):
        for name, allowed in _REFUSED.items():
            if name in data and data[name] not in allowed:
                why = _WHY.get(name, "this server does not support it")
                raise ValueError(f"'{name}' cannot be honoured: {why}")
    return data


def _encodable(text: str) -> str:
    """JSON escapes can carry lone surrogates, which no UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode ({exc.reason})") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class TextPart(BaseModel):
    """One part of a multi-part message; only text is supported on this agent."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: Text


class CalledFunction(BaseModel):
    """A function an assistant turn called, with its arguments as JSON text."""

    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str = "{}"


class AssistantToolCall(BaseModel):
    """One call in an earlier assistant turn, as the client sends the history back."""

    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    """One chat turn; ``developer`` is treated as ``system``, ``tool`` carries a call's result."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def rendered(self) -> dict[str, str]:
        """The turn as the chat template sees it: calls and results in the agent's shape."""
        if self.role == "tool":
            return {"role": "user", "content": f"Tool result ({self.tool_call_id}): {self.text()}"}
        if self.role == "assistant" and self.tool_calls:
            calls = render_call([(c.function.name, c.function.arguments) for c in self.tool_calls])
            return {"role": "assistant", "content": calls}
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: a named schema every answer must validate against."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: free text, any JSON object, or JSON valid against a schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object")
        return self


class FunctionSpec(BaseModel):
    """``tools[].function``: a function the model may call."""

    model_config = ConfigDict(extra="ignore")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(BaseModel):
    """``tools[]``: only function tools exist in OpenAI's chat API."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming one function."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    """Streaming extras; ``include_usage`` adds a final usage chunk."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class GenerationFields(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: Annotated[int | None, Field(ge=-_SEED_MAX, le=_SEED_MAX)] = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    user: str | None = None
    # llama.cpp-style extensions
    top_k: Annotated[int, Field(ge=0)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    ignore_eos: bool = False
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    grammar: Annotated[str | None, Field(min_length=1, max_length=65536)] = None  # GBNF

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        return _refuse_unsupported(data)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"keys must be token ids, not {key!r}")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self, grammar: str | None = None) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed if self.seed is not None else RANDOM_SEED,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repeat_penalty=self.repeat_penalty,
            grammar=grammar,
            logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
        )

    def constraint(self) -> str | None:
        """The grammar every answer must match, if the request constrains it."""
        if self.grammar is not None and self.ignore_eos:
            raise InvalidRequest("ignore_eos cannot be combined with a grammar", param="ignore_eos")
        return self.grammar

    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives to report per token; None: no logprobs at all."""
        return None

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolSpec] | None, Field(max_length=128)] = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_set(self) -> tuple[list[Tool], ToolChoice]:
        """The tools offered and how the model may use them (``none`` when there are none)."""
        tools = [
            Tool.of(
                t.function.name,
                t.function.description,
                t.function.parameters,
                param=f"tools[{i}].function",
            )
            for i, t in enumerate(self.tools or [])
        ]
        if isinstance(self.tool_choice, NamedToolChoice):
            choice = ToolChoice("function", self.tool_choice.function.name)
        else:
            choice = ToolChoice(self.tool_choice or ("auto" if tools else "none"))
        check_choice(tools, choice, param="tool_choice")
        return tools, choice

    @property
    def parallel(self) -> bool:
        return self.parallel_tool_calls is not False

    def constraint(self) -> str | None:
        """One grammar from ``grammar``, ``response_format`` or a forced tool call."""
        wanted = [self.grammar] if self.grammar is not None else []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            wanted.append(JSON_OBJECT_GBNF)
        elif fmt is not None and fmt.json_schema is not None:
            schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
            wanted.append(schema_grammar(schema, param="response_format.json_schema.schema"))
        tools, choice = self.tool_set()
        forced = tool_grammar(tools, choice, parallel=self.parallel)
        if forced is not None:
            wanted.append(forced)
        if len(wanted) > 1:
            raise InvalidRequest(
                "grammar, a JSON response_format and a required tool call each constrain the "
                "answer; send only one of them",
                param="response_format",
            )
        if wanted and self.ignore_eos:
            raise InvalidRequest(
                "ignore_eos cannot be combined with a constrained answer", param="ignore_eos"
            )
        return wanted[0] if wanted else None


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``: a string, one-string list, or token ids."""

    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=1)]
        | Annotated[list[int], Field(min_length=1)]
    )
    max_tokens: Annotated[int | None, Field(ge=1)] = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: Annotated[int | None, Field(ge=0, le=5)] = None
    best_of: Annotated[int | None, Field(ge=1, le=1)] = None

    @model_validator(mode="after")
    def _echo_alone(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ValueError(
                "echo with logprobs would need the prompt tokens' logprobs, which this "
                "server does not compute; send one or the other"
            )
        return self

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``; ``base64`` is what the openai client asks for by default."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int | None, Field(ge=1)] = None
    user: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
