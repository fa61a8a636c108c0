"""The speculative benchmark without servers: workloads, configs, plan, acceptance and table arithmetic."""

import math
import re

import pytest

from benchmarks import speculative
from benchmarks.self_draft import _GGUF_LAYER, hf_config, keeps
from benchmarks.spec_configs import BY_NAME, CONFIGS, DEFAULT_CONFIGS, pick, server_command
from benchmarks.spec_report import (
    acceptance_rate,
    counter_deltas,
    llama_deltas,
    markdown_table,
    parse_prometheus,
    point_row,
    targets,
)
from benchmarks.spec_texts import EDITS, FUNCTIONS, PARAGRAPHS, RENAMES
from benchmarks.spec_workloads import GROUNDED_MAX_TOKENS, WORKLOADS, make_requests


@pytest.mark.parametrize("workload", WORKLOADS)
def test_workloads_are_seeded_and_well_formed(workload):
    a = make_requests(workload, 32, seed=0)
    assert a == make_requests(workload, 32, seed=0)
    assert a != make_requests(workload, 32, seed=1)
    assert len(a) == 32 and all(r.prompt.strip() for r in a)
    # A 2,048-token context holds the prompt and the reply (about 1.4 tokens a word, generously).
    assert max(len(r.prompt.split()) for r in a) * 1.4 + 512 < 2048
    if workload == "chat":
        assert len({r.prompt for r in a}) == 32


def test_grounded_tasks_copy_from_their_prompt():
    reqs = make_requests("grounded", 30, seed=3)
    assert {r.task for r in reqs} == {"rewrite", "refactor", "quote"}
    assert all(r.max_tokens == GROUNDED_MAX_TOKENS for r in reqs)
    for r in reqs:
        if r.task == "rewrite":
            word = re.search(r'replace every "([^"]+)"', r.prompt).group(1)
            passage = r.prompt.split("\n\n", 1)[1]
            assert re.search(rf"\b{word}\b", passage, re.IGNORECASE)
            assert 250 <= len(passage.split()) <= 350
        elif r.task == "refactor":
            old = re.search(r"rename the variable `(\w+)`", r.prompt).group(1)
            assert re.search(rf"\b{old}\b", r.prompt.split("```python", 1)[1])
        else:
            a, b = re.findall(r'"([^"]+)"', r.prompt.rsplit("\n\n", 1)[1])
            assert f"## {a}\n" in r.prompt and f"## {b}\n" in r.prompt


def test_texts_fit_their_tasks():
    assert all(any(re.search(rf"\b{w}\b", t, re.IGNORECASE) for w, _ in EDITS) for _, t in PARAGRAPHS)
    assert len(FUNCTIONS) == len(RENAMES)
    for source, renames in zip(FUNCTIONS, RENAMES, strict=True):
        assert 35 <= len(source.splitlines()) <= 45
        compile(source, "<workload>", "exec")
        assert all(re.search(rf"\b{old}\b", source) for old, _ in renames)


def test_greedy_cap_can_be_left_to_the_server():
    assert {r.max_tokens for r in make_requests("greedy", 3, greedy_max_tokens=None)} == {None}
    assert "max_tokens" not in speculative.chat_payload(make_requests("greedy", 1, greedy_max_tokens=None)[0], "m")


def test_configs_and_commands():
    assert set(DEFAULT_CONFIGS) <= set(BY_NAME)
    for c in CONFIGS:
        assert c.baseline is None or BY_NAME[c.baseline].baseline is None
    assert [c.name for c in pick("tm-gguf,llama,tm-gguf")] == ["tm-gguf", "llama"]
    with pytest.raises(ValueError):
        pick("nope")
    argv = server_command(BY_NAME["tm-gguf-draft-k3"], model="m.gguf", port=9, concurrency=4, draft_hf="/d")
    spec = argv[argv.index("--speculative-config") + 1]
    assert '"model": "/d"' in spec and '"num_speculative_tokens": 3' in spec
    llama = server_command(BY_NAME["llama-draft-k3"], model="m.gguf", port=9, concurrency=4, draft_gguf="/d.gguf",
                           llama_server="/bin/ls")
    assert llama[:2] == ["/bin/ls", "-m"] and "/d.gguf" in llama
    assert llama[llama.index("-np") + 1] == "4" and llama[llama.index("-c") + 1] == "8192"


def test_plan_filters_the_default_points():
    points = speculative.plan(WORKLOADS, None, speculative.DEFAULT_REQUESTS)
    assert [(p.workload, p.concurrency, p.num_requests) for p in points] == [
        ("grounded", 1, 4), ("grounded", 4, 8), ("grounded", 32, 32), ("chat", 1, 4), ("chat", 32, 32),
        ("greedy", 1, 2)]
    assert [(p.workload, p.concurrency) for p in speculative.plan(["chat", "greedy"], [1], {})] == [
        ("chat", 1), ("greedy", 1)]


