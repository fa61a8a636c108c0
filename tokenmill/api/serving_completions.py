"""POST /v1/completions: prompts (text or token ids, one or many) -> text, streamed or whole."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from tokenmill.engine.core.engine_client import RequestStream
from tokenmill.engine.core.llm_engine import PromptType
from tokenmill.engine.outputs import PromptLogprobs

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
        if req.suffix is not None:
            raise bad_request("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request(f"best_of is supported only when equal to n ({req.n}); got {req.best_of}", "best_of")
        check_stream_options(req.stream, req.stream_options)
        params = s.beam_search_params(req, req.max_tokens, req.logprobs)
        if params is None:
            params = s.sampling_params(req, req.max_tokens, req.logprobs)
            if req.echo and req.logprobs is not None and params.prompt_logprobs is None:
                params = params.clone(prompt_logprobs=req.logprobs)  # the echoed prompt's logprobs, as vLLM does
        prompts = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
        request_id = raw.state.request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await s.start(request_id, prompts, params, arrival, "prompt", constraint_field(req))
        if req.stream:
            return sse_response(self._chunks(req, request_id, prompts, streams), request_id, s.sse_ping_s, streams)
        finals = await cancel_on_disconnect(raw, s.final_outputs(streams))
        if finals is None:
            return Response(status_code=499)  # the client left; nobody reads this
        ids = req.return_token_ids
        choices = []
        for i, final in enumerate(finals):
            echo = await self._echo(req, prompts[i], final.prompt_token_ids)
            prompt_logprobs = s.prompt_logprobs(final.prompt_logprobs) if req.prompt_logprobs is not None else None
            for o in final.outputs:
                logprobs = self._logprobs(req, o.token_ids, o.logprobs, len(echo),
                                          (final.prompt_token_ids, final.prompt_logprobs) if echo else None)
                choices.append(CompletionChoice(
                    index=i * req.n + o.index, text=echo + o.text, logprobs=logprobs,
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason, token_ids=o.token_ids if ids else None,
                    prompt_token_ids=final.prompt_token_ids if ids else None, prompt_logprobs=prompt_logprobs))
        return CompletionResponse(id=request_id, model=s.model_name, system_fingerprint=s.system_fingerprint,
                                  choices=sorted(choices, key=lambda c: c.index), usage=s.usage(finals))

    async def _chunks(self, req: CompletionRequest, request_id: str, prompts: list[PromptType],
                      streams: list[RequestStream]) -> AsyncIterator[CompletionChunk]:
        s, created, usage = self.serving, int(time.time()), UsageInfo()
        include_usage, continuous = stream_usage_flags(req)
        text_len: dict[int, int] = {}  # per choice: characters sent so far (echo included)
        echo: dict[int, str] = {}  # per prompt, once its first choice starts
        ids = req.return_token_ids

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None) -> CompletionChunk:
            return CompletionChunk(id=request_id, created=created, model=s.model_name,
                                   system_fingerprint=s.system_fingerprint, choices=choices, usage=usage)

        async for d in s.deltas(streams, req.n, req.logprobs is not None, usage):
            prefix = ""
            if d.prompt_token_ids is not None:  # the choice's first chunk: the echo goes first
                i = d.index // req.n
                if i not in echo:
                    echo[i] = await self._echo(req, prompts[i], d.prompt_token_ids)
                prefix = echo[i]
            offset = text_len.get(d.index, 0) + len(prefix)
            text_len[d.index] = offset + len(d.text)
            logprobs = self._logprobs(req, d.token_ids, d.logprobs, offset,
                                      (d.prompt_token_ids, d.prompt_logprobs) if prefix else None)
            choice = CompletionChoice(index=d.index, text=prefix + d.text, logprobs=logprobs,
                                      finish_reason=d.finish_reason, stop_reason=d.stop_reason,
                                      token_ids=d.token_ids if ids else None,
                                      prompt_token_ids=d.prompt_token_ids if ids else None)
            yield chunk([choice], usage.model_copy() if continuous else None)
        if include_usage:
            yield chunk([], usage)

    async def _echo(self, req: CompletionRequest, prompt: PromptType, prompt_token_ids: list[int]) -> str:
        """The prompt as echoed: the client's text, or the ids the engine got decoded (ids were given, or the
        text was truncated)."""
        if not req.echo:
            return ""
        if isinstance(prompt, str) and req.truncate_prompt_tokens is None:
            return prompt
        return await self.serving.engine.decode(prompt_token_ids)

    def _logprobs(self, req: CompletionRequest, token_ids: list[int], entries: list[dict[int, float]] | None,
                  offset: int, echoed: tuple[list[int], PromptLogprobs] | None = None
                  ) -> CompletionLogprobs | None:
        """OpenAI's logprobs of token_ids, the first at text offset `offset`. With echo, `echoed` (the prompt's
        ids and logprobs) comes first, from offset 0; its first token has no logprob, as in OpenAI's."""
        if req.logprobs is None or entries is None:
            return None
        result = CompletionLogprobs()
        if echoed is not None:
            prompt_ids, prompt_entries = echoed
            first = self.serving.decode_token(prompt_ids[0])
            result.tokens.append(first)
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            result.text_offset.append(0)
            floats = [{t: lp.logprob for t, lp in e.items()} for e in prompt_entries[1:]]
            self._add(result, prompt_ids[1:], floats, len(first), req.logprobs)
        self._add(result, token_ids, entries, offset, req.logprobs)
        return result

    def _add(self, result: CompletionLogprobs, token_ids: list[int], entries: list[dict[int, float]], offset: int,
             top_n: int) -> None:
        for lp in self.serving.token_logprobs(token_ids, entries, top_n):
            result.tokens.append(lp.token)
            result.token_logprobs.append(lp.logprob)
            # As OpenAI documents: the sampled token is always there, so there may be logprobs + 1.
            result.top_logprobs.append({**dict(lp.top), lp.token: lp.logprob})
            result.text_offset.append(offset)
            offset += len(lp.token)
