"""Decode steps through DecodeGraphs' static, padded buffers give what the plain forward pass gives.

There is no GPU here, so nothing is captured (capture=False): the graphs' padding and buffer handling
run eagerly, which is what a replay would compute.
"""
import dataclasses
import json

import pytest
import torch

from tokenmill.engine import LLM, SamplingParams
from tokenmill.engine.executor.cuda_graph import DecodeGraphs, graph_batch_sizes

TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True)


def test_batch_size_ladder_covers_every_batch_up_to_max_num_seqs():
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(1) == [1]


@pytest.fixture
def tiny_llm(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return LLM(str(path), load_format="dummy", dtype="float32", kv_cache_memory=8 << 20, max_num_seqs=12)


def _attach_graphs(llm: LLM) -> DecodeGraphs:
    runner = llm.engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, llm.config.max_num_seqs,
                          llm.engine.max_model_len // llm.config.block_size, runner.device, capture=False)
    # Stale contents in the static buffers must not matter. Stale slots point at the first tokens of
    # the first prompt (block 0 is allocated first), so a padding row that wrote its KV would corrupt it.
    gen = torch.Generator().manual_seed(1)
    graphs.input_ids.random_(0, 1000, generator=gen)
    graphs.positions.random_(0, 100, generator=gen)
    graphs.slot_mapping.copy_(torch.arange(len(graphs.slot_mapping)))
    graphs.seq_lens.random_(1, 100, generator=gen)
    graphs.block_tables.random_(0, runner.num_blocks, generator=gen)
    runner.decode_graphs = graphs
    return graphs


def test_padded_graph_decode_gives_the_same_greedy_tokens(tiny_llm):
    # Different lengths, so the decode batch shrinks through 7, 6, ... and is padded to 8, then 4, 2, 1.
    prompts = [{"prompt_token_ids": list(range(3 + 11 * i, 20 + 17 * i))} for i in range(7)]
    params = [SamplingParams(temperature=0, max_tokens=5 + 3 * i, ignore_eos=True) for i in range(7)]
    eager = tiny_llm.generate(prompts, params, use_tqdm=False)
    tiny_llm.engine.block_manager.reset_prefix_cache()
    _attach_graphs(tiny_llm)
    graphed = tiny_llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(eager, graphed, strict=False):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids


def test_graph_step_logits_equal_the_eager_step(tiny_llm):
    engine = tiny_llm.engine
    for i in range(3):
        engine.add_request(str(i), list(range(10, 30 + 9 * i)),
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()  # the three prefills
    sched = engine.scheduler.schedule()  # three decodes
    assert sched.num_tokens == [1, 1, 1]
    eager = engine.runner.execute(sched).logits
    _attach_graphs(tiny_llm)
    # Running the step again rewrites the same keys and values, so the logits must match.
    graphed = engine.runner.execute(sched).logits
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


class _FakeCudaMemory:
    """torch.cuda's memory calls as a GPU would answer them: 10 GB in all, 4 GB in use before the profile
    (weights, the CUDA context, another process), and a forward of n tokens (its scratch KV included)
    peaking 7 kB x n above that."""

    def __init__(self):
        self.tokens = 0

    def install(self, monkeypatch, runner):
        cuda = torch.cuda
        for name in ("synchronize", "empty_cache"):
            monkeypatch.setattr(cuda, name, lambda *a, **k: None)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *a, **k: None)
        monkeypatch.setattr(cuda, "memory_allocated", lambda *a, **k: 10**9)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a, **k: 10**9 + 7000 * self.tokens)
        monkeypatch.setattr(cuda, "mem_get_info", lambda *a, **k: (6 * 10**9, 10 * 10**9))
        forward = runner.model.forward

        def counting_forward(input_ids, *args, **kwargs):
            self.tokens = len(input_ids)
            return forward(input_ids, *args, **kwargs)

        monkeypatch.setattr(runner.model, "forward", counting_forward)


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_kv_budget_leaves_out_memory_in_use_the_prefill_peak_and_the_graph_pool(tiny_llm, monkeypatch,
                                                                                  enforce_eager):
    runner = tiny_llm.engine.runner
    monkeypatch.setattr(runner, "config", dataclasses.replace(runner.config, enforce_eager=enforce_eager))
    _FakeCudaMemory().install(monkeypatch, runner)
    cfg, mc = runner.config, runner.model_config

    def activations(n: int) -> int:  # the fake peak less the scratch KV blocks of n tokens, which serving keeps
        kv = 2 * -(-n // cfg.block_size) * cfg.block_size * mc.num_key_value_heads * mc.head_dim * 4
        return 7000 * n - mc.num_hidden_layers * kv

    prefill = activations(min(cfg.max_num_batched_tokens, 512))  # the model's 512 positions bound the profile
    graphs = 0 if enforce_eager else activations(cfg.max_num_seqs)
    expected = int(10 * 10**9 * cfg.gpu_memory_utilization - 4 * 10**9 - prefill - graphs)
    assert runner._profile_free_gpu_memory() == expected
