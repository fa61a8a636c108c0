"""vLLM's request extensions through the OpenAI SDK (extra_body): prompt_logprobs, echo with logprobs,
return_token_ids, truncate_prompt_tokens and truncation_side, streamed and not, checked against the engine
itself."""
from __future__ import annotations

import pytest
from api_helpers import engine_generate, scrape, wait_until

PROMPT = "The capital of France is"
MSG = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def tok(engine):
    return engine.engine.get_tokenizer()


def test_completions_prompt_logprobs_are_the_engines_in_vllms_shape(client, model_name, engine, tok):
    choice = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=1,
                                       extra_body={"prompt_logprobs": 2}).choices[0]
    want = engine_generate(engine, PROMPT, max_tokens=1, prompt_logprobs=2).prompt_logprobs
    got = choice.prompt_logprobs
    assert got[0] is None and len(got) == len(want) == len(tok.encode(PROMPT))
    for entry, ref in zip(got[1:], want[1:], strict=True):
        assert entry == {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": tok.decode([t])}
                         for t, lp in ref.items()}


def test_echo_with_logprobs_covers_the_prompt_streamed_and_not(client, model_name, engine, tok):
    kw = dict(model=model_name, prompt=PROMPT, temperature=0, max_tokens=4, logprobs=2)
    plain = client.completions.create(**kw).choices[0]
    echoed = client.completions.create(**kw, echo=True).choices[0]
    lp, n = echoed.logprobs, len(tok.encode(PROMPT))
    assert echoed.text == PROMPT + plain.text
    assert len(lp.tokens) == n + 4 and lp.tokens[n:] == plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    want = engine_generate(engine, PROMPT, max_tokens=1, prompt_logprobs=2).prompt_logprobs
    ids = tok.encode(PROMPT)
    assert lp.token_logprobs[1:n] == [want[i][ids[i]].logprob for i in range(1, n)]
    assert all(len(top) in (2, 3) for top in lp.top_logprobs[1:])
    assert lp.token_logprobs[n:] == plain.logprobs.token_logprobs
    assert lp.text_offset[n] == len(PROMPT)
    chunks = list(client.completions.create(**kw, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == echoed.text
    assert chunks[0].choices[0].text.startswith(PROMPT)
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.token_logprobs for s in streamed), []) == lp.token_logprobs
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


def test_return_token_ids_on_completions_streamed_and_not(client, model_name, http, tok):
    kw = dict(model=model_name, prompt=PROMPT, temperature=0, max_tokens=5)
    choice = client.completions.create(**kw, extra_body={"return_token_ids": True}).choices[0]
    assert choice.prompt_token_ids == tok.encode(PROMPT)
    assert len(choice.token_ids) == 5 and tok.decode(choice.token_ids) == choice.text
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True, extra_body={"return_token_ids": True})
              if c.choices]
    assert chunks[0].prompt_token_ids == choice.prompt_token_ids
    assert all(getattr(c, "prompt_token_ids", None) is None for c in chunks[1:])  # left out of later chunks
    assert sum((c.token_ids for c in chunks), []) == choice.token_ids
    body = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).json()  # not asked: not there
    assert not {"token_ids", "prompt_token_ids"} & set(body["choices"][0])


def test_chat_prompt_logprobs_and_token_ids_streamed_and_not(client, model_name, tok):
    kw = dict(model=model_name, messages=MSG, temperature=0, max_tokens=5)
    resp = client.chat.completions.create(**kw, extra_body={"prompt_logprobs": 0, "return_token_ids": True})
    n = resp.usage.prompt_tokens
    assert len(resp.prompt_token_ids) == n and len(resp.prompt_logprobs) == n and resp.prompt_logprobs[0] is None
    ids = resp.prompt_token_ids
    assert all(list(e) == [str(t)] for t, e in zip(ids[1:], resp.prompt_logprobs[1:], strict=True))
    choice = resp.choices[0]
    assert len(choice.token_ids) == resp.usage.completion_tokens
    assert tok.decode(choice.token_ids, skip_special_tokens=True) == choice.message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, extra_body={"return_token_ids": True}))
    assert chunks[0].prompt_token_ids == ids
    assert all(getattr(c, "prompt_token_ids", None) is None for c in chunks[1:])
    assert sum((getattr(c.choices[0], "token_ids", None) or [] for c in chunks if c.choices), []) == choice.token_ids


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, model_name, tok, http):
    long = "Once upon a time there was a prompt far longer than it needed to be. " + PROMPT
    choice = client.completions.create(model=model_name, prompt=long, max_tokens=2, echo=True,
                                       extra_body={"truncate_prompt_tokens": 3, "return_token_ids": True}).choices[0]
    assert choice.prompt_token_ids == tok.encode(long)[-3:]
    assert choice.text.startswith(tok.decode(choice.prompt_token_ids))
    chat = client.chat.completions.create(model=model_name, messages=MSG, max_tokens=2,
                                          extra_body={"truncate_prompt_tokens": 4})
    assert chat.usage.prompt_tokens == 4


def test_right_truncation_keeps_the_first_tokens(client, model_name, tok, http):
    long = PROMPT + " and the capital of Italy is Rome, which is a long way from Paris."
    choice = client.completions.create(model=model_name, prompt=long, max_tokens=2, extra_body={
        "truncate_prompt_tokens": 3, "truncation_side": "right", "return_token_ids": True}).choices[0]
    assert choice.prompt_token_ids == tok.encode(long)[:3]
    chat = client.chat.completions.create(model=model_name, messages=MSG, max_tokens=2, extra_body={
        "truncate_prompt_tokens": 4, "truncation_side": "right", "return_token_ids": True})
    whole = http.post("/tokenize", json={"messages": MSG}).json()["tokens"]
    assert chat.prompt_token_ids == whole[:4]
    bad = http.post("/v1/completions", json={"prompt": PROMPT, "truncate_prompt_tokens": 2, "truncation_side": "up"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncation_side"


def test_prompt_logprobs_is_always_in_the_response(http, model_name):
    """As vLLM sends it: null when not asked for, on the chat response and on each completions choice."""
    chat = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 1}).json()
    completion = http.post("/v1/completions", json={"prompt": [PROMPT, PROMPT], "max_tokens": 1}).json()
    assert chat["prompt_logprobs"] is None
    assert [c["prompt_logprobs"] for c in completion["choices"]] == [None, None]
    assert wait_until(lambda: scrape(http, "kv_cache_usage_perc") == 0)  # every block came back
