"""Plumbing shared by /v1/completions and /v1/chat/completions.

request fields -> SamplingParams -> engine requests (one per prompt) -> their output deltas, merged
-> either the final outputs or a stream of per-choice deltas -> SSE events (sse-starlette, with
keep-alive pings while a request waits or prefills). The two endpoints only differ in how they build
the prompt and how they shape a choice. Tokenization and chat templates run on the engine client's
worker pool, never on the event loop or the engine's thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from tokenmill.engine.core.beam_search_stream import BeamSearchStream, beam_search
from tokenmill.engine.core.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineOverloadedError,
    EngineStoppedError,
    RequestFailedError,
    RequestStream,
)
from tokenmill.engine.core.llm_engine import PromptType
from tokenmill.engine.limits import InvalidRequestError
from tokenmill.engine.outputs import PromptLogprobs, RequestOutput
from tokenmill.engine.sampling.beam_search import BeamSearchParams
from tokenmill.engine.sampling.sampling_params import SamplingParams

from .errors import APIError, bad_request
from .metrics import ModelMetrics
from .observe import current_record
from .output_parser import OutputParser
from .protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    PromptLogprob,
    SamplingFields,
    UsageInfo,
)
from .reasoning_parsers import REASONING_PARSERS
from .tool_parsers import TOOL_FORMATS, format_for_template
from .tools import ToolRequest, conversation

T = TypeVar("T")
logger = logging.getLogger("tokenmill.api")

# Request fields that map one to one onto SamplingParams.
_SAMPLING_FIELDS = ("n", "stop", "seed", "temperature", "top_p", "frequency_penalty", "presence_penalty",
                    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                    "skip_special_tokens", "include_stop_str_in_output", "prompt_logprobs",
                    "truncate_prompt_tokens", "truncation_side")


# Fields beam search does not honour, each with the values that ask for nothing (accepted: some clients send them).
_NOT_WITH_BEAM_SEARCH = {"stop": ([],), "stop_token_ids": ([],), "logit_bias": ({},), "top_p": (1.0,),
                         "top_k": (-1, 0), "min_p": (0.0,), "presence_penalty": (0.0,), "frequency_penalty": (0.0,),
                         "repetition_penalty": (1.0,), "min_tokens": (0,), "skip_special_tokens": (True,),
                         "prompt_logprobs": (), "truncate_prompt_tokens": ()}

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_constraint(req: SamplingFields) -> tuple[str, dict] | None:
    """(the request field that gave it, StructuredOutputsParams fields) of the request's output constraint,
    or None. A 400 if more than one field asks for one, or response_format is incomplete."""
    given: list[tuple[str, dict]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        given.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        schema = (rf.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise bad_request("response_format json_schema needs json_schema.schema, a JSON schema object",
                              "response_format")
        given.append(("response_format", {"json": schema}))
    if req.structured_outputs is not None:
        given.append(("structured_outputs", dict(req.structured_outputs)))
    given += [(name, {key: getattr(req, name)}) for name, key in _GUIDED.items() if getattr(req, name) is not None]
    if len(given) > 1:
        raise bad_request(f"give at most one output constraint; got {', '.join(f for f, _ in given)}", given[1][0])
    return given[0] if given else None


def constraint_field(req: SamplingFields) -> str | None:
    """The request field that carries its output constraint (for errors that name it), or None."""
    constraint = structured_constraint(req)
    return constraint[0] if constraint else None


@dataclass
class ChoiceDelta:
    """What one choice gained since the last chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    # On a choice's first delta only: its prompt's token ids, and its prompt logprobs if they were asked for.
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


