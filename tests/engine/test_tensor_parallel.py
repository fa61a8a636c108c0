"""Tensor parallelism at TP=2 on CPU (gloo): the same tokens and logprobs as one rank, on tiny random models of
each family (heads that split unevenly, replicated KV heads, q/k/v bias, q/k norm, an odd vocabulary) and on
the default model; workers end with the engine, and a killed rank is an error, not a hang."""
import gc
import os
import signal
import time

import pytest
from hf_oracle import random_checkpoint

from tokenmill.engine import LLM, SamplingParams
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.models.layers import TensorParallel, split_heads

transformers = pytest.importorskip("transformers")

COMMON = dict(num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.25)
FAMILIES = {
    # 9 query heads in 3 KV groups (SmolLM2's shape): groups 2 + 1; odd vocabulary and intermediate size.
    "llama-uneven-heads": ("LlamaConfig", dict(vocab_size=49153, hidden_size=72, intermediate_size=151,
                                               num_attention_heads=9, num_key_value_heads=3,
                                               tie_word_embeddings=False)),
    "qwen2-bias-tied": ("Qwen2Config", dict(vocab_size=49152, hidden_size=64, intermediate_size=160,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True)),
    # One KV head for two ranks: replicated, each rank holding half of its query heads.
    "qwen3-qknorm-one-kv-head": ("Qwen3Config", dict(vocab_size=49152, hidden_size=64, intermediate_size=160,
                                                     num_attention_heads=6, num_key_value_heads=1, head_dim=16,
                                                     tie_word_embeddings=False)),
}
PROMPTS = ["The quick brown fox", "In 1905 Einstein published", "1, 2, 3,"]
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5, prompt_logprobs=5)


def _children() -> set[int]:
    """Pids of this process's live children (from /proc)."""
    pids = set()
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z" and not _is_resource_tracker(int(stat)):
                pids.add(int(stat))
    return pids


def _is_resource_tracker(pid: int) -> bool:
    """multiprocessing's resource tracker: started by the first spawn in this process, and it stays."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False


def _checkpoint(name: str, tmp_path_factory, tokenizer) -> str:
    cls_name, extra = FAMILIES[name]
    config = getattr(transformers, cls_name)(**COMMON, **extra)
    if cls_name == "LlamaConfig":
        config.attention_bias = True  # q/k/v and o bias: o's is row-parallel, added once
    path = tmp_path_factory.mktemp(name)
    random_checkpoint(config, path, tokenizer)
    return str(path)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, tokenizer):
    return _checkpoint(request.param, tmp_path_factory, tokenizer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    return _checkpoint("qwen2-bias-tied", tmp_path_factory, tokenizer)


def _generate(path: str | None, tp: int, prompts=PROMPTS, params=PARAMS, **kwargs):
    llm = LLM(path, dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=tp, **kwargs)
    try:
        return llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.engine.shutdown()


def _assert_same(got, want) -> None:
    """Same tokens, and every logprob (sampled and prompt) within 1e-4 relative."""
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for g_entry, w_entry in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
            assert g_entry.keys() == w_entry.keys()
            for t in w_entry:
                assert g_entry[t] == pytest.approx(w_entry[t], rel=1e-4, abs=1e-6)
        for g_entry, w_entry in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:], strict=True):
            for t in w_entry:
                assert g_entry[t].logprob == pytest.approx(w_entry[t].logprob, rel=1e-4, abs=1e-6)


def test_heads_split_by_kv_group():
    # SmolLM2: 9 query heads in 3 groups of 3 at TP=2 -> KV heads 0-1 with query heads 0-5, KV head 2 with 6-8.
    assert (split_heads(9, 3, TensorParallel(0, 2)).q_heads, split_heads(9, 3, TensorParallel(0, 2)).kv_heads) \
        == (range(0, 6), range(0, 2))
    assert (split_heads(9, 3, TensorParallel(1, 2)).q_heads, split_heads(9, 3, TensorParallel(1, 2)).kv_heads) \
        == (range(6, 9), range(2, 3))
    # Fewer KV heads than ranks: each is replicated, its group's query heads shared among its ranks.
    assert [(s.q_heads, s.kv_heads) for s in (split_heads(6, 1, TensorParallel(r, 2)) for r in range(2))] \
        == [(range(0, 3), range(0, 1)), (range(3, 6), range(0, 1))]
    with pytest.raises(ValueError, match="no query head"):
        split_heads(2, 1, TensorParallel(0, 3))


def test_tp2_gives_tp1_tokens_and_logprobs(family):
    _assert_same(_generate(family, 2), _generate(family, 1))


def test_tp2_gives_tp1_greedy_tokens_on_the_default_model():
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    got, want = _generate(None, 2, prompts, params), _generate(None, 1, prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_workers_end_with_the_engine(tiny):
    before = _children()
    llm = LLM(tiny, dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2)
    assert len(_children() - before) == 1
    del llm
    gc.collect()
    deadline = time.monotonic() + 10
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _children() - before


def test_a_killed_rank_is_a_clear_error_not_a_hang(tiny):
    before = _children()
    llm = LLM(tiny, dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2)
    try:
        (worker,) = _children() - before
        os.kill(worker, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(RuntimeError, match="tensor-parallel rank 1 .* was killed by SIGKILL"):
            llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert time.monotonic() - began < 30
    finally:
        llm.engine.shutdown()


def test_a_step_interrupted_on_rank_0_stops_later_steps(tiny):
    """Ctrl-C mid-step leaves the workers inside the step's collectives: the next step must be refused, not
    paired with their leftovers."""
    llm = LLM(tiny, dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2)
    runner = llm.engine.runner

    def interrupted(inputs):
        raise KeyboardInterrupt

    try:
        run, runner.run = runner.run, interrupted
        with pytest.raises(KeyboardInterrupt):
            llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        runner.run = run
        with pytest.raises(RuntimeError, match="ranks are out of step: restart the engine"):
            llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    finally:
        llm.engine.shutdown()


def test_quantization_and_lora_are_refused_under_tp():
    with pytest.raises(ValueError, match="quantization 'int8' does not run tensor-parallel"):
        EngineConfig(quantization="int8", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="LoRA adapters do not run tensor-parallel"):
        EngineConfig(enable_lora=True, tensor_parallel_size=2)
