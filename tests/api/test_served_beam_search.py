"""vLLM's use_beam_search through the OpenAI SDK: n distinct beams, best first, the engine's own beam search
(tests/engine/test_beam_search.py checks that against the offline LLM.beam_search and transformers), whole or
streamed as one chunk per beam; what beam search cannot honour is a 400 naming the field."""
from __future__ import annotations

import asyncio
import time

import pytest

from tokenmill.engine.core.beam_search_stream import beam_search
from tokenmill.engine.sampling.beam_search import BeamSearchParams

PROMPT = "The capital of France is"
MSG = [{"role": "user", "content": "What is the capital of France?"}]


def engine_beam_search(engine, prompt, params: BeamSearchParams):
    """The oracle: the engine's beam search, without HTTP."""
    async def go():
        return [out async for out in await beam_search(engine, f"oracle-{time.time_ns()}", prompt, params)][0]

    return asyncio.run(go())


def test_completions_return_n_distinct_beams_best_first_per_prompt(client, model_name, engine):
    r = client.completions.create(model=model_name, prompt=[PROMPT, PROMPT], n=3, max_tokens=6,
                                  extra_body={"use_beam_search": True, "length_penalty": 0.5})
    want = engine_beam_search(engine, PROMPT, BeamSearchParams(3, 6, length_penalty=0.5))
    assert [c.index for c in r.choices] == list(range(6)) and len({c.text for c in r.choices}) == 3
    for i in (0, 3):  # as vLLM numbers them: prompt index * n + beam index
        assert [c.text for c in r.choices[i:i + 3]] == [o.text for o in want.outputs]
        assert [c.finish_reason for c in r.choices[i:i + 3]] == [o.finish_reason for o in want.outputs]
    assert r.usage.completion_tokens == 2 * sum(len(o.token_ids) for o in want.outputs)


def test_chat_streams_the_final_beams(client, model_name, engine):
    chunks = list(client.chat.completions.create(model=model_name, messages=MSG, n=2, max_tokens=10, stream=True,
                                                 extra_body={"use_beam_search": True}))
    text, reasons = {0: "", 1: ""}, {}
    for chunk in chunks:
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    prompt = engine.tokenizer.apply_chat_template(MSG, add_generation_prompt=True, tokenize=True, return_dict=False)
    want = engine_beam_search(engine, list(prompt), BeamSearchParams(2, 10))
    assert [text[0], text[1]] == [o.text for o in want.outputs] and text[0] != text[1]
    assert [reasons[0], reasons[1]] == [o.finish_reason for o in want.outputs]


COMPLETION = {"prompt": PROMPT, "max_tokens": 4, "n": 2, "use_beam_search": True}
CHAT = {"messages": MSG, "max_tokens": 4, "n": 2, "use_beam_search": True}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
    ("/v1/completions", {**COMPLETION, "n": 11}, "n"),
    ("/v1/completions", {**COMPLETION, "temperature": 0.7}, "temperature"),
    ("/v1/completions", {**COMPLETION, "logprobs": 2}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "stop": ["."]}, "stop"),
    ("/v1/completions", {**COMPLETION, "guided_regex": "a+"}, "guided_regex"),
    ("/v1/completions", {**COMPLETION, "length_penalty": 99.0}, "length_penalty"),
    ("/v1/completions", {**COMPLETION, "use_beam_search": False, "length_penalty": 0.5}, "length_penalty"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "n": 11}, "n"),
])
def test_what_beam_search_cannot_honour_is_a_400_naming_the_field(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