class OpenAIServing:
    """Holds the engine, the served model's name and the metrics; runs requests for both endpoints."""

    def __init__(self, engine: EngineClient, model_name: str, metrics: ModelMetrics, sse_ping_s: float = 15.0,
                 tool_call_parser: str | None = None, lora_name: str | None = None,
                 reasoning_parser: str | None = None):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.lora_name = lora_name  # the engine's LoRA adapter this model is, or None for the base model
        self._streams: list[RequestStream] = []  # started here; those not finished are in flight
        self.sse_ping_s = sse_ping_s
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        # The format of tool calls in replies: as given, or the one the chat template implies.
        self.tool_format = (TOOL_FORMATS[tool_call_parser]() if tool_call_parser
                            else format_for_template(getattr(self.tokenizer, "chat_template", None)))
        self.reasoning = REASONING_PARSERS[reasoning_parser] if reasoning_parser else None
        self.system_fingerprint = "fp_" + hashlib.sha256(f"tokenmill-{model_name}".encode()).hexdigest()[:10]

    def output_parser(self, tools: ToolRequest | None) -> OutputParser:
        """A parser for one choice of a reply to a request that offers these tools (None: no tools)."""
        reasoning = self.reasoning() if self.reasoning else None
        if tools is None:
            return OutputParser(reasoning=reasoning)
        return OutputParser(tools.parser(self.tool_format), None if tools.parallel else 1, reasoning)

    # ---- request -> engine -----------------------------------------------------------------

    def sampling_params(self, req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        tool_constraint: dict | None = None, chat: bool = False) -> SamplingParams:
        """The request's SamplingParams; tool_constraint: the constraint that forces its tool calls; chat: a
        reply whose reasoning the reasoning parser splits off (completions return the text as it is)."""
        if req.stream and req.prompt_logprobs is not None:  # as vLLM: they would come only with the last chunk
            raise bad_request("prompt_logprobs are not available when stream is true", "prompt_logprobs")
        fields = {name: getattr(req, name) for name in _SAMPLING_FIELDS if getattr(req, name) is not None}
        if req.logit_bias:
            try:
                fields["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
            except ValueError:
                raise bad_request("logit_bias: keys must be token ids (integers as strings)", "logit_bias") from None
        constraint = structured_constraint(req)
        if tool_constraint is not None:
            if constraint is not None:
                raise bad_request(f"{constraint[0]} cannot be combined with a tool_choice that forces a call",
                                  constraint[0])
            constraint = ("tool_choice", tool_constraint)
        if constraint is not None:
            fields["structured_outputs"] = constraint[1]
            if self.reasoning and chat:  # the constraint is the answer's: the reasoning section comes first
                fields["structured_outputs"] = {**constraint[1], "prefix_grammar": self.reasoning().prefix_grammar()}
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **fields)
        except ValueError as e:  # the message starts with the field's name
            param = str(e).split(" ", 1)[0]
            raise bad_request(str(e), param=constraint[0] if param == "structured_outputs" else param) from None

    def beam_search_params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                           logprobs: int | None) -> BeamSearchParams | None:
        """The request's BeamSearchParams (n beams, greedy), or None without use_beam_search. A 400 naming the field
        for what beam search does not honour (logprobs, sampling and penalty settings, stops, output constraints),
        and for length_penalty or early_stopping without it."""
        if not req.use_beam_search:
            for name, default in (("length_penalty", 1.0), ("early_stopping", False)):
                if getattr(req, name) != default:
                    raise bad_request(f"{name} applies only with use_beam_search", name)
            return None
        if logprobs is not None:
            raise bad_request("logprobs are not available with use_beam_search", "logprobs")
        for name, neutral in _NOT_WITH_BEAM_SEARCH.items():
            if getattr(req, name) is not None and getattr(req, name) not in neutral:
                raise bad_request(f"{name} is not supported with use_beam_search", name)
        constraint = structured_constraint(req)
        if constraint is not None:
            raise bad_request(f"{constraint[0]} is not supported with use_beam_search", constraint[0])
        try:
            return BeamSearchParams(
                beam_width=req.n, max_tokens=max_tokens, ignore_eos=bool(req.ignore_eos),
                temperature=req.temperature or 0.0, length_penalty=req.length_penalty,
                include_stop_str_in_output=bool(req.include_stop_str_in_output), early_stopping=req.early_stopping)
        except ValueError as e:  # the message starts with the field's name; the width is the request's n
            param, rule = str(e).split(" ", 1)
            param = "n" if param == "beam_width" else param
            raise bad_request(f"{param} {rule}", param) from None

    async def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                          tools: ToolRequest | None = None) -> list[int]:
        template = getattr(self.tokenizer, "chat_template", None)
        turns, template_tools = conversation(messages, tools, template, self.tool_format)
        try:
            return await self.engine.apply_chat_template(turns, add_generation_prompt, template_tools)
        except InvalidRequestError as e:
            raise bad_request(str(e), e.param) from None

    async def start(self, request_id: str, prompts: list[PromptType], params: SamplingParams | BeamSearchParams,
                    arrival_time: float, prompt_field: str,
                    constraint_field: str | None = None) -> list[RequestStream | BeamSearchStream]:
        """Queue one engine request (or, with BeamSearchParams, start one beam search) per prompt; all are accepted
        or none is. Raises a 400 naming the field for a bad request; overload and a dead or stopping engine go to
        their own handlers (503)."""
        limit = self.engine.limits.max_prompts
        if len(prompts) > limit:
            raise bad_request(f"{prompt_field}: {len(prompts)} prompts given, the limit is {limit}", prompt_field)
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        add = (functools.partial(beam_search, self.engine) if isinstance(params, BeamSearchParams)
               else self.engine.add_request)
        try:
            results = await asyncio.gather(
                *(add(rid, p, params, arrival_time, prompt_field, lora_name=self.lora_name)
                  for rid, p in zip(ids, prompts, strict=True)),
                return_exceptions=True)
        except asyncio.CancelledError:  # the handler was cancelled: requests added already must not run on
            self.engine.abort(ids)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for started in results:
                if not isinstance(started, BaseException):
                    started.abort()
            error = next((e for e in errors if not isinstance(e, ValueError)), errors[0])
            if isinstance(error, ValueError):
                param = getattr(error, "param", None)
                if constraint_field and "structured_outputs" in str(error):  # named by the field the client used
                    param = constraint_field
                raise bad_request(str(error), param=param or prompt_field)
            raise error
        self._streams = [s for s in self._streams if not s.finished] + results
        self._describe(prompts, params, prompt_field)
        return results

    def _describe(self, prompts: list[PromptType], params: SamplingParams | BeamSearchParams,
                  prompt_field: str) -> None:
        """What the request asked for, on its record (for the access log and the trace span)."""
        record = current_record()
        if record is None:
            return
        record.operation = "text_completion" if prompt_field == "prompt" else "chat"
        beams = isinstance(params, BeamSearchParams)
        record.params = {"max_tokens": params.max_tokens, "temperature": params.temperature,
                         "top_p": None if beams else params.top_p, "n": params.beam_width if beams else params.n}
        if record.keep_text:
            record.prompts += [self._prompt_text(p) for p in prompts]

    def _prompt_text(self, prompt: PromptType) -> str:
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt") or prompt.get("prompt_token_ids", [])
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    @property
    def num_in_flight(self) -> int:
        """Requests started here that have not ended."""
        return sum(not s.finished for s in self._streams)

    # ---- engine -> outputs -----------------------------------------------------------------

    async def _tracked(self, index: int, stream: RequestStream) -> AsyncIterator[tuple[int, RequestOutput]]:
        tracker = self.metrics.tracker(stream.request_id)
        try:
            async for out in stream:
                tracker.update(out)
                yield index, out
        finally:
            tracker.close()

    async def outputs(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output delta) from all streams as they come; closing this aborts the rest."""
        if len(streams) == 1:
            async for item in self._tracked(0, streams[0]):
                yield item
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for item in self._tracked(i, stream):
                    queue.put_nowait(item)
            except Exception as e:
                queue.put_nowait(e)

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                remaining -= item[1].finished
                yield item
        finally:
            for task in tasks:  # cancelling a pump aborts its request
                task.cancel()

    async def final_outputs(self, streams: list[RequestStream]) -> list[RequestOutput]:
        """Each request's deltas folded into its whole output. A request that failed in the engine is a
        500 naming it; a dead engine, a 503."""
        finals: list[RequestOutput | None] = [None] * len(streams)
        try:
            async for i, delta in self.outputs(streams):
                if finals[i] is None:
                    finals[i] = RequestOutput.empty(delta)
                finals[i].add(delta)
        except RequestFailedError as e:
            raise APIError(500, str(e), type="server_error") from None
        return finals

    async def deltas(self, streams: list[RequestStream], n: int, with_logprobs: bool,
                     usage: UsageInfo) -> AsyncIterator[ChoiceDelta]:
        """Per-choice increments; choice index = prompt index * n + sample index. Keeps `usage` current."""
        held: dict[int, tuple[list[int], list[dict[int, float]]]] = {}  # tokens whose text is held back
        seen_prompts: set[int] = set()
        started: set[int] = set()  # choices that had their first delta
        prompt_logprobs: dict[int, PromptLogprobs] = {}  # per prompt, once the engine sent them
        async for prompt_index, out in self.outputs(streams):
            if prompt_index not in seen_prompts:
                seen_prompts.add(prompt_index)
                usage.prompt_tokens += len(out.prompt_token_ids)
            if out.prompt_logprobs is not None:
                prompt_logprobs[prompt_index] = out.prompt_logprobs
            for o in out.outputs:
                index = prompt_index * n + o.index
                usage.completion_tokens += len(o.token_ids)
                tokens, entries = held.pop(index, ([], []))
                tokens, entries = tokens + o.token_ids, entries + (o.logprobs or [])
                # Tokens whose text is still held back (a partial character or stop string) wait for
                # the next chunk, unless their logprobs must be reported with them.
                if not (o.text or o.finish_reason or (with_logprobs and tokens)):
                    held[index] = (tokens, entries)
                    continue
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                first = index not in started
                started.add(index)
                # The engine sends a request's prompt logprobs no later than any of its samples' first token.
                yield ChoiceDelta(index, o.text, tokens, entries if o.logprobs is not None else None,
                                  o.finish_reason, o.stop_reason, out.prompt_token_ids if first else None,
                                  prompt_logprobs.get(prompt_index) if first else None)

    # ---- shaping ---------------------------------------------------------------------------

    def token_logprobs(self, token_ids: list[int], entries: list[dict[int, float]], top_n: int) -> list[TokenLogprob]:
        """The chosen token's logprob and the top_n alternatives, with tokens as text."""
        result = []
        for token, entry in zip(token_ids, entries, strict=False):
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
            result.append(TokenLogprob(self.decode_token(token), entry[token],
                                       [(self.decode_token(t), lp) for t, lp in top]))
        return result

    def prompt_logprobs(self, entries: PromptLogprobs) -> list[dict[int, PromptLogprob] | None]:
        """The engine's prompt logprobs in vLLM's JSON shape, each token decoded."""
        return [None if entry is None else
                {t: PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=self.decode_token(t))
                 for t, lp in entry.items()}
                for entry in entries]

    def decode_token(self, token: int) -> str:
        return self.tokenizer.decode([token])

    @staticmethod
    def usage(finals: list[RequestOutput]) -> UsageInfo:
        prompt = sum(len(f.prompt_token_ids) for f in finals)
        completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def check_stream_options(stream: bool, options: object | None) -> None:
    if options is not None and not stream:
        raise bad_request("stream_options: only allowed when stream is true", "stream_options")


