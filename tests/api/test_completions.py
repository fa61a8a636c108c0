"""/v1/completions through the official OpenAI SDK: every field, checked against the engine itself."""
from __future__ import annotations

import pytest
from api_helpers import engine_generate

PROMPT = "The capital of France is"


def greedy(client, model_name, **kw):
    kw.setdefault("max_tokens", 6)
    return client.completions.create(model=model_name, temperature=0, **kw)


def test_models_lists_the_served_model(client, model_name, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [model_name]
    assert models[0].object == "model"
    assert client.models.retrieve(model_name).id == model_name


def test_greedy_completion_equals_engine_output(client, model_name, engine):
    resp = greedy(client, model_name, prompt=PROMPT)
    oracle = engine_generate(engine, PROMPT, temperature=0, max_tokens=6)
    choice = resp.choices[0]
    assert choice.text == oracle.outputs[0].text
    assert choice.finish_reason == "length"
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.model == model_name and resp.system_fingerprint.startswith("fp_") and resp.created > 0
    assert resp.usage.prompt_tokens == len(oracle.prompt_token_ids)
    assert resp.usage.completion_tokens == 6 and resp.usage.total_tokens == resp.usage.prompt_tokens + 6


def test_prompt_forms_give_the_same_text(client, model_name, engine):
    ids = engine.engine.get_tokenizer().encode(PROMPT)
    single = greedy(client, model_name, prompt=PROMPT).choices[0].text
    assert greedy(client, model_name, prompt=ids).choices[0].text == single
    many = greedy(client, model_name, prompt=[PROMPT, "Once upon a time"])
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == single
    many_ids = greedy(client, model_name, prompt=[ids, ids])
    assert [c.text for c in many_ids.choices] == [single, single]
    assert many_ids.usage.prompt_tokens == 2 * len(ids)


def test_n_choices_are_indexed_per_prompt(client, model_name):
    resp = client.completions.create(model=model_name, prompt=["a", "b"], n=2, max_tokens=3, seed=1)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.usage.completion_tokens == 12


def test_echo_prepends_the_prompt(client, model_name):
    plain = greedy(client, model_name, prompt=PROMPT).choices[0].text
    assert greedy(client, model_name, prompt=PROMPT, echo=True).choices[0].text == PROMPT + plain


def test_stop_string_ends_the_text(client, model_name, engine):
    text = engine_generate(engine, PROMPT, temperature=0, max_tokens=6).outputs[0].text
    stop = text.strip()[:2]
    choice = greedy(client, model_name, prompt=PROMPT, stop=[stop]).choices[0]
    assert choice.finish_reason == "stop" and stop not in choice.text
    assert text.startswith(choice.text)
    kept = greedy(client, model_name, prompt=PROMPT, stop=stop,
                  extra_body={"include_stop_str_in_output": True}).choices[0]
    assert kept.text == choice.text + stop


def test_seed_makes_sampling_reproducible(client, model_name):
    def sample(seed):
        return client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, temperature=1.0,
                                         seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_logprobs_report_the_chosen_token_and_top_n(client, model_name, engine):
    resp = greedy(client, model_name, prompt=PROMPT, logprobs=3)
    lp = resp.choices[0].logprobs
    oracle = engine_generate(engine, PROMPT, temperature=0, max_tokens=6, logprobs=3).outputs[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    want = [e[t] for e, t in zip(oracle.logprobs, oracle.token_ids, strict=True)]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy: the best
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_top_logprobs_always_hold_the_sampled_token(client, model_name):
    lp = greedy(client, model_name, prompt=PROMPT, logprobs=0).choices[0].logprobs
    assert lp.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs, strict=False)]
    lp = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, logprobs=1, temperature=2.0,
                                   seed=7).choices[0].logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=False):
        assert top[token] == logprob and 1 <= len(top) <= 2


def test_logit_bias_forces_a_token(client, model_name, http):
    token = http.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"]
    assert len(token) == 1
    choice = greedy(client, model_name, prompt=PROMPT, max_tokens=3, logit_bias={str(token[0]): 100}).choices[0]
    assert choice.text == " banana" * 3


def test_penalties_reach_the_sampler(client, model_name, engine):
    prompt = "List: apple, apple, apple, apple,"
    plain = greedy(client, model_name, prompt=prompt, max_tokens=12).choices[0].text
    assert plain.count("apple") >= 5  # the premise: unpenalized, the model repeats
    for field in ("frequency_penalty", "presence_penalty", "repetition_penalty"):
        value = 1.5 if field == "repetition_penalty" else 2.0
        extra = {field: value}
        got = greedy(client, model_name, prompt=prompt, max_tokens=12, extra_body=extra).choices[0].text
        assert got == engine_generate(engine, prompt, temperature=0, max_tokens=12, **extra).outputs[0].text
        assert got.count("apple") < plain.count("apple"), field


def test_top_p_and_vllm_fields_are_honoured(client, model_name, engine):
    # top_k=1 and a tiny top_p are greedy whatever the temperature.
    want = greedy(client, model_name, prompt=PROMPT).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        got = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=1.5,
                                        extra_body=extra).choices[0].text
        assert got == want, extra
    assert client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=1.5,
                                     top_p=1e-6).choices[0].text == want
    # ignore_eos + min_tokens: exactly max_tokens tokens.
    resp = greedy(client, model_name, prompt=PROMPT, max_tokens=5, extra_body={"ignore_eos": True, "min_tokens": 5})
    assert resp.usage.completion_tokens == 5
    first = engine_generate(engine, PROMPT, temperature=0, max_tokens=1).outputs[0].token_ids[0]
    stopped = greedy(client, model_name, prompt=PROMPT, extra_body={"stop_token_ids": [first]}).choices[0]
    assert stopped.finish_reason == "stop" and stopped.model_extra["stop_reason"] == first
    assert stopped.text == ""


def test_skip_special_tokens_false_shows_them(client, model_name, http):
    eos = http.post("/tokenize", json={"prompt": "<|im_end|>", "add_special_tokens": False}).json()["tokens"]
    choice = greedy(client, model_name, prompt=PROMPT, max_tokens=2, logit_bias={str(eos[0]): 100},
                    extra_body={"ignore_eos": True, "skip_special_tokens": False}).choices[0]
    assert choice.text == "<|im_end|>" * 2
