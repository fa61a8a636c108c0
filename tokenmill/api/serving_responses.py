"""POST /v1/responses (OpenAI's Responses API) over the shared serving plumbing.

input items (after a stored conversation, with previous_response_id) -> chat messages with tool calls
and tool results -> the chat template -> one engine request -> its text through the output parser ->
output items (responses_output.py), whole or as the API's stream events. Stored responses
(response_store.py) serve GET and DELETE and continue conversations.
"""
from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response as HTTPResponse
from pydantic import BaseModel

from tokenmill.engine.core.engine_client import RequestFailedError, RequestStream

from .errors import APIError, bad_request
from .protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    ChatToolCall,
    ErrorResponse,
    FunctionCall,
    FunctionDefinition,
    FunctionName,
    NamedToolChoice,
    ResponseFormat,
    generate_responses,
)
from .protocol_responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolChoice,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputFunctionCall,
    OutputMessage,
    OutputTokensDetails,
    Response,
    ResponseDeleted,
    ResponseError,
    ResponsesRequest,
    ResponseUsage,
    StreamEvent,
    TextConfig,
)
from .response_store import ResponseStore
from .responses_output import ResponseOutput
from .serving import OpenAIServing, SSEFraming, cancel_on_disconnect, constraint_field, openai_error, sse_response
from .tools import ToolRequest

if TYPE_CHECKING:
    from .models import ModelRegistry


class ServingResponses:
    """The Responses endpoint of one served model; the store is the server's."""

    def __init__(self, serving: OpenAIServing, store: ResponseStore):
        self.serving = serving
        self.store = store

    async def create(self, req: ResponsesRequest, raw: Request) -> HTTPResponse | Response:
        s, arrival = self.serving, time.time()
        _reject_unsupported(req)
        history = []
        if req.previous_response_id is not None:
            previous = self.store.get(req.previous_response_id)
            if previous is None:
                raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found.",
                               param="previous_response_id", code="previous_response_not_found")
            history = previous.conversation
        conversation = history + req.input
        tools = _tool_request(req)
        tool_constraint = tools.constraint(s.tool_format.arguments_key) if tools else None
        text = req.text or TextConfig()
        fields = req.model_copy(update={"response_format": _response_format(text)})
        if tool_constraint and fields.response_format.type != "text":
            raise bad_request("text.format cannot be combined with a tool_choice that forces a call", "text.format")
        try:
            params = s.sampling_params(fields, req.max_output_tokens, None, tool_constraint, chat=True)
            prompt = await s.chat_prompt(chat_messages(req.instructions, conversation), tools=tools)
            request_id = raw.state.request_id = f"resp_{uuid.uuid4().hex}"
            field = "tool_choice" if tool_constraint else constraint_field(fields)
            streams = await s.start(request_id, [prompt], params, arrival, "input", field)
        except APIError as e:
            raise _renamed(e) from None
        turn = _Turn(self, req, request_id, int(arrival), text, tools, conversation)
        if req.stream:
            return sse_response(turn.events(streams), request_id, s.sse_ping_s, streams, sse_framing(turn.out))
        finals = await cancel_on_disconnect(raw, s.final_outputs(streams))
        if finals is None:
            return HTTPResponse(status_code=499)  # the client left; nobody reads this
        final, completion = finals[0], finals[0].outputs[0]
        parser = s.output_parser(tools)
        turn.out.add(parser.feed(completion.text) + parser.finish())
        turn.out.finish(completion.finish_reason == "length")
        return await turn.finished(len(final.prompt_token_ids), len(completion.token_ids),
                                   final.num_cached_tokens, completion.finish_reason)