def stream_usage_flags(req: SamplingFields) -> tuple[bool, bool]:
    """(final usage chunk, usage on every chunk) from stream_options."""
    opts = req.stream_options
    return (bool(opts and opts.include_usage), bool(opts and opts.include_usage and opts.continuous_usage_stats))


def openai_error(e: Exception, request_id: str) -> ErrorResponse:
    if isinstance(e, EngineOverloadedError):
        return ErrorResponse(error=ErrorInfo(message=str(e), type="server_error", code="overloaded"))
    if isinstance(e, EngineStoppedError | EngineDeadError):
        return ErrorResponse(error=ErrorInfo(message=str(e), type="server_error", code="unavailable"))
    if isinstance(e, RequestFailedError):
        return ErrorResponse(error=ErrorInfo(message=str(e), type="server_error"))
    logger.exception("internal error in request %s", request_id)
    return ErrorResponse(error=ErrorInfo(message=f"internal server error (request id {request_id})",
                                         type="server_error"))


@dataclass(frozen=True)
class SSEFraming:
    """How a stream goes on the wire. OpenAI's (the default): one `data: {json}` event per chunk, then
    `data: [DONE]`, with `: ping` comments. Named (Anthropic's): each event also carries `event: <its
    type field>`; done=False ends the stream without a marker; ping gives a keep-alive event."""

    named: bool = False
    done: bool = True
    ping: Callable[[], ServerSentEvent] | None = None  # None: a `: ping` comment
    # The error event's body for an exception raised after the status line (given the request id).
    error: Callable[[Exception, str], BaseModel] = openai_error


