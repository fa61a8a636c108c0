"""Every bad input gets OpenAI's error object and status; none crashes the server or harms others."""
from __future__ import annotations

import threading

import openai
import pytest
from api_helpers import API_KEY, scrape, wait_until

MSG = [{"role": "user", "content": "hi"}]

CASES = [
    # (path, body, status, param, words the message must contain)
    ("/v1/completions", '{"prompt": "hi",', 400, None, "not valid JSON"),
    ("/v1/completions", "[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "valid number"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", ">= 0"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", ">= 1"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k", "top_k"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 2}, 400, "min_tokens", "<= max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "20"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop", "non-empty"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, 400, "seed", "2**63"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias", "token ids"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999999": 1}}, 400, "logit_bias", "vocabulary"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [10**6]}, 400,
     "stop_token_ids", "vocabulary"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 500}}, 400, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": 3}, 400, "frequency_penalty", "[-2, 2]"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "list of token ids"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", "list of token ids"),
    ("/v1/completions", {"prompt": [1, 99999999]}, 400, "prompt", "[0, 49152)"),
    ("/v1/completions", {"prompt": "hi " * 3000}, 400, "prompt", "3001 tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "prompt", "context is 2048"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix", "not supported"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of", "equal to n"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs", "[0, 20]"),
    ("/v1/chat/completions", {"messages": MSG, "prompt_logprobs": -1}, 400, "prompt_logprobs", "[0, 20]"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 0, "stream": True}, 400, "prompt_logprobs", "stream"),
    ("/v1/completions", {"prompt": "hi", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens", ">= 1, or -1"),
    ("/v1/chat/completions", {"messages": MSG, "truncate_prompt_tokens": -2}, 400, "truncate_prompt_tokens",
     ">= 1, or -1"),
    ("/v1/completions", {"prompt": "hi", "truncate_prompt_tokens": "all"}, 400, "truncate_prompt_tokens",
     "valid integer"),
    ("/v1/completions", {"prompt": "hi", "return_token_ids": [1]}, 400, "return_token_ids", "valid boolean"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ("/v1/completions", '{"prompt": "hi", "temperature": Infinity}', 400, "temperature", "finite number"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt", "required"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "", "content": "x"}]}, 400, "messages[0].role", "at least 1"),
    ("/v1/chat/completions", {"messages": MSG, "tool_choice": "always"}, 400, "tool_choice", '"required"'),
    ("/v1/chat/completions", {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice",
     "not among the tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "messages[0]",
     "content is required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", "text parts"),
    ("/v1/chat/completions", {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools[0].function",
     "required"),
    ("/v1/chat/completions", {"messages": MSG, "tool_choice": "required"}, 400, "tool_choice", "needs tools"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_schema"}}, 400,
     "response_format", "json_schema.schema"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "xml"}}, 400,
     "response_format.type", "json_schema"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_schema",
                                                                   "json_schema": {"schema": {"type": "nope"}}}},
     400, "response_format", "Unsupported type"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "(("}, 400, "guided_regex", "Regex parsing error"),
    ("/v1/completions", {"prompt": "hi", "guided_choice": ["a"], "guided_regex": "a"}, 400, "guided_choice",
     "at most one"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"jsn": {}}}, 400, "structured_outputs",
     "unknown fields"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "a" * 70000}, 400, "guided_regex",
     "characters of constraint given, the limit is 65536"),
    ("/v1/completions", {"prompt": "hi", "guided_json": "{not json"}, 400, "guided_json", "not valid JSON"),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "20"),
    ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs", "logprobs to be true"),
    ("/v1/chat/completions", {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens", "1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 3000}]}, 400, "messages", "tokens"),
    ("/tokenize", {"prompt": "a", "messages": MSG}, 400, None, "exactly one"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "vocabulary"),
    ("/v1/nope", {}, 404, None, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,param,words", CASES,
                         ids=[f"{c[0]}-{c[3] or c[4]}" for c in CASES])
def test_bad_input_gets_the_openai_error_object(http, path, body, status, param, words):
    if isinstance(body, str):
        resp = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        resp = http.post(path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]


def test_unknown_fields_are_ignored_with_a_warning_as_vllm_does(client, model_name, caplog):
    with caplog.at_level("WARNING", logger="tokenmill.api"):
        resp = client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "hi", "frobnicate": 1}], max_tokens=2,
            store=False, metadata={"k": "v"}, extra_body={"frobnicate": 2})
    assert resp.usage.completion_tokens == 2
    assert "frobnicate, metadata, store" in caplog.text
    assert "ChatMessage: ignored unknown fields frobnicate" in caplog.text


def test_sdk_raises_typed_errors_with_the_message(client, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt="hi", temperature=-1)
    assert e.value.param == "temperature" and "temperature" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi")
    assert e.value.code == "model_not_found"


def test_bad_requests_do_not_harm_a_request_in_flight(http, client, model_name):
    kw = dict(model=model_name, prompt="The weather today", temperature=0, max_tokens=24)
    want = client.completions.create(**kw).choices[0].text
    result = {}
    worker = threading.Thread(target=lambda: result.update(text=client.completions.create(**kw).choices[0].text))
    worker.start()
    for path, body, status, *_ in CASES:
        if not isinstance(body, str):
            assert http.post(path, json=body).status_code == status
    worker.join()
    assert result["text"] == want
    assert wait_until(lambda: scrape(http, "num_requests_running") == 0 and scrape(http, "kv_cache_usage_perc") == 0)


# ---- API key ---------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}],
                         ids=["missing", "wrong", "no-scheme"])
def test_api_key_is_required_on_v1_and_tokenize(secure_server, headers):
    import httpx

    with httpx.Client(base_url=secure_server.url, headers=headers) as c:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("POST", "/tokenize"), ("POST", "/detokenize")]:
            resp = c.request(method, path, json={})
            assert resp.status_code == 401, path
            assert resp.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_sdk_with_the_right_key_is_served(secure_server):
    good = openai.OpenAI(base_url=secure_server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == ["tm-secure"]
    assert good.completions.create(model="tm-secure", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=secure_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_no_key_configured_means_open(http):
    assert http.get("/v1/models").status_code == 200
