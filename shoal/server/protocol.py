"""OpenAI wire format: request and response schemas for /v1/chat/completions, /v1/completions,
/v1/models and errors. Pydantic only; nothing here imports the engine.

Requests accept and ignore fields they do not know (clients send extras), but the fields they do
know are type- and range-checked, so a bad value becomes a 400 that names the field. shoal's
extensions beyond OpenAI (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`,
`stop_token_ids`, `skip_special_tokens`, `include_stop_str_in_output`) are the ones vLLM accepts.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_serializer, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

# -log(0) is not JSON; OpenAI and vLLM send this floor instead
LOGPROB_FLOOR = -9999.0


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# the engine keeps seeds and token ids in 64-bit integers
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1


class _Request(BaseModel):
    """Unknown fields are ignored; known ones are strict: no string-to-number or string-to-bool
    coercion ("10", "yes"), and no NaN or infinity in floats."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------- errors
class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


# ---------------------------------------------------------------------------- shared request fields
class StreamOptions(_Request):
    include_usage: bool = False


NonNegInt = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]

JsonSchema = dict[str, Any]
_NULL: JsonSchema = {"type": "null"}
_TOKEN_ID: JsonSchema = {"type": "integer", "minimum": 0, "maximum": INT32_MAX}


def _when(field: str, schema: JsonSchema) -> JsonSchema:
    """Object schema: `field`, if present, matches `schema`."""
    return {"properties": {field: schema}}


def _sent(field: str, schema: JsonSchema) -> JsonSchema:
    """Object schema: `field` is present and matches `schema`."""
    return {"properties": {field: schema}, "required": [field]}


class _CrossFieldSchema:
    """Pydantic's JSON schema plus `_schema_rules()` under `allOf`: what the model validators check
    across fields, stated so OpenAPI clients and fuzzers see it. Validation is unchanged."""

    @classmethod
    def _schema_rules(cls) -> list[JsonSchema]:
        return []

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core_schema))
        schema["allOf"] = [*schema.get("allOf", []), *cls._schema_rules()]
        return schema


class SamplingFields(_CrossFieldSchema, _Request):
    """Fields both endpoints share. Defaults are OpenAI's."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = Field(
        default=None, description="Up to 16 non-empty stop strings.",
        json_schema_extra={"anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 16},
            _NULL,
        ]},
    )
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Not supported: only null or {}.",
        json_schema_extra={"anyOf": [{"type": "object", "maxProperties": 0}, _NULL]},
    )
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)  # ≤ vocabulary: checked by the engine
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    # beyond this range float32 logits divided or multiplied by it overflow or vanish
    repetition_penalty: float | None = Field(default=None, ge=1e-6, le=1e6)
    min_tokens: NonNegInt = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=256)  # < vocabulary: engine
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @model_validator(mode="after")
    def _check_shared(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "is only allowed when stream is true")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise _field_error("stop", "accepts at most 16 sequences")
        if self.stop is not None and any(not s for s in ([self.stop] if isinstance(self.stop, str) else self.stop)):
            raise _field_error("stop", "sequences must be non-empty strings")
        if self.logit_bias:
            raise _field_error("logit_bias", "is not supported by shoal")
        return self

    @classmethod
    def _schema_rules(cls) -> list[JsonSchema]:
        return [{"anyOf": [_when("stream_options", _NULL), _sent("stream", {"const": True})]}]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class FieldError(ValueError):
    """A cross-field check failed; `param` names the request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param} {message}")
        self.param = param


def _field_error(param: str, message: str) -> FieldError:
    return FieldError(param, message)


# ---------------------------------------------------------------------------- chat requests
class ContentPart(_Request):
    # only text parts are supported (ChatMessage.text refuses the others): the schema says so
    model_config = ConfigDict(json_schema_extra={
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
        "required": ["type", "text"],
    })

    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # earlier turns' reasoning; dropped before templating

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise _field_error("messages", f"content parts of type {p.type!r} are not supported (text only)")
            parts.append(p.text)
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # extensions
    add_generation_prompt: bool = True
    chat_template: str | None = None  # only when the server allows request templates
    chat_template_kwargs: dict[str, Any] | None = None

    @classmethod
    def _schema_rules(cls) -> list[JsonSchema]:
        return [*super()._schema_rules(),
                {"anyOf": [_when("top_logprobs", _NULL), _sent("logprobs", {"const": True})]}]

    @model_validator(mode="after")
    def _check_chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise _field_error("top_logprobs", "requires logprobs to be true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        """None: up to the end of the context (OpenAI's chat default)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------------------- completion requests
class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="One prompt (text or token ids) or a list of them; none may be empty.",
        json_schema_extra={"anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            {"type": "array", "items": _TOKEN_ID, "minItems": 1},
            {"type": "array", "items": {"type": "array", "items": _TOKEN_ID, "minItems": 1}, "minItems": 1},
        ]},
    )
    max_tokens: int | None = Field(default=16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = Field(default=None, description="Not supported: only null or empty.",
                               json_schema_extra={"anyOf": [{"type": "string", "maxLength": 0}, _NULL]})
    best_of: int | None = Field(default=None, ge=1, le=128, description="Accepted only equal to n.")

    @classmethod
    def _schema_rules(cls) -> list[JsonSchema]:
        # best_of == n is not here: JSON Schema can only enumerate the 128 pairs, more than generators
        # (schemathesis's canonicaliser) handle; the field's description says it
        return [*super()._schema_rules(), {"anyOf": [_when("echo", {"const": False}), _when("logprobs", _NULL)]}]

    @model_validator(mode="after")
    def _check_completion(self) -> "CompletionRequest":
        p = self.prompt
        if isinstance(p, str):
            pass
        elif not p:
            raise _field_error("prompt", "must not be empty")
        elif isinstance(p[0], list) and any(not q for q in p):
            raise _field_error("prompt", "token lists must not be empty")
        if self.suffix:
            raise _field_error("suffix", "is not supported by shoal")
        if self.best_of is not None and self.best_of != self.n:
            raise _field_error("best_of", "is not supported by shoal (leave it unset or equal to n)")
        if self.echo and self.logprobs is not None:
            raise _field_error("echo", "with logprobs is not supported (shoal does not score prompt tokens)")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- responses
class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(_Response):
    """A stream delta: only the fields that are set go on the wire (`{}` in the last chunk)."""

    # the serializer below only drops unset fields, so the validation schema describes the wire
    model_config = ConfigDict(json_schema_mode_override="validation")

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "shoal"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
