"""Pydantic models of OpenAI's Responses API (POST /v1/responses): the request and its input items, the
response object and its output items, and the events of a streamed response.

Requests take the shared sampling fields (vLLM's extras included, as extra fields); fields the server
cannot honour are declared here and rejected by serving_responses.py. The response models follow
openai-python's `openai.types.responses`, which is what clients parse them into.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from .protocol import OpenAIModel, SamplingFields, one_error

# ---- request: input items ----------------------------------------------------------------------

_TEXT_PARTS = ("input_text", "output_text")


class TextPart(OpenAIModel):
    type: Literal["input_text", "output_text"]
    text: str


def _text_content(value: Any) -> Any:
    """A message's content as one string: given as one, or as text parts joined by newlines."""
    if not isinstance(value, list):
        return value
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValueError(f"only text parts ({', '.join(_TEXT_PARTS)}) with a string text are supported; "
                             f"got {kind!r}")
    return "\n".join(part["text"] for part in value)


# The schema of what _text_content accepts.
TextContent = Annotated[str, BeforeValidator(_text_content, json_schema_input_type=str | list[TextPart])]


class MessageItem(OpenAIModel):
    """A message: the user's, a system or developer instruction, or an earlier assistant reply."""
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: TextContent
    id: str | None = None
    status: str | None = None


class FunctionCallItem(OpenAIModel):
    """An earlier call of a function tool by the model."""
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(OpenAIModel):
    """A function's result, answering the call with the same call_id."""
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: TextContent
    id: str | None = None
    status: str | None = None


class ReasoningInputItem(OpenAIModel):
    """An earlier reply's reasoning, as clients send it back; chat templates drop past reasoning, so it is
    accepted and not rendered."""
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict] = Field(default_factory=list)
    content: list[dict] | None = None
    encrypted_content: str | None = None
    status: str | None = None


def _item_type(value: Any) -> str | None:
    """An item's type; a message may leave it out (OpenAI's EasyInputMessage)."""
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", None)


InputItem = Annotated[(Annotated[MessageItem, Tag("message")]
                       | Annotated[FunctionCallItem, Tag("function_call")]
                       | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                       | Annotated[ReasoningInputItem, Tag("reasoning")]),
                      Discriminator(_item_type, custom_error_type="invalid_item",
                                    custom_error_message="supported items are message, function_call, "
                                                         "function_call_output and reasoning")]


def _input_list(value: Any) -> Any:
    """A string is one user message."""
    return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value


# ---- request: tools, text format and the request -----------------------------------------------

class FunctionTool(OpenAIModel):
    """A function the model may call. Other tool types (web_search, file_search, ...) are not served."""
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class FunctionToolChoice(OpenAIModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """text.format: plain text, any JSON object, or JSON fitting `schema`."""
    # `schema` is the wire name; as a field name it would shadow BaseModel.schema.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, serialize_by_alias=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, exclude_if=lambda v: v is None)
    description: str | None = Field(None, exclude_if=lambda v: v is None)
    schema_: dict | None = Field(None, alias="schema", exclude_if=lambda v: v is None)
    strict: bool | None = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a json_schema format needs schema, a JSON schema object")
        return self


class TextConfig(OpenAIModel):
    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))
    verbosity: Literal["low", "medium", "high"] | None = Field(None, exclude_if=lambda v: v is None)


ToolChoice = Literal["none", "auto", "required"] | FunctionToolChoice
Metadata = dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]]


class ResponsesRequest(SamplingFields):
    """POST /v1/responses. Of the shared sampling fields, n must stay 1 and structured output comes
    through text.format; `include`, `reasoning`, `truncation` and the prompt-cache hints are accepted
    and have no effect."""

    input: Annotated[list[InputItem], BeforeValidator(_input_list, json_schema_input_type=str | list[InputItem]),
                     Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: true, as OpenAI
    text: TextConfig | None = None
    metadata: Metadata | None = Field(None, max_length=16)
    store: bool = True
    previous_response_id: str | None = None
    # Accepted without effect: what to include (logprobs, encrypted reasoning), reasoning effort, how to
    # truncate (a prompt past the context is a 400 either way), prompt-cache and service hints.
    include: list[str] | None = None
    reasoning: dict | None = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    context_management: list[dict] | None = None
    # Declared to be refused: background runs, server-side conversations, stored prompts, a call budget.
    background: bool | None = None
    conversation: str | dict | None = None
    prompt: dict | None = None
    max_tool_calls: int | None = None

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _one_tool_choice(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return one_error(value, handler, 'must be "none", "auto", "required" or {"type": "function", "name": ...}')


# ---- response ----------------------------------------------------------------------------------

class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict] = Field(default_factory=list)
    logprobs: list[dict] = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class OutputReasoning(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[dict] = Field(default_factory=list)
    content: list[ReasoningText]
    status: ItemStatus


OutputItem = Annotated[OutputMessage | OutputFunctionCall | OutputReasoning, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens served from the prefix cache
    cache_write_tokens: int = 0  # explicit prompt caching (prompt_cache_options), which tokenmill has not


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: Literal["server_error"] = "server_error"
    message: str


class Response(BaseModel):
    """The response object; it echoes the request's settings, as OpenAI's does."""
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    model: str
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    output: list[OutputItem]
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str] | None
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float | None
    text: TextConfig
    tool_choice: ToolChoice
    tools: list[FunctionTool]
    top_p: float | None
    background: bool = False
    usage: ResponseUsage | None
    user: str | None


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


# ---- stream events -----------------------------------------------------------------------------

class ResponseLifecycleEvent(BaseModel):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]
    sequence_number: int
    response: Response


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: Annotated[OutputText | ReasoningText, Field(discriminator="type")]


class OutputTextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[dict] = Field(default_factory=list)


class OutputTextDoneEvent(BaseModel):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[dict] = Field(default_factory=list)


class ReasoningTextDeltaEvent(BaseModel):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningTextDoneEvent(BaseModel):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str


class FunctionCallArgumentsDeltaEvent(BaseModel):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(BaseModel):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(BaseModel):
    """A failure outside the request itself (overload, a dead engine, a bug), after the status line."""
    type: Literal["error"] = "error"
    sequence_number: int
    code: str | None
    message: str
    param: str | None = None


StreamEvent = Annotated[(ResponseLifecycleEvent | OutputItemEvent | ContentPartEvent | OutputTextDeltaEvent
                         | OutputTextDoneEvent | ReasoningTextDeltaEvent | ReasoningTextDoneEvent
                         | FunctionCallArgumentsDeltaEvent | FunctionCallArgumentsDoneEvent | ErrorEvent),
                        Field(discriminator="type")]
