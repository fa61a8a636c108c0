"""The C++ layer loop (tokenmill.Decoder) against its reference, the Python layers on the same C++ ops: the same
greedy tokens and bit-identical logprobs, for each kind of linear and each family switch it handles."""
import json

import pytest

from tokenmill.engine import LLM, SamplingParams
from tokenmill.engine.models import cpu_decoder
from tokenmill.kernels import cpu

if not cpu.load():
    pytest.skip("the C++ CPU ops did not build here (see the warning logged)", allow_module_level=True)

TINY = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True)
FAMILIES = {
    "llama": dict(architectures=["LlamaForCausalLM"]),
    "qwen2-bias": dict(architectures=["Qwen2ForCausalLM"]),
    "qwen3-qknorm": dict(architectures=["Qwen3ForCausalLM"], head_dim=32, tie_word_embeddings=False),
}
# (dtype, quantization): packed float32, nn.Linear in bfloat16, int4 groups with an int8 LM head, int8 per channel
MODES = [("float32", None), ("bfloat16", None), ("float32", "int4"), ("float32", "int8")]
PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7]]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)


def _generate(path: str, dtype: str, quantization: str | None, **kwargs):
    llm = LLM(path, load_format="dummy", dtype=dtype, quantization=quantization, kv_cache_memory=16 << 20,
              max_num_seqs=4, **kwargs)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return llm, [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.fixture(params=sorted(FAMILIES))
def config(request, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, **FAMILIES[request.param]}))
    return str(path)


@pytest.mark.parametrize("dtype,quantization", MODES)
def test_the_cpp_loop_gives_the_python_layers_tokens_and_logprobs_exactly(config, dtype, quantization, monkeypatch):
    llm, fast = _generate(config, dtype, quantization)
    assert llm.engine.runner.model._cpu_decoder[1] is not None  # the C++ loop ran
    monkeypatch.setattr(cpu_decoder, "build", lambda *args: None)
    _, reference = _generate(config, dtype, quantization)
    assert fast == reference


def test_lora_and_the_reference_ops_keep_the_python_layers(config):
    llm = LLM(config, load_format="dummy", dtype="float32", kv_cache_memory=16 << 20, enable_lora=True)
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.engine.runner.model._cpu_decoder[1] is None
    llm = LLM(config, load_format="dummy", dtype="float32", kv_cache_memory=16 << 20, cpu_kernels=False)
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.engine.runner.model._cpu_decoder[1] is None


def test_large_steps_of_a_quantized_model_leave_the_loop_where_a_dense_copy_takes_over(config):
    llm = LLM(config, load_format="dummy", dtype="float32", quantization="int4", kv_cache_memory=16 << 20)
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    fast = llm.engine.runner.model._cpu_decoder[1]
    assert fast.max_rows == min(m.dense_min_rows for m in llm.engine.runner.model.modules()
                                if getattr(m, "dense", None) is not None and m is not llm.engine.runner.model.lm_head)
