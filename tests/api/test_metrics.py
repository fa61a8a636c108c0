"""/metrics' request phases, token counts per request and tokens per engine step (vLLM's names), checked
against what the responses report and against each other."""
from __future__ import annotations

import pytest
from api_helpers import scrape
from prometheus_client import generate_latest

from tokenmill.api.metrics import ServerMetrics
from tokenmill.engine.core.llm_engine import ITERATION_TOKEN_BUCKETS, EngineStats, IterationTokens

PHASES = ["request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
          "request_inference_time_seconds", "e2e_request_latency_seconds"]
SIZES = ["request_prompt_tokens", "request_generation_tokens", "request_max_num_generation_tokens"]
ENGINE = ["prompt_tokens_total", "generation_tokens_total", "iteration_tokens_total_sum",
          "iteration_tokens_total_count"]


def _snapshot(http) -> dict[str, float]:
    values = {}
    for name in PHASES + SIZES:
        for part in ("_sum", "_count"):
            values[name + part] = scrape(http, name + part, default=0.0)
    for name in ENGINE:
        values[name] = scrape(http, name)
    return values


def test_request_phases_and_token_counts(http, client, model_name):
    before = _snapshot(http)
    prompt_tokens = completion_tokens = 0
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]
    for i, prompt in enumerate(prompts):
        r = client.completions.create(model=model_name, prompt=prompt, max_tokens=3 + i, temperature=0)
        prompt_tokens += r.usage.prompt_tokens
        completion_tokens += r.usage.completion_tokens
    chunks = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    usage = [c.usage for c in chunks if c.usage is not None][-1]
    prompt_tokens += usage.prompt_tokens
    completion_tokens += usage.completion_tokens
    after = _snapshot(http)
    diff = {k: after[k] - before[k] for k in after}

    n = len(prompts) + 1
    for name in PHASES + SIZES:
        assert diff[name + "_count"] == n, name
    assert diff["request_prompt_tokens_sum"] == prompt_tokens
    assert diff["request_generation_tokens_sum"] == completion_tokens
    assert diff["request_max_num_generation_tokens_sum"] == completion_tokens  # one sample each

    # The phases partition a request's time in the engine: inference = prefill + decode, and queue + inference
    # is e2e but for the trip from the engine's last step to the server (e2e is taken there, later).
    queue, prefill, decode, inference, e2e = (diff[name + "_sum"] for name in PHASES)
    assert min(queue, prefill, decode) >= 0
    assert inference == pytest.approx(prefill + decode, abs=1e-3)
    assert queue + inference <= e2e + 1e-3
    assert e2e - (queue + inference) < 0.25 * n + 0.25 * e2e  # loose: a busy machine delays the server

    # vLLM's iteration tokens: a sequence's prompt in the step that gives its first token, plus the tokens
    # generated; with one sample per request, over finished requests that is prompt + generated tokens,
    # whatever the prefix cache saved.
    assert diff["prompt_tokens_total"] == prompt_tokens
    assert diff["generation_tokens_total"] == completion_tokens
    assert diff["iteration_tokens_total_sum"] == prompt_tokens + completion_tokens
    # Every request's prefill step and each further token's step: at most one step per generated token.
    assert 1 <= diff["iteration_tokens_total_count"] <= completion_tokens
    assert scrape(http, "iteration_tokens_total_bucket", 'le="+Inf"') == after["iteration_tokens_total_count"]


def test_iteration_tokens_exposition_is_cumulative_per_model():
    counts = [0] * (len(ITERATION_TOKEN_BUCKETS) + 1)
    counts[0], counts[2], counts[-1] = 3, 2, 1  # 1 token; 9-16 tokens; over 16384
    stats = EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, iteration_tokens=IterationTokens(tuple(counts), 3 + 30 + 20000))
    metrics = ServerMetrics(lambda: [(["m", "v1"], stats)])
    text = generate_latest(metrics.registry).decode()
    labels = 'model_name="m",version="v1"'
    assert f'tokenmill:iteration_tokens_total_bucket{{le="1.0",{labels}}} 3.0' in text
    assert f'tokenmill:iteration_tokens_total_bucket{{le="8.0",{labels}}} 3.0' in text
    assert f'tokenmill:iteration_tokens_total_bucket{{le="16.0",{labels}}} 5.0' in text
    assert f'tokenmill:iteration_tokens_total_bucket{{le="16384.0",{labels}}} 5.0' in text
    assert f'tokenmill:iteration_tokens_total_bucket{{le="+Inf",{labels}}} 6.0' in text
    assert f"tokenmill:iteration_tokens_total_count{{{labels}}} 6.0" in text
    assert f"tokenmill:iteration_tokens_total_sum{{{labels}}} 20033.0" in text


def test_ray_replicas_iteration_tokens_are_summed():
    pytest.importorskip("ray")
    from tokenmill.api.ray_client import ReplicaEngineClient, ReplicaLoad

    def stats(counts, tokens, prompt):
        return EngineStats(1, 0, 0.5, 0, 0, 0, prompt, 0, iteration_tokens=IterationTokens(counts, tokens))

    width = len(ITERATION_TOKEN_BUCKETS) + 1
    client = object.__new__(ReplicaEngineClient)  # only its replicas' stats are read
    client.replicas = {"a": ReplicaLoad(1, stats((1,) + (0,) * (width - 1), 1, 5)),
                       "b": ReplicaLoad(1, stats((2, 1) + (0,) * (width - 2), 10, 7)),
                       "c": ReplicaLoad(0, None)}
    total = client.stats
    assert total.iteration_tokens == IterationTokens((3, 1) + (0,) * (width - 2), 11)
    assert (total.prompt_tokens, total.num_running) == (12, 2)
    client.replicas = {}
    assert client.stats.iteration_tokens == IterationTokens()
