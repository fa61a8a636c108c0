"""POST /v1/chat/completions: messages -> the model's chat template -> an assistant message."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from tokenmill.engine.core.engine_client import RequestStream

from .errors import bad_request
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatToolCall,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    TopLogprob,
    UsageInfo,
)
from .serving import (
    OpenAIServing,
    cancel_on_disconnect,
    check_stream_options,
    constraint_field,
    sse_response,
    stream_usage_flags,
)
from .tool_parsers import ToolCall
from .tools import ToolRequest


class ServingChat:
    """The chat endpoint over the shared serving plumbing."""

    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response | ChatCompletionResponse:
        s, arrival = self.serving, time.time()
        _reject_unsupported(req)
        check_stream_options(req.stream, req.stream_options)
        tools = ToolRequest.from_request(req)
        tool_constraint = tools.constraint(s.tool_format.arguments_key) if tools else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = s.beam_search_params(req, max_tokens, logprobs)
        if params is not None and tool_constraint is not None:
            raise bad_request("a tool_choice that forces a call is not supported with use_beam_search", "tool_choice")
        params = params or s.sampling_params(req, max_tokens, logprobs, tool_constraint, chat=True)
        prompt = await s.chat_prompt(req.messages, tools=tools)
        request_id = raw.state.request_id = f"chatcmpl-{uuid.uuid4().hex}"
        field = "tool_choice" if tool_constraint else constraint_field(req)
        streams = await s.start(request_id, [prompt], params, arrival, "messages", field)
        if req.stream:
            return sse_response(self._chunks(req, request_id, streams, tools), request_id, s.sse_ping_s, streams)
        finals = await cancel_on_disconnect(raw, s.final_outputs(streams))
        if finals is None:
            return Response(status_code=499)  # the client left; nobody reads this
        choices = []
        for o in finals[0].outputs:
            reply = s.output_parser(tools).parse(o.text)
            calls = reply.tool_calls
            content = reply.content if reply.content is not None or calls else ""
            message = ChatResponseMessage(content=content, reasoning_content=reply.reasoning,
                                          tool_calls=[_call(c) for c in calls] or None)
            choices.append(ChatChoice(index=o.index, message=message,
                                      logprobs=self._logprobs(req, o.token_ids, o.logprobs),
                                      finish_reason=_finish_reason(o.finish_reason, bool(calls)),
                                      stop_reason=o.stop_reason,
                                      token_ids=o.token_ids if req.return_token_ids else None))
        return ChatCompletionResponse(id=request_id, model=s.model_name, system_fingerprint=s.system_fingerprint,
                                      choices=choices, usage=s.usage(finals),
                                      prompt_logprobs=(s.prompt_logprobs(finals[0].prompt_logprobs)
                                                       if req.prompt_logprobs is not None else None),
                                      prompt_token_ids=finals[0].prompt_token_ids if req.return_token_ids else None)

    async def _chunks(self, req: ChatCompletionRequest, request_id: str, streams: list[RequestStream],
                      tools: ToolRequest | None) -> AsyncIterator[ChatCompletionChunk]:
        s, created, usage = self.serving, int(time.time()), UsageInfo()
        include_usage, continuous = stream_usage_flags(req)

        def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None,
                  prompt_token_ids: list[int] | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, created=created, model=s.model_name,
                                       system_fingerprint=s.system_fingerprint, choices=choices, usage=usage,
                                       prompt_token_ids=prompt_token_ids)

        # As OpenAI does: each choice opens with a chunk that carries only the role (the first, as vLLM's, the
        # prompt's token ids if asked for).
        for i in range(req.n):
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
                        usage.model_copy() if continuous else None,
                        streams[0].prompt_token_ids if req.return_token_ids and i == 0 else None)
        # Each choice's text goes through its output parser; a choice that made calls finishes with them.
        parsers = {i: s.output_parser(tools) for i in range(req.n)}
        made_calls = set()
        async for d in s.deltas(streams, req.n, req.logprobs, usage):
            out = parsers[d.index].feed(d.text)
            if d.finish_reason:
                out += parsers[d.index].finish()
            if out.tool_calls:
                made_calls.add(d.index)
            logprobs = self._logprobs(req, d.token_ids, d.logprobs)
            token_ids = d.token_ids if req.return_token_ids else None
            if not (out or d.finish_reason or logprobs or token_ids):
                continue
            delta = DeltaMessage(content=out.content if out.content or not (out.tool_calls or out.reasoning) else None,
                                 reasoning_content=out.reasoning or None, tool_calls=[
                DeltaToolCall(index=c.index, id=c.id, type="function" if c.id else None,
                              function=DeltaFunctionCall(name=c.name, arguments=c.arguments))
                for c in out.tool_calls] or None)
            choice = ChatChunkChoice(index=d.index, delta=delta, logprobs=logprobs,
                                     finish_reason=_finish_reason(d.finish_reason, d.index in made_calls),
                                     stop_reason=d.stop_reason, token_ids=token_ids)
            yield chunk([choice], usage.model_copy() if continuous else None)
        if include_usage:
            yield chunk([], usage)

    def _logprobs(self, req: ChatCompletionRequest, token_ids: list[int],
                  entries: list[dict[int, float]] | None) -> ChatLogprobs | None:
        if not req.logprobs or entries is None:
            return None
        return ChatLogprobs(content=[
            ChatTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode()),
                             top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in lp.top])
            for lp in self.serving.token_logprobs(token_ids, entries, req.top_logprobs or 0)])


def _call(call: ToolCall) -> ChatToolCall:
    return ChatToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _finish_reason(reason: str | None, made_calls: bool) -> str | None:
    """A reply that ended by itself with tool calls finished to call them."""
    return "tool_calls" if made_calls and reason == "stop" else reason


def _reject_unsupported(req: ChatCompletionRequest) -> None:
    """Fields whose meaning we cannot honour yet: a clear 400 rather than a silently different answer."""
    if req.top_logprobs and not req.logprobs:  # 0 asks for nothing: vLLM accepts it without logprobs
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
