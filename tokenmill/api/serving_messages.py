"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the chat plumbing.

A request becomes chat messages, tools and SamplingParams (api/messages_request.py), then one engine
request, exactly as a chat completion. Its text goes through the shared output parser, and the parsed
deltas become content blocks (ContentBlocks): the stream's events and the whole message are both
built by the same fold, so a streamed message equals the non-streamed one.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response
from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from tokenmill.engine.core.engine_client import RequestStream

from .auth import bearer_key_check
from .errors_anthropic import MessagesRoute, stream_error
from .messages_request import chat_messages, sampling_fields, shows_thinking, tool_request
from .output_parser import OutputDelta, OutputParser
from .protocol import UsageInfo
from .protocol_anthropic import (
    ERROR_RESPONSES,
    MESSAGES_RESPONSES,
    ContentBlock,
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessageDeltaEvent,
    MessageDeltaUsage,
    MessagesPrompt,
    MessagesRequest,
    MessageStartEvent,
    MessageStopEvent,
    MessageTokensCount,
    SignatureDelta,
    StopReason,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
    Usage,
)
from .serving import OpenAIServing, SSEFraming, cancel_on_disconnect, constraint_field, sse_response

if TYPE_CHECKING:
    from .models import ModelRegistry

# Anthropic's stream framing: named events, no end marker, `event: ping` keep-alives, Anthropic's error event.
_FRAMING = SSEFraming(named=True, done=False, error=stream_error,
                      ping=lambda: ServerSentEvent(data='{"type": "ping"}', event="ping", sep="\n"))


class ContentBlocks:
    """A reply's content blocks, built from its parsed deltas in the order Anthropic streams them: a delta
    extends the open block, or closes it and opens the next (thinking, text, or one tool_use per call).
    `add` and `close` return the stream's events; `blocks` is the message they build."""

    def __init__(self, thinking: bool):
        self.thinking = thinking  # reasoning shown as thinking blocks; otherwise dropped
        self.blocks: list[ContentBlock] = []
        self.made_calls = False
        self._open: str | None = None  # the open block's type
        self._call = -1  # the tool call the open tool_use block holds
        self._input = ""  # and its input so far, as JSON text

    def add(self, delta: OutputDelta) -> list[BaseModel]:
        events: list[BaseModel] = []
        if delta.reasoning and self.thinking:
            events += self._extend("thinking", ThinkingDelta(thinking=delta.reasoning))
        if delta.content:
            events += self._extend("text", TextDelta(text=delta.content))
        for call in delta.tool_calls:
            if call.id is not None:  # a new call: its block starts with an empty input, as Anthropic's do
                events += self.close()
                block = ToolUseBlock(id=f"toolu_{uuid.uuid4().hex[:24]}", name=call.name or "", input={})
                events += self._start(block, block.model_copy(update={"input": {}}))
                self._call, self.made_calls = call.index, True
            assert self._open == "tool_use" and call.index == self._call, "a call's pieces come in order"
            if call.arguments:
                self._input += call.arguments
                events.append(ContentBlockDeltaEvent(index=len(self.blocks) - 1,
                                                     delta=InputJsonDelta(partial_json=call.arguments)))
        return events

    def close(self) -> list[BaseModel]:
        """Close the open block, if any (at a change of block, and at the end of the reply)."""
        if self._open is None:
            return []
        index, events = len(self.blocks) - 1, []
        if self._open == "thinking":  # Anthropic ends each thinking block with its signature; ours is empty
            events.append(ContentBlockDeltaEvent(index=index, delta=SignatureDelta(signature="")))
        elif self._open == "tool_use":
            self.blocks[index].input = _input_object(self._input)
            self._input = ""
        self._open = None
        return [*events, ContentBlockStopEvent(index=index)]

    def _start(self, block: ContentBlock, shown: ContentBlock) -> list[BaseModel]:
        # `shown` is the block as it starts; `block` grows with the deltas.
        self.blocks.append(block)
        self._open = block.type
        return [ContentBlockStartEvent(index=len(self.blocks) - 1, content_block=shown)]

    def _extend(self, kind: str, delta: TextDelta | ThinkingDelta) -> list[BaseModel]:
        events = []
        if self._open != kind:
            events += self.close()
            events += (self._start(TextBlock(text=""), TextBlock(text="")) if kind == "text"
                       else self._start(ThinkingBlock(thinking=""), ThinkingBlock(thinking="")))
        block = self.blocks[-1]
        if kind == "text":
            block.text += delta.text
        else:
            block.thinking += delta.thinking
        return [*events, ContentBlockDeltaEvent(index=len(self.blocks) - 1, delta=delta)]


