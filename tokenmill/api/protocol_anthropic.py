"""Pydantic models of Anthropic's Messages API (POST /v1/messages and /v1/messages/count_tokens): the
request, the message, the stream's events and the error object, in the shapes the official SDK parses.

As the OpenAI models do, requests ignore unknown fields with a warning (service_tier, container,
mcp_servers, ...); content blocks are a closed set, so an unknown block type is a 400 naming it.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, ValidatorFunctionWrapHandler, field_validator

from .protocol import OpenAIModel, sse_content

# ---- requests ----------------------------------------------------------------------------------


class TextBlockParam(OpenAIModel):
    type: Literal["text"]
    text: str
    cache_control: dict | None = None  # accepted; the prefix cache needs no hints
    citations: list | None = None


class ImageBlockParam(OpenAIModel):
    """Declared so that an image gets a clear 400 from the serving code rather than a schema error."""
    type: Literal["image"]
    source: dict


class ToolUseBlockParam(OpenAIModel):
    """A call the assistant made in an earlier turn."""
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict
    cache_control: dict | None = None


class ToolResultBlockParam(OpenAIModel):
    """The result of an earlier call, in a user turn."""
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlockParam | ImageBlockParam, Field(discriminator="type")]] | None = None
    is_error: bool | None = None
    cache_control: dict | None = None


class ThinkingBlockParam(OpenAIModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlockParam(OpenAIModel):
    type: Literal["redacted_thinking"]
    data: str


ContentBlockParam = Annotated[
    Union[TextBlockParam, ImageBlockParam, ToolUseBlockParam, ToolResultBlockParam,  # noqa: UP007
          ThinkingBlockParam, RedactedThinkingBlockParam], Field(discriminator="type")]
_BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking")


class MessageParam(OpenAIModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlockParam]

    @field_validator("content", mode="wrap")
    @classmethod
    def _known_blocks(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """A block of a type we do not know gets one message naming it, not one per union member."""
        if isinstance(value, list):
            for i, block in enumerate(value):
                kind = block.get("type") if isinstance(block, dict) else None
                if kind not in _BLOCK_TYPES:
                    raise ValueError(f"block {i}: content blocks of type {kind!r} are not supported; "
                                     f"use {', '.join(_BLOCK_TYPES)}")
        return handler(value)


class ToolParam(OpenAIModel):
    """A client tool: its name, what it does, and a JSON schema of its input."""
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict
    type: Literal["custom"] | None = None
    cache_control: dict | None = None


class ToolChoiceAuto(OpenAIModel):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(OpenAIModel):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(OpenAIModel):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(OpenAIModel):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class ThinkingEnabled(OpenAIModel):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1024)  # Anthropic's minimum; the engine does not bound thinking apart


class ThinkingAdaptive(OpenAIModel):
    type: Literal["adaptive"]


class ThinkingDisabled(OpenAIModel):
    type: Literal["disabled"]


ThinkingConfig = Annotated[ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled, Field(discriminator="type")]


class JSONOutputFormat(OpenAIModel):
    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")


class OutputConfig(OpenAIModel):
    format: JSONOutputFormat | None = None  # structured output: the reply is JSON that fits the schema
    effort: str | None = None  # accepted; the engine has one effort


class MessagesPrompt(OpenAIModel):
    """What a prompt is rendered from: the body of /v1/messages/count_tokens. A request without `model`
    goes to the first model served, as on the other routes."""
    model: str | None = None
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlockParam] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(MessagesPrompt):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    output_config: OutputConfig | None = None
    metadata: dict | None = None  # informational only
    service_tier: str | None = None  # informational only: there is one tier


# ---- the message -------------------------------------------------------------------------------

class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict


class ThinkingBlock(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""  # Anthropic's signs its thinking; ours has nothing to sign


ContentBlock = Annotated[TextBlock | ToolUseBlock | ThinkingBlock, Field(discriminator="type")]
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: Usage


class MessageTokensCount(BaseModel):
    input_tokens: int


# ---- stream events -----------------------------------------------------------------------------

class MessageStartEvent(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class ContentBlockStartEvent(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ThinkingDelta(BaseModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class SignatureDelta(BaseModel):
    type: Literal["signature_delta"] = "signature_delta"
    signature: str


class ContentBlockDeltaEvent(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: Annotated[TextDelta | InputJsonDelta | ThinkingDelta | SignatureDelta, Field(discriminator="type")]


class ContentBlockStopEvent(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(BaseModel):
    stop_reason: StopReason | None
    stop_sequence: str | None


class MessageDeltaUsage(BaseModel):
    """Totals so far (not increments), as Anthropic sends them."""
    input_tokens: int
    output_tokens: int


class MessageDeltaEvent(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: MessageDeltaUsage


class MessageStopEvent(BaseModel):
    type: Literal["message_stop"] = "message_stop"


class PingEvent(BaseModel):
    type: Literal["ping"] = "ping"


# ---- errors ------------------------------------------------------------------------------------

ErrorType = Literal["invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                    "request_too_large", "rate_limit_error", "api_error", "overloaded_error"]


class ErrorObject(BaseModel):
    type: ErrorType
    message: str


class ErrorResponse(BaseModel):
    """Anthropic's error body, also the `error` event of a stream that fails after its status line."""
    type: Literal["error"] = "error"
    error: ErrorObject
    request_id: str | None = None


# ---- OpenAPI declarations ----------------------------------------------------------------------

def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description, **({"headers": headers} if headers else {})}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("invalid_request_error: a bad value, type or JSON body, or a request over a limit"),
    401: _error("authentication_error: missing or incorrect API key"),
    404: _error("not_found_error: unknown model"),
    500: _error("api_error: a request that failed inside the engine, or a bug (the log has the request id)"),
    529: _error("overloaded_error: the queue is full, the server is shutting down, or the engine died; "
                "retry later", {"Retry-After": {"description": "Seconds to wait before retrying", "required": False,
                                                "schema": {"type": "integer"}}}),
    "4XX": _error("Other client errors"),
}

MESSAGES_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The message; with stream=true, an event stream of named events",
          "content": sse_content(MessageStartEvent, ContentBlockStartEvent, ContentBlockDeltaEvent,
                                 ContentBlockStopEvent, MessageDeltaEvent, MessageStopEvent, PingEvent,
                                 ErrorResponse, named=True)},
    **ERROR_RESPONSES}

