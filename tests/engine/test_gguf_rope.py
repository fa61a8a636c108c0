"""GGUF rope scaling: Llama 3's rope_freqs tensor and the rope.scaling metadata give the rotary
frequencies transformers computes for the equivalent Hugging Face config."""
import math

import numpy as np
import pytest
import torch
from gguf_files import write_llama_gguf
from hf_oracle import assert_matches_transformers

from tokenmill.engine import LLM, SamplingParams
from tokenmill.engine.models.layers import rope_inv_freq
from tokenmill.engine.models.llama import LlamaForCausalLM
from tokenmill.engine.weights.loader import load_model_files
from tokenmill.kernels import reference

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
ROPE_INIT_FUNCTIONS = pytest.importorskip("transformers.modeling_rope_utils").ROPE_INIT_FUNCTIONS

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def llama3_rope_freqs(head_dim: int, theta: float, rope: dict) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py writes it for rope_type llama3."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32).numpy()


def byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: each of the 256 bytes as a printable character."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


# A byte-level vocabulary with one merge (" t"): the GGUF's tokenizer loads in no time.
TOKENS, MERGES = byte_tokens() + ["\u0120t"], ["\u0120 t"]
VOCAB_SIZE = len(TOKENS)


def hf_llama(theta: float, rope_scaling: dict | None) -> "transformers.LlamaForCausalLM":
    config = transformers.LlamaConfig(  # transformers adds rope_theta to the rope_scaling it is given: a copy
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.25,
        rope_theta=theta, rope_scaling=rope_scaling and dict(rope_scaling), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at one; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def add_byte_level_vocab(w: "gguf.GGUFWriter") -> None:
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.NORMAL] * VOCAB_SIZE)
    w.add_token_merges(MERGES)
    w.add_eos_token_id(0)


@pytest.fixture
def write_gguf(tmp_path):
    """Writes a model's weights as an F32 llama GGUF, with a rope_freqs tensor and metadata as given."""

    def write(model, rope_freqs: np.ndarray | None = None, **metadata) -> str:
        return write_llama_gguf(str(tmp_path / "model.gguf"), model, add_byte_level_vocab, rope_freqs, **metadata)

    return write


def hf_inv_freq(rope_type: str, theta: float, rope_scaling: dict) -> torch.Tensor:
    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=131072,
                                      rope_theta=theta, rope_scaling=dict(rope_scaling))
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.double()


def test_llama3_gguf_with_rope_freqs_loads_with_transformers_llama3_inv_freq(write_gguf):
    theta = 500000.0
    hf = hf_llama(theta, None)  # its weights only: the GGUF's rope scaling is its rope_freqs tensor
    path = write_gguf(hf, llama3_rope_freqs(hf.config.head_dim, theta, LLAMA3_ROPE))
    cfg, _, weights = load_model_files(path)
    model = LlamaForCausalLM(cfg, reference)
    model.load_weights(weights)

    expected = hf_inv_freq("llama3", theta, LLAMA3_ROPE)
    d = cfg.head_dim
    unscaled = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    assert (expected < unscaled * 0.9).sum() > 10  # the scaling slows most low frequencies
    got = rope_inv_freq(d, cfg.rope_theta, cfg.rope_scaling)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    # The model's own rotary tables turn with those frequencies (sin x ~ x for these small angles).
    torch.testing.assert_close(model.rotary.sin[1].double(), expected.sin(), rtol=1e-6, atol=0)


def test_linear_rope_scaling_metadata_divides_inv_freq_by_factor(write_gguf):
    path = write_gguf(hf_llama(10000.0, None), rope_scaling_type=gguf.RopeScalingType.LINEAR,
                      rope_scaling_factor=4.0)
    cfg, _, _ = load_model_files(path)
    expected = hf_inv_freq("linear", 10000.0, {"rope_type": "linear", "factor": 4.0})
    got = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)


def test_unsupported_rope_scaling_type_raises_naming_it(write_gguf):
    path = write_gguf(hf_llama(10000.0, None), rope_scaling_type=gguf.RopeScalingType.YARN,
                      rope_scaling_factor=4.0, rope_scaling_orig_ctx_len=64)
    with pytest.raises(ValueError, match="'yarn'"):
        load_model_files(path)


def test_rope_freqs_gguf_greedy_tokens_and_logprobs_match_transformers_llama3(write_gguf):
    # A short original context makes the scaling change the angles of the first few positions.
    rope = {**LLAMA3_ROPE, "original_max_position_embeddings": 16}
    hf = hf_llama(10000.0, rope)
    path = write_gguf(hf, llama3_rope_freqs(hf.config.head_dim, 10000.0, rope))
    llm = LLM(path, dtype="float32", kv_cache_memory=32 << 20)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    prompts = [[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [49, 44, 32, 50, 44, 32, 51]]
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True):
        assert_matches_transformers(hf, prompt, out.outputs[0], 12)