def test_self_draft_keeps_the_first_layers():
    assert keeps("model.embed_tokens.weight", 2) and keeps("model.layers.1.mlp.up_proj.weight", 2)
    assert not keeps("model.layers.2.mlp.up_proj.weight", 2)
    assert keeps("blk.0.attn_q.weight", 1, _GGUF_LAYER) and not keeps("blk.10.attn_q.weight", 2, _GGUF_LAYER)

    class Cfg:
        architecture, vocab_size, hidden_size, intermediate_size = "LlamaForCausalLM", 10, 8, 16
        num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim = 30, 2, 1, 4
        max_position_embeddings, rms_norm_eps, rope_theta, rope_scaling = 2048, 1e-5, 1e5, None
        tie_word_embeddings, attention_bias, bos_token_id, eos_token_id = True, False, 1, [2]

    cfg = hf_config(Cfg, 6)
    assert cfg["num_hidden_layers"] == 6 and cfg["eos_token_id"] == 2 and cfg["model_type"] == "llama"


METRICS_BEFORE = """# HELP tokenmill:spec_decode_num_drafts_total Drafts proposed.
# TYPE tokenmill:spec_decode_num_drafts_total counter
tokenmill:spec_decode_num_drafts_total{model_name="m",version="1"} 10.0
tokenmill:spec_decode_num_drafts_created{model_name="m",version="1"} 1.7e9
tokenmill:spec_decode_num_draft_tokens_total{model_name="m",version="1"} 40.0
tokenmill:spec_decode_num_accepted_tokens_total{model_name="m",version="1"} 12.0
tokenmill:generation_tokens_total{model_name="m",version="1"} 100.0
"""
METRICS_AFTER = METRICS_BEFORE.replace("} 10.0", "} 60.0").replace("} 40.0", "} 240.0").replace("} 12.0", "} 162.0")


def test_acceptance_from_metrics_and_timings():
    before, after = parse_prometheus(METRICS_BEFORE), parse_prometheus(METRICS_AFTER)
    assert before["tokenmill:generation_tokens_total"] == 100.0
    deltas = counter_deltas(before, after)
    assert deltas == {"drafts": 50.0, "draft_tokens": 200.0, "accepted": 150.0}
    assert acceptance_rate(deltas) == 0.75
    assert counter_deltas({}, {"tokenmill:generation_tokens_total": 5.0}) is None
    assert math.isnan(acceptance_rate(None))
    timings = [{"predicted_n": 9}, {"draft_n": 30, "draft_n_accepted": 12}, None,
               {"draft_n": 10, "draft_n_accepted": 8}]
    assert acceptance_rate(llama_deltas(timings)) == 0.5
    assert llama_deltas([{"predicted_n": 9}, None]) is None


def _summary(tok_s, completed=4, failed=0):
    tpot = {"median": 1000 / tok_s, "p99": 1200 / tok_s} if tok_s else {"median": math.nan, "p99": math.nan}
    return {"completed": completed, "failed": failed, "output_throughput": tok_s,
            "total_output_tokens": 160 * completed, "tpot_ms": tpot}


def test_table_and_targets():
    rows = [
        point_row("tm-gguf", "grounded", 1, _summary(20.0), None),
        point_row("tm-gguf-ngram-k4", "grounded", 1, _summary(45.0),
                  {"drafts": 10, "draft_tokens": 40, "accepted": 30}),
        point_row("llama", "grounded", 1, _summary(40.0), None),
        point_row("llama-ngram", "grounded", 1, _summary(25.0), {"drafts": math.nan, "draft_tokens": 8, "accepted": 2}),
        point_row("tm-gguf", "chat", 1, _summary(20.0), None),
        point_row("tm-gguf-ngram-k4", "chat", 1, _summary(18.0), {"drafts": 1, "draft_tokens": 4, "accepted": 0}),
        point_row("tm-gguf", "chat", 32, _summary(80.0, 32), None),
        point_row("tm-gguf-ngram-k4", "chat", 32, _summary(0.0, 0, 32), None),
    ]
    baselines = {c.name: c.baseline for c in CONFIGS}
    backends = {c.name: c.backend for c in CONFIGS}
    table = markdown_table(rows, baselines)
    assert "| grounded | 1 | tm-gguf-ngram-k4 | 45.0 | 2.25 | 22 / 27 | 0.75 | 160 | 0 |" in table
    assert "| grounded | 1 | llama-ngram | 25.0 | 0.62 | 40 / 48 | 0.25 | 160 | 0 |" in table
    assert "| chat | 32 | tm-gguf-ngram-k4 | failed |" in table
    # Rows group by workload, then concurrency: grounded first, chat at 32 last.
    body = table.splitlines()[2:]
    assert body[0].startswith("| grounded") and body[-1].startswith("| chat | 32")
    goals = targets(rows, backends, baselines)
    assert goals[0].endswith("2.25x its off (target 2x): met")
    assert "1.12x llama-server's best (llama, 40.0 tok/s; target 1.5x): NOT met" in goals[1]
    assert any(g.startswith("chat, 1 in flight: tm-gguf-ngram-k4 0.900x") and g.endswith("NOT met") for g in goals)
    assert len(goals) == 3  # the failed chat-32 row has no ratio
