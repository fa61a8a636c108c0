"""Pydantic models of the OpenAI API (the parts tokenmill serves), plus vLLM's extra sampling fields.

Requests ignore unknown fields with a warning in the log, as vLLM does, so clients that send newer or
provider-specific fields (store, metadata, ...) keep working; fields whose meaning tokenmill cannot
honour are declared and rejected by the serving code. Type errors are caught here; value rules live
in SamplingParams.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

logger = logging.getLogger("tokenmill.api")


class OpenAIModel(BaseModel):
    # JSON has no NaN or Infinity, but Python's parser accepts them; no field means anything by them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="wrap")
    @classmethod
    def _warn_unknown_fields(cls, data: Any, handler: ModelWrapValidatorHandler) -> Any:
        known = {*cls.model_fields, *(f.alias for f in cls.model_fields.values() if f.alias)}
        if isinstance(data, dict) and (unknown := sorted(set(data) - known)):
            logger.warning("%s: ignored unknown fields %s", cls.__name__, ", ".join(map(str, unknown)))
        return handler(data)


def one_error(value: Any, handler: ValidatorFunctionWrapHandler, message: str) -> Any:
    """A wrap validator's body: one message for a bad value, rather than one per member of a union."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(message) from None


# ---- errors ------------------------------------------------------------------------------------

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- requests ----------------------------------------------------------------------------------

class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(OpenAIModel):
    """OpenAI's response_format: "text", "json_object", or "json_schema" with
    json_schema = {"name": ..., "schema": {...}, "strict": ...}."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class SamplingFields(OpenAIModel):
    """Fields shared by completions and chat: OpenAI's, then vLLM's extras."""

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # informational only
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs ({"json" | "regex" | "choice" |
    # "grammar" | "json_object": ...}) and its older guided_* fields; at most one of them.
    response_format: ResponseFormat | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's request extensions: per prompt token its logprob and the top-N (N in [0, 20], not with stream),
    # the prompt cut to k tokens (-1: the model's context; its last ones, or with truncation_side "right" its
    # first), and the token ids in the response.
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    truncation_side: Literal["left", "right"] | None = None
    return_token_ids: bool | None = None


class BeamSearchFields(OpenAIModel):
    """vLLM's beam search extension (completions and chat): n beams, best first; length_penalty and early_stopping
    as transformers' generate reads them (tokenmill.engine.sampling.beam_search)."""

    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False


def _check_prompt(value: Any) -> Any:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    ok = (isinstance(value, str)
          or (isinstance(value, list) and value and (
              all(isinstance(p, str) for p in value) or is_ids(value) or all(is_ids(p) for p in value))))
    if not ok:
        raise ValueError("must be a string, a list of strings, a non-empty list of token ids, "
                         "or a list of non-empty lists of token ids")
    return value


