"""`tokenmill serve --speculative-config`: served greedy output equals the server's without speculation,
streamed equals non-streamed, and /metrics counts the drafts."""
from __future__ import annotations

import json

import openai
import pytest
from api_helpers import ServeProcess, scrape

from tokenmill.api.cli import main

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
TEXT = ("Ships pass the old lighthouse at night. Its keeper lights the lamp at dusk and puts it out at dawn. "
        "In winter the storms come from the north and the waves climb the cliff. ")
MESSAGES = [{"role": "user", "content": "Repeat this text word for word:\n\n" + TEXT * 2}]


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory):
    args = ["--dtype", "float32", "--kv-cache-memory", "128MiB", "--max-model-len", "1024",
            "--speculative-config", json.dumps(NGRAM)]
    with ServeProcess(args, tmp_path_factory.mktemp("spec") / "server.log") as server:
        yield server


def test_served_greedy_output_equals_the_server_without_speculation(spec_server, client, model_name):
    spec_client = openai.OpenAI(base_url=f"http://127.0.0.1:{spec_server.port}/v1", api_key="x", max_retries=0,
                                timeout=120)
    served = spec_client.models.list().data[0].id
    for kwargs in ({"prompt": TEXT * 2, "max_tokens": 48}, {"prompt": "The capital of France is", "max_tokens": 16}):
        want = client.completions.create(model=model_name, temperature=0, **kwargs).choices[0]
        got = spec_client.completions.create(model=served, temperature=0, **kwargs).choices[0]
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
    whole = spec_client.chat.completions.create(model=served, messages=MESSAGES, temperature=0, max_tokens=64)
    want = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, max_tokens=64)
    assert whole.choices[0].message.content == want.choices[0].message.content
    stream = spec_client.chat.completions.create(model=served, messages=MESSAGES, temperature=0, max_tokens=64,
                                                 stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole.choices[0].message.content
    http = spec_server.client
    drafted = scrape(http, "spec_decode_num_draft_tokens_total")
    accepted = scrape(http, "spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= drafted
    assert scrape(http, "spec_decode_draft_acceptance_rate") == pytest.approx(accepted / drafted)
    assert scrape(http, "spec_decode_num_accepted_tokens_per_pos_total", 'position="0"') > 0


@pytest.mark.parametrize("value, message", [("{oops", "not valid JSON"), ('{"method": "eagle"}', "method must be"),
                                            ('{"num_speculative_tokens": 99}', "num_speculative_tokens")])
def test_a_bad_speculative_config_stops_serve_with_the_reason(capsys, value, message):
    assert main(["serve", "--speculative-config", value]) == 2
    assert message in capsys.readouterr().err
