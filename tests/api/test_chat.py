"""/v1/chat/completions through the official OpenAI SDK, sync and async."""
from __future__ import annotations

import asyncio
import threading

from api_helpers import engine_generate

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]


def chat(client, model_name, **kw):
    kw.setdefault("max_tokens", 6)
    return client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, **kw)


def test_chat_applies_the_template_and_equals_engine_output(client, model_name, engine):
    resp = chat(client, model_name)
    ids = engine.engine.get_tokenizer().apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                            tokenize=True, return_dict=False)
    oracle = engine_generate(engine, list(ids), temperature=0, max_tokens=6)
    assert resp.choices[0].message.content == oracle.outputs[0].text
    assert resp.choices[0].message.role == "assistant"
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == len(oracle.outputs[0].token_ids)


def test_content_parts_equal_a_string(client, model_name):
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name a fruit."}]}]
    resp = client.chat.completions.create(model=model_name, messages=parts, temperature=0, max_tokens=6)
    assert resp.choices[0].message.content == chat(client, model_name).choices[0].message.content


def test_developer_role_is_system_and_assistant_content_may_be_null(client, model_name, http):
    as_system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
                 {"role": "assistant", "content": ""}, {"role": "user", "content": "Name a fruit."}]
    as_openai = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "hi"},
                 {"role": "assistant", "content": None}, {"role": "user", "content": "Name a fruit."}]
    tokens = [http.post("/tokenize", json={"messages": m}).json()["tokens"] for m in (as_system, as_openai)]
    assert tokens[0] == tokens[1]
    resp = client.chat.completions.create(model=model_name, messages=as_openai, temperature=0, max_tokens=2)
    assert resp.usage.prompt_tokens == len(tokens[0])


def test_max_completion_tokens_wins_over_max_tokens(client, model_name):
    resp = chat(client, model_name, max_tokens=8, max_completion_tokens=2)
    assert resp.usage.completion_tokens == 2 and resp.choices[0].finish_reason == "length"


def test_chat_logprobs_and_top_logprobs(client, model_name):
    resp = chat(client, model_name, logprobs=True, top_logprobs=2, max_tokens=4)
    content = resp.choices[0].logprobs.content
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob  # greedy: the best
        assert t.bytes == list(t.token.encode())
    plain = chat(client, model_name, logprobs=True, max_tokens=2).choices[0].logprobs.content
    assert all(t.top_logprobs == [] for t in plain)
    assert chat(client, model_name, max_tokens=2).choices[0].logprobs is None
    assert chat(client, model_name, max_tokens=2, logprobs=False, top_logprobs=0).choices[0].logprobs is None


def test_n_stop_seed_and_response_format_text(client, model_name):
    resp = client.chat.completions.create(model=model_name, messages=MESSAGES, n=3, seed=3, max_tokens=4,
                                          stop=["\n"], response_format={"type": "text"},
                                          frequency_penalty=0.5, presence_penalty=0.5, top_p=0.9)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all("\n" not in c.message.content for c in resp.choices)
    again = client.chat.completions.create(model=model_name, messages=MESSAGES, n=3, seed=3, max_tokens=4,
                                           stop=["\n"], frequency_penalty=0.5, presence_penalty=0.5, top_p=0.9)
    assert [c.message.content for c in again.choices] == [c.message.content for c in resp.choices]


def test_async_client_gets_the_same_answer(async_client, client, model_name):
    async def go():
        async with async_client() as c:
            return await c.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, max_tokens=6)

    resp = asyncio.run(go())
    assert resp.choices[0].message.content == chat(client, model_name).choices[0].message.content


def test_32_concurrent_streams_all_complete_in_shared_batches(async_client, model_name, engine):
    peak = [0]
    done = threading.Event()

    def watch():  # the engine's own view: how many sequences ran in one batch
        while not done.is_set():
            peak[0] = max(peak[0], engine.stats.num_running)
            done.wait(0.005)

    async def one(c, i):
        stream = await c.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=6, stream=True, extra_body={"ignore_eos": True})
        text, reasons = "", []
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                reasons.append(c.finish_reason)
        return text, reasons

    async def go():
        async with async_client() as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(go())
    finally:
        done.set()
        watcher.join()
    assert len(results) == 32
    for text, reasons in results:
        assert text and reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert peak[0] > 8, f"requests did not batch together (peak running {peak[0]})"