def _input_object(text: str) -> dict:
    """A tool_use block's input from its JSON text. A call cut off by max_tokens leaves the text incomplete;
    its input is then empty (the stream has already sent the pieces it had)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def stop_reason(finish_reason: str | None, matched: int | str | None,
                made_calls: bool) -> tuple[StopReason, str | None]:
    """(Anthropic's stop_reason, the stop sequence that matched) from how the engine finished."""
    if finish_reason == "length":
        return "max_tokens", None
    if made_calls:
        return "tool_use", None
    if isinstance(matched, str):  # the engine reports a matched stop string as itself, a stop token as its id
        return "stop_sequence", matched
    return "end_turn", None


class ServingMessages:
    """The Messages endpoints over the shared serving plumbing."""

    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    async def _prompt(self, req: MessagesPrompt) -> list[int]:
        return await self.serving.chat_prompt(chat_messages(req), tools=tool_request(req))

    async def count_tokens(self, req: MessagesPrompt) -> MessageTokensCount:
        """The prompt's length as /v1/messages would render it, tools included."""
        return MessageTokensCount(input_tokens=len(await self._prompt(req)))

    async def create(self, req: MessagesRequest, raw: Request) -> Response | Message:
        s, arrival = self.serving, time.time()
        tools = tool_request(req)
        tool_constraint = tools.constraint(s.tool_format.arguments_key) if tools else None
        fields = sampling_fields(req)
        params = s.sampling_params(fields, req.max_tokens, None, tool_constraint, chat=True)
        prompt = await s.chat_prompt(chat_messages(req), tools=tools)
        request_id = raw.state.request_id = f"msg_{uuid.uuid4().hex}"
        streams = await s.start(request_id, [prompt], params, arrival, "messages",
                                "tool_choice" if tool_constraint else constraint_field(fields))
        parser, blocks = s.output_parser(tools), ContentBlocks(shows_thinking(req))
        if req.stream:
            return sse_response(self._events(request_id, streams, parser, blocks), request_id, s.sse_ping_s,
                                streams, _FRAMING)
        finals = await cancel_on_disconnect(raw, s.final_outputs(streams))
        if finals is None:
            return Response(status_code=499)  # the client left; nobody reads this
        final, o = finals[0], finals[0].outputs[0]
        blocks.add(parser.feed(o.text) + parser.finish())
        blocks.close()
        return self._message(request_id, blocks, o.finish_reason, o.stop_reason,
                             Usage(input_tokens=len(final.prompt_token_ids), output_tokens=len(o.token_ids)))

    def _message(self, request_id: str, blocks: ContentBlocks, finish_reason: str | None,
                 matched: int | str | None, usage: Usage) -> Message:
        reason, sequence = stop_reason(finish_reason, matched, blocks.made_calls)
        return Message(id=request_id, model=self.serving.model_name, content=blocks.blocks, stop_reason=reason,
                       stop_sequence=sequence, usage=usage)

    async def _events(self, request_id: str, streams: list[RequestStream], parser: OutputParser,
                      blocks: ContentBlocks) -> AsyncIterator[BaseModel]:
        s, usage = self.serving, UsageInfo()
        start = Message(id=request_id, model=s.model_name, content=[], stop_reason=None, stop_sequence=None,
                        usage=Usage(input_tokens=len(streams[0].prompt_token_ids), output_tokens=0))
        yield MessageStartEvent(message=start)
        finish_reason, matched = None, None
        async for d in s.deltas(streams, 1, False, usage):
            out = parser.feed(d.text)
            if d.finish_reason:
                out += parser.finish()
                finish_reason, matched = d.finish_reason, d.stop_reason
            for event in blocks.add(out):
                yield event
        for event in blocks.close():
            yield event
        reason, sequence = stop_reason(finish_reason, matched, blocks.made_calls)
        yield MessageDeltaEvent(delta=MessageDelta(stop_reason=reason, stop_sequence=sequence),
                                usage=MessageDeltaUsage(input_tokens=usage.prompt_tokens,
                                                        output_tokens=usage.completion_tokens))
        yield MessageStopEvent()


async def _anthropic_headers(
        anthropic_version: Annotated[str | None, Header(description="Accepted; any version is served alike")] = None,
        anthropic_beta: Annotated[str | None, Header(description="Accepted; no beta feature changes a reply")] = None,
) -> None:
    """Anthropic's clients send these on every request."""


def messages_router(models: ModelRegistry, api_key: str | None) -> APIRouter:
    """The two routes, with Anthropic's errors; the API key also goes as `x-api-key`, as Anthropic's clients send it."""
    router = APIRouter(dependencies=[Depends(bearer_key_check(api_key, x_api_key=True)), Depends(_anthropic_headers)],
                       route_class=MessagesRoute, responses=ERROR_RESPONSES)

    @router.post("/v1/messages", response_model=Message, responses=MESSAGES_RESPONSES)
    async def create_message(req: MessagesRequest, raw: Request):
        async with models.using(req.model) as m:
            return await ServingMessages(m.serving).create(req, raw)

    @router.post("/v1/messages/count_tokens")
    async def count_message_tokens(req: MessagesPrompt) -> MessageTokensCount:
        async with models.using(req.model) as m:
            return await ServingMessages(m.serving).count_tokens(req)

    return router
