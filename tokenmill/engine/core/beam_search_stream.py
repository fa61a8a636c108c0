"""Beam search through an EngineClient, for the server: sampling/beam_search.py's search, each round's live beams
run as one-token requests (add_request) alongside whatever else the engine serves.

beam_search() checks the request and adds its first round before it returns, so that a bad one is refused
(InvalidRequestError) before a response starts. The BeamSearchStream it returns reads like a RequestStream: one
RequestOutput, the beams best first, once the search ends (vLLM, too, sends a beam search's result whole, streamed
or not).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

from tokenmill.engine.core.engine_client import EngineClient, RequestFailedError, RequestStream
from tokenmill.engine.core.llm_engine import PromptType
from tokenmill.engine.limits import check_prompt
from tokenmill.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.engine.sampling.beam_search import BeamSearch, BeamSearchParams


async def beam_search(client: EngineClient, request_id: str, prompt: PromptType, params: BeamSearchParams,
                      arrival_time: float | None = None, param: str = "prompt",
                      lora_name: str | None = None) -> BeamSearchStream:
    """Check and start a beam search of prompt (see the module docstring). Raises what add_request raises, and
    InvalidRequestError naming "n" (the OpenAI API's name for the width) for a beam width over the limits."""
    arrival_time = arrival_time or time.time()
    search = BeamSearch(await client.prompt_token_ids(prompt, param), params, _eos_token_ids(client),
                        client.max_model_len)
    client.limits.check_beam_width(params.beam_width, len(search.eos), "n")
    check_prompt(search.prompt_token_ids, search.request_params.clone(max_tokens=max(search.max_tokens, 1)),
                 client.model_config.vocab_size, client.max_model_len, param)
    text = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
    stream = BeamSearchStream(client, request_id, search, text, arrival_time, lora_name)
    await stream._add_round()
    return stream


def _eos_token_ids(client: EngineClient) -> set[int]:
    """The ids that end a sequence, as LLMEngine picks them: the model's, and its tokenizer's."""
    eos = set(client.model_config.eos_token_id)
    if client.tokenizer is not None and client.tokenizer.eos_token_id is not None:
        eos.add(client.tokenizer.eos_token_id)
    return eos


class BeamSearchStream:
    """A beam search in flight; iterate it with `async for` for its one RequestOutput. Its rounds go on while it
    is read (unread, it stops after its first); leaving the iteration early (break, cancellation, client
    disconnect) or abort() ends the round in flight."""

    def __init__(self, client: EngineClient, request_id: str, search: BeamSearch, prompt_text: str | None,
                 arrival_time: float, lora_name: str | None):
        self.request_id = request_id
        self.prompt_token_ids = search.prompt_token_ids
        self.finished = False  # no more items will come (the result may still be unread)
        self._client = client
        self._search = search
        self._prompt_text = prompt_text
        self._arrival_time = arrival_time
        self._lora_name = lora_name
        self._rounds = itertools.count()
        self._round: list[RequestStream] = []  # the requests of the round in flight
        self._aborted = False

    def abort(self) -> None:
        """Stop the search (no-op once it ended); its reader gets RequestFailedError."""
        if not self.finished:
            self._aborted = True
            for stream in self._round:
                stream.abort()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            result = await self._search_rounds()
        except BaseException:
            self.abort()  # requests of the round that the reader had not started reading end too
            raise
        finally:
            self.finished = True
        yield result

    async def _add_round(self) -> None:
        """Add this round's requests, all or none."""
        n = next(self._rounds)
        ids = [f"{self.request_id}-beam{n}.{i}" for i in range(len(self._search.beams))]
        client, params = self._client, self._search.request_params
        try:
            results = await asyncio.gather(
                *(client.add_request(rid, p, params, lora_name=self._lora_name)
                  for rid, p in zip(ids, self._search.prompts(), strict=True)),
                return_exceptions=True)
        except asyncio.CancelledError:
            client.abort(ids)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            client.abort(ids)
            raise next((e for e in errors if not isinstance(e, ValueError)), errors[0])
        self._round = results
        self._raise_if_aborted()

    def _raise_if_aborted(self) -> None:
        """An abort that came between two reads of the engine: the round's requests end now."""
        if self._aborted:
            for stream in self._round:
                stream.abort()
            raise RequestFailedError(f"request {self.request_id} was aborted")

    async def _search_rounds(self) -> RequestOutput:
        search = self._search
        while True:
            readers = [asyncio.ensure_future(_top_logprobs(s)) for s in self._round]
            try:
                tops = await asyncio.gather(*readers)
            except BaseException:
                for reader in readers:  # cancelling a reader aborts its request
                    reader.cancel()
                raise
            self._raise_if_aborted()
            search.advance(tops)
            if search.done:
                break
            await self._add_round()
        outputs = []
        for i, seq in enumerate(search.best()):
            text = await self._client.decode(search.text_token_ids(seq), skip_special_tokens=True)
            outputs.append(CompletionOutput(i, text, seq.tokens[len(self.prompt_token_ids):], seq.cum_logprob, None,
                                            seq.finish_reason, seq.stop_reason))
        now = time.time()
        metrics = RequestMetrics(self._arrival_time, first_token_time=now, finished_time=now)
        return RequestOutput(self.request_id, self._prompt_text, self.prompt_token_ids, outputs, True, metrics)


async def _top_logprobs(stream: RequestStream) -> dict[int, float]:
    """The top logprobs of a one-token request's token."""
    final = None
    async for delta in stream:
        final = final or RequestOutput.empty(delta)
        final.add(delta)
    return final.outputs[0].logprobs[0]