class _Turn:
    """One request's response object: its settings, and its end (usage, status, storing)."""

    def __init__(self, endpoint: ServingResponses, req: ResponsesRequest, response_id: str, created_at: int,
                 text: TextConfig, tools: ToolRequest | None, conversation: list):
        self.endpoint, self.req, self.text, self.tools, self.conversation = endpoint, req, text, tools, conversation
        self.out = ResponseOutput()
        self.response = Response(
            id=response_id, created_at=created_at, model=endpoint.serving.model_name, status="in_progress",
            output=[], instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            metadata=req.metadata, parallel_tool_calls=req.parallel_tool_calls is not False,
            previous_response_id=req.previous_response_id, store=req.store, temperature=req.temperature,
            text=text, tool_choice=req.tool_choice or "auto", tools=req.tools or [],
            top_p=req.top_p, usage=None, user=req.user)

    async def events(self, streams: list[RequestStream]) -> AsyncIterator[BaseModel]:
        """The stream: created, in_progress, the output's events, then completed, incomplete or failed."""
        s, out = self.endpoint.serving, self.out
        yield out.lifecycle("created", self.response)
        yield out.lifecycle("in_progress", self.response)
        parser = s.output_parser(self.tools)
        prompt_tokens = output_tokens = cached_tokens = 0
        finish_reason = None
        try:
            async for _, delta in s.outputs(streams):
                prompt_tokens, cached_tokens = len(delta.prompt_token_ids), delta.num_cached_tokens
                for o in delta.outputs:
                    output_tokens += len(o.token_ids)
                    finish_reason = o.finish_reason
                    parsed = parser.feed(o.text)
                    if o.finish_reason:
                        parsed += parser.finish()
                    for event in out.add(parsed):
                        yield event
        except RequestFailedError as e:  # this request alone failed in the engine
            self.response.status, self.response.output = "failed", out.items
            self.response.error = ResponseError(message=str(e))
            yield out.lifecycle("failed", self.response)
            return
        for event in out.finish(finish_reason == "length"):
            yield event
        response = await self.finished(prompt_tokens, output_tokens, cached_tokens, finish_reason)
        yield out.lifecycle(response.status, response)

    async def finished(self, prompt_tokens: int, output_tokens: int, cached_tokens: int,
                       finish_reason: str | None) -> Response:
        """The whole response, stored if the request asked for it."""
        out = self.out
        reasoning = "".join(part.text for item in out.items if item.type == "reasoning" for part in item.content)
        reasoning_tokens = len(await self.endpoint.serving.engine.encode(reasoning, add_special_tokens=False)
                               ) if reasoning else 0
        incomplete = finish_reason == "length"
        response = self.response.model_copy(update=dict(
            status="incomplete" if incomplete else "completed", output=out.items,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            usage=ResponseUsage(input_tokens=prompt_tokens,
                                input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens),
                                output_tokens=output_tokens,
                                output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens),
                                total_tokens=prompt_tokens + output_tokens)))
        if self.req.store:
            self.endpoint.store.put(response, self.conversation + [_as_input(item) for item in out.items
                                                                   if item.type != "reasoning"])
        return response


def chat_messages(instructions: str | None, items: list) -> list[ChatMessage]:
    """Input items as chat messages: instructions as the system message first, a function_call as a tool
    call of the assistant turn it follows (or of a turn of its own), a function_call_output as a tool
    message. Reasoning items are left out: chat templates drop past reasoning."""
    messages = [ChatMessage(role="system", content=instructions)] if instructions is not None else []
    for item in items:
        if isinstance(item, MessageItem):
            messages.append(ChatMessage(role=item.role, content=item.content))
        elif isinstance(item, FunctionCallItem):
            call = ChatToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            if not (messages and messages[-1].role == "assistant"):
                messages.append(ChatMessage(role="assistant", content=None))
            messages[-1].tool_calls = [*(messages[-1].tool_calls or []), call]
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(ChatMessage(role="tool", content=item.output, tool_call_id=item.call_id))
    return messages


def _tool_request(req: ResponsesRequest) -> ToolRequest | None:
    """The request's tools and tool choice, checked as chat's are (the fields have the same names)."""
    choice = req.tool_choice
    if isinstance(choice, FunctionToolChoice):
        choice = NamedToolChoice(type="function", function=FunctionName(name=choice.name))
    tools = [ChatTool(type="function", function=FunctionDefinition(
        name=t.name, description=t.description, parameters=t.parameters, strict=t.strict)) for t in req.tools or []]
    return ToolRequest.from_request(ChatCompletionRequest.model_construct(
        tools=tools or None, tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls, functions=None,
        function_call=None))


