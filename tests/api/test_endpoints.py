"""/tokenize, /detokenize, /health, /metrics."""
from __future__ import annotations

from api_helpers import scrape


def test_tokenize_and_detokenize_round_trip(http, engine, model_name):
    tok = engine.engine.get_tokenizer()
    resp = http.post("/tokenize", json={"model": model_name, "prompt": "Hello world"}).json()
    assert resp["tokens"] == tok.encode("Hello world") and resp["count"] == len(resp["tokens"])
    assert resp["max_model_len"] == engine.engine.max_model_len
    back = http.post("/detokenize", json={"model": model_name, "tokens": resp["tokens"]}).json()
    assert back == {"prompt": "Hello world"}


def test_tokenize_messages_uses_the_chat_template(http, engine):
    messages = [{"role": "user", "content": "hi"}]
    want = engine.engine.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                             tokenize=True, return_dict=False)
    assert http.post("/tokenize", json={"messages": messages}).json()["tokens"] == list(want)


def test_health_and_metrics(http, client, model_name):
    assert http.get("/health").status_code == 200
    before = scrape(http, "generation_tokens_total")
    prompt_before = scrape(http, "prompt_tokens_total")
    resp = client.completions.create(model=model_name, prompt="Hello there", max_tokens=3, temperature=0)
    assert scrape(http, "generation_tokens_total") == before + 3
    assert scrape(http, "prompt_tokens_total") == prompt_before + resp.usage.prompt_tokens
    text = http.get("/metrics").text
    for name in ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "request_success_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_sum"]:
        assert f"tokenmill:{name}" in text, name
    assert scrape(http, "request_success_total", 'finished_reason="length"') >= 1
    assert scrape(http, "e2e_request_latency_seconds_count") >= 1
    assert 0 <= scrape(http, "kv_cache_usage_perc") <= 1
