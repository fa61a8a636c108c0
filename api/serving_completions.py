"""POST /v1/completions: prompts (text or token ids, one or many) -> text, streamed or whole."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from engine.engine_client import RequestStream

from .errors import bad_request
from .protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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


class ServingCompletions:
    """The legacy completions endpoint over the shared serving plumbing."""

    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    async def create(self, req: CompletionRequest, raw: Request) -> Response | CompletionResponse:
        s, arrival = self.serving, time.time()
        s.check_model(req.model)
        if req.suffix is not None:
            raise bad_request("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request(f"best_of is supported only when equal to n ({req.n}); got {req.best_of}", "best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs needs the prompt's logprobs, which tokenmill does not "
                              "compute; drop echo or logprobs", "echo")
        check_stream_options(req.stream, req.stream_options)
        params = s.sampling_params(req, req.max_tokens, req.logprobs)
        prompts = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
        request_id = raw.state.request_id = f"cmpl-{uuid.uuid4().hex}"
        echo = [(p if isinstance(p, str) else await s.engine.decode(p)) if req.echo else "" for p in prompts]
        streams = await s.start(request_id, prompts, params, arrival, "prompt", constraint_field(req))
        if req.stream:
            return sse_response(self._chunks(req, request_id, streams, echo), request_id, s.sse_ping_s, streams)
        finals = await cancel_on_disconnect(raw, s.final_outputs(streams))
        if finals is None:
            return Response(status_code=499)  # the client left; nobody reads this
        choices = [CompletionChoice(index=i * req.n + o.index, text=echo[i] + o.text,
                                    logprobs=self._logprobs(req, o.token_ids, o.logprobs, len(echo[i])),
                                    finish_reason=o.finish_reason, stop_reason=o.stop_reason)
                   for i, final in enumerate(finals) for o in final.outputs]
        return CompletionResponse(id=request_id, model=s.model_name, system_fingerprint=s.system_fingerprint,
                                  choices=sorted(choices, key=lambda c: c.index), usage=s.usage(finals))

    async def _chunks(self, req: CompletionRequest, request_id: str, streams: list[RequestStream],
                      echo: list[str]) -> AsyncIterator[CompletionChunk]:
        s, created, usage = self.serving, int(time.time()), UsageInfo()
        include_usage, continuous = stream_usage_flags(req)
        text_len: dict[int, int] = {}  # per choice: characters sent so far (echo included)

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None) -> CompletionChunk:
            return CompletionChunk(id=request_id, created=created, model=s.model_name,
                                   system_fingerprint=s.system_fingerprint, choices=choices, usage=usage)

        async for d in s.deltas(streams, req.n, req.logprobs is not None, usage):
            prefix = echo[d.index // req.n] if d.index not in text_len else ""
            offset = text_len.get(d.index, 0) + len(prefix)
            text_len[d.index] = offset + len(d.text)
            choice = CompletionChoice(index=d.index, text=prefix + d.text,
                                      logprobs=self._logprobs(req, d.token_ids, d.logprobs, offset),
                                      finish_reason=d.finish_reason, stop_reason=d.stop_reason)
            yield chunk([choice], usage.model_copy() if continuous else None)
        if include_usage:
            yield chunk([], usage)

    def _logprobs(self, req: CompletionRequest, token_ids: list[int], entries: list[dict[int, float]] | None,
                  offset: int) -> CompletionLogprobs | None:
        if req.logprobs is None or entries is None:
            return None
        result = CompletionLogprobs()
        for lp in self.serving.token_logprobs(token_ids, entries, req.logprobs):
            result.tokens.append(lp.token)
            result.token_logprobs.append(lp.logprob)
            # As OpenAI documents: the sampled token is always there, so there may be logprobs + 1.
            result.top_logprobs.append({**dict(lp.top), lp.token: lp.logprob})
            result.text_offset.append(offset)
            offset += len(lp.token)
        return result