# The schema of what _check_prompt accepts. Validation stays there: as a pydantic union, lax mode
# would coerce values (1.0 into a token id) that the check rejects.
_PROMPT_SCHEMA = {"anyOf": [
    {"type": "string"},
    {"type": "array", "items": {"type": "string"}, "minItems": 1},
    {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
    {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
     "minItems": 1},
]}


class CompletionRequest(SamplingFields, BeamSearchFields):
    prompt: Any = Field(json_schema_extra=_PROMPT_SCHEMA)
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None  # not supported: rejected when set
    best_of: int | None = None  # supported only as best_of == n

    _prompt = field_validator("prompt")(_check_prompt)


class FunctionDefinition(OpenAIModel):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments; none means any object
    strict: bool | None = None  # calls that must fit `parameters` are always constrained: see api/tools.py


class ChatTool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # a JSON object, as text


class ChatToolCall(OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    # For the schema, what _content_required checks: only an assistant message may go without content.
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"role": {"const": "assistant"}}},
        "else": {"properties": {"content": {"type": "string"}}, "required": ["content"]}})
    # "developer" is OpenAI's newer name for "system"; it reaches the chat template as "system". Other
    # roles (vLLM's custom roles) reach the template as they are; the template may reject them.
    role: str = Field(min_length=1, max_length=64)
    content: str | None = None  # OpenAI allows null on an assistant message (one that called tools)
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = None  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required in a {self.role} message")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """OpenAI's list of content parts becomes one string; only text parts are supported."""
        if not isinstance(value, list):
            return value
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text parts {{\"type\": \"text\", \"text\": ...}} are supported; got {kind!r}")
        return "\n".join(part["text"] for part in value)


class ChatCompletionRequest(SamplingFields, BeamSearchFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: true, as OpenAI
    # OpenAI's deprecated forms of tools and tool_choice: rejected when set.
    functions: list[dict] | None = None
    function_call: str | dict | None = None

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _one_tool_choice(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return one_error(value, handler, 'must be "none", "auto", "required" or '
                                         '{"type": "function", "function": {"name": ...}}')


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None  # with messages: offered as a chat request offers them
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


# ---- responses ---------------------------------------------------------------------------------

class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob. prompt_logprobs holds per prompt token {token id: PromptLogprob} (the prompt token and
    the top-N); the first token's is None."""
    logprob: float
    rank: int
    decoded_token: str


def _unset() -> Any:
    """A vLLM extension's response field, left out of the JSON unless the request asked for it."""
    return Field(None, exclude_if=lambda v: v is None)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id that matched
    token_ids: list[int] | None = _unset()  # return_token_ids; in a stream, each chunk's new ones
    prompt_token_ids: list[int] | None = _unset()  # return_token_ids; in a stream, in a choice's first chunk
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None  # always there, as vLLM sends it


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, exclude_if=lambda v: v is None)  # with --reasoning-parser
    tool_calls: list[ChatToolCall] | None = Field(None, exclude_if=lambda v: v is None)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _unset()


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None  # always there, as vLLM sends it
    prompt_token_ids: list[int] | None = _unset()


class DeltaFunctionCall(BaseModel):
    name: str | None = Field(None, exclude_if=lambda v: v is None)
    arguments: str


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: the first carries its id, type and name; later ones append to
    its arguments."""
    index: int
    id: str | None = Field(None, exclude_if=lambda v: v is None)
    type: Literal["function"] | None = Field(None, exclude_if=lambda v: v is None)
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    # OpenAI sends the role only in a choice's first chunk.
    role: str | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = None
    reasoning_content: str | None = Field(None, exclude_if=lambda v: v is None)
    tool_calls: list[DeltaToolCall] | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _unset()


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = _unset()  # return_token_ids: in the stream's first chunk


class CompletionChunk(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "tokenmill"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model, as vLLM lists it
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- OpenAPI declarations ----------------------------------------------------------------------
# Responses the routes declare beyond their return models, for the schema that clients and the fuzz test read.

def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description, **({"headers": headers} if headers else {})}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid request: a bad value, type or JSON body (validation errors included)"),
    401: _error("Missing or incorrect API key"),
    404: _error("Unknown model"),
    500: _error("Internal server error (a bug; the server log has the details under the request id)"),
    503: _error("Overloaded (the queue is full), shutting down, or the engine died; retry later",
                {"Retry-After": {"description": "Seconds to wait before retrying", "required": False,
                                 "schema": {"type": "integer"}}}),
    # Every other client error (405, ...) is the same object. Declaring the range also keeps FastAPI
    # from documenting its 422, which the server never sends: validation errors are 400s.
    "4XX": _error("Other client errors"),
}


def sse_content(*events: type[BaseModel], named: bool = False) -> dict[str, Any]:
    """text/event-stream as OpenAI frames it: `data: <JSON>` events (one of `events`), then `data: [DONE]`;
    named, as Anthropic frames it: each event also has `event: <its type>`, and there is no end marker.

    The events' schemas are inlined: FastAPI lists only the models that routes declare among the
    schema's components, and the chunk models are declared nowhere else.
    """
    schema = TypeAdapter(Union[events]).json_schema(mode="serialization")  # noqa: UP007 - a run-time tuple
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            return inline(defs[node["$ref"].rsplit("/", 1)[1]]) if "$ref" in node else {
                k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": inline(schema)}
    if named:
        item = {"type": "object", "required": ["event", "data"],
                "properties": {"event": {"type": "string"}, "data": json_data}}
    else:
        item = {"type": "object", "required": ["data"],
                "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}
    return {"text/event-stream": {"itemSchema": item}}


def generate_responses(*stream_chunks: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A generate route's responses: the route's JSON model, or with stream=true an event stream of
    chunks (one of `stream_chunks`, and an error event if generation fails after the status line)."""
    return {200: {"description": "The response; with stream=true, an event stream of chunks",
                  "content": sse_content(*stream_chunks, ErrorResponse)}, **ERROR_RESPONSES}