def _as_input(item: OutputMessage | OutputFunctionCall) -> MessageItem | FunctionCallItem:
    """An output item as the input item a continuation renders."""
    if isinstance(item, OutputMessage):
        return MessageItem(role="assistant", content="".join(part.text for part in item.content), id=item.id)
    return FunctionCallItem(type="function_call", call_id=item.call_id, name=item.name, arguments=item.arguments,
                            id=item.id)


def _response_format(text: TextConfig) -> ResponseFormat:
    """text.format as chat's response_format, which the shared structured outputs enforce."""
    fmt = text.format
    if fmt.type != "json_schema":
        return ResponseFormat(type=fmt.type)
    return ResponseFormat(type="json_schema", json_schema={"name": fmt.name, "schema": fmt.schema_})


# The chat request's field names that the shared plumbing's errors use, as the Responses API names them.
_FIELD_NAMES = {"messages": "input", "response_format": "text.format", "max_tokens": "max_output_tokens"}
_FIELD_NAME = re.compile(rf"\b({'|'.join(_FIELD_NAMES)})\b")


def _renamed(error: APIError) -> APIError:
    """An error from the shared plumbing, in the Responses API's field names."""
    error.message = _FIELD_NAME.sub(lambda m: _FIELD_NAMES[m.group(1)], error.message)
    error.param = _FIELD_NAMES.get(error.param, error.param)
    return error


def _reject_unsupported(req: ResponsesRequest) -> None:
    """Fields whose meaning we cannot honour: a clear 400 rather than a silently different answer."""
    refused = [("background", req.background, "background responses are not supported; leave background unset "
                                              "or false"),
               ("conversation", req.conversation, "conversations are not supported; continue one with "
                                                  "previous_response_id"),
               ("prompt", req.prompt, "stored prompt templates are not supported; send instructions and input"),
               ("max_tool_calls", req.max_tool_calls, "max_tool_calls is not supported; use parallel_tool_calls: "
                                                      "false for at most one call"),
               ("response_format", req.response_format, "the Responses API takes text.format, not response_format"),
               ("prompt_logprobs", req.prompt_logprobs, "prompt_logprobs are not available in the Responses API"),
               ("return_token_ids", req.return_token_ids, "return_token_ids is not available in the Responses API")]
    for field, value, message in refused:
        if value:
            raise bad_request(message, field)
    if req.n != 1:
        raise bad_request("n: a response has one reply; n must be 1", "n")


def sse_framing(out: ResponseOutput) -> SSEFraming:
    """The Responses API's stream framing: events named by their type, errors as its numbered `error` event,
    and no `[DONE]` (the stream ends with its terminal event, as OpenAI's does)."""
    return SSEFraming(named=True, done=False,
                      error=lambda e, request_id: out.error(openai_error(e, request_id).error))


def add_responses_routes(api: APIRouter, models: ModelRegistry, responses_store: ResponseStore) -> None:
    """POST /v1/responses and the stored responses' GET, DELETE and cancel, on the OpenAI routes' router."""

    @api.post("/v1/responses", response_model=Response, responses=generate_responses(StreamEvent))
    async def create_response(req: ResponsesRequest, raw: Request):
        async with models.using(req.model) as m:
            return await ServingResponses(m.serving, responses_store).create(req, raw)

    def stored(response_id: str) -> Response:
        entry = responses_store.get(response_id)
        if entry is None:
            raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id",
                           code="not_found")
        return entry.response

    unknown_response = {404: {"model": ErrorResponse, "description": "No stored response has this id"}}

    @api.get("/v1/responses/{response_id}", responses=unknown_response)
    async def retrieve_response(response_id: str) -> Response:
        return stored(response_id)

    @api.delete("/v1/responses/{response_id}", responses=unknown_response)
    async def delete_response(response_id: str) -> ResponseDeleted:
        stored(response_id)
        responses_store.delete(response_id)
        return ResponseDeleted(id=response_id)

    @api.post("/v1/responses/{response_id}/cancel", responses={
        **unknown_response, 400: {"model": ErrorResponse, "description": "Only background responses can be "
                                  "cancelled, and this server runs none"}})
    async def cancel_response(response_id: str) -> Response:
        stored(response_id)
        raise bad_request("Cannot cancel a synchronous response.")
