"""Tiny random-weight models of each family: same greedy tokens and logprobs as transformers' own code."""
import pytest
from hf_oracle import assert_matches_transformers, random_checkpoint

from tokenmill.engine import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.25)
FAMILIES = {
    "llama-gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-mha-tied-llama3-rope": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=None,
                                      tie_word_embeddings=False)),
    "qwen2-bias": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qknorm": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                         tie_word_embeddings=False)),
}
PROMPTS = ["The quick brown fox", "In 1905 Einstein published", "1, 2, 3,", "A"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, tokenizer):
    cls_name, extra = FAMILIES[request.param]
    config = getattr(transformers, cls_name)(**COMMON, **extra)
    path = tmp_path_factory.mktemp(request.param)
    return random_checkpoint(config, path, tokenizer), str(path)


def test_greedy_tokens_and_logprobs_match_transformers(family, tokenizer):
    hf, path = family
    llm = LLM(path, dtype="float32", kv_cache_memory=32 << 20)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert_matches_transformers(hf, tokenizer(prompt).input_ids, out.outputs[0], 12, top_n=3)