def sse_response(chunks: AsyncGenerator[BaseModel, None], request_id: str, ping_s: float,
                 streams: list[RequestStream], framing: SSEFraming = SSEFraming()) -> EventSourceResponse:
    """The chunks as an event stream (OpenAI's framing by default), with an error event if one occurs,
    and a keep-alive every ping_s seconds so that proxies keep an idle stream open while the request
    waits in the queue or prefills. However the response ends (a client that hangs up, even before
    the first chunk), the engine requests behind `streams` end with it."""
    return EventSourceResponse(_sse_events(chunks, request_id, streams, framing), ping=ping_s, sep="\n",
                               ping_message_factory=framing.ping)


# JSON leaves U+0085, U+2028 and U+2029 raw inside strings, but line readers that follow
# str.splitlines (httpx's iter_lines among them) would cut an event there; escaped, they read the same.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(model: BaseModel) -> str:
    """model as JSON that is one line for every line reader."""
    return model.model_dump_json().translate(_LINE_BREAKS)


async def _sse_events(chunks: AsyncGenerator[BaseModel, None], request_id: str,
                      streams: list[RequestStream], framing: SSEFraming) -> AsyncIterator[dict]:
    # Plain dicts take the response's separator ("\n", as OpenAI's own streams use).
    def event(model: BaseModel) -> dict:
        return {"event": model.type, "data": sse_json(model)} if framing.named else {"data": sse_json(model)}

    try:
        async for chunk in chunks:
            yield event(chunk)
    except Exception as e:  # the status line is already sent: report the error in the stream
        yield event(framing.error(e, request_id))
    finally:
        await chunks.aclose()
        for stream in streams:
            stream.abort()
    if framing.done:
        yield {"data": "[DONE]"}


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; if the client hangs up first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done():  # the client left: let the cancellation (and so the abort) run to its end
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()
