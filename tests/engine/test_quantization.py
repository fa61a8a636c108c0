"""Quantized linears: GGUF blocks repacked without loss, int8/int4 within their rounding bounds, the row-count
route between packed and dense matmuls, and the default model generating through each mode."""
import json

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_llm import PROMPTS

from tokenmill.engine import LLM, SamplingParams
from tokenmill.engine.weights.quantization import (
    GROUP_SIZE,
    Int4Linear,
    Int4Planes,
    Int8Linear,
    gguf_to_int4,
    quantize_int4,
    quantize_int8,
)

TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=128,
                  intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True)


def _weight(n: int = 96, k: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _gguf_blocks(w: torch.Tensor, kind: str) -> tuple[np.ndarray, torch.Tensor]:
    """gguf's own quantization of w: the raw rows, and their dequantization by gguf."""
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(w.numpy(), qtype)
    return raw, torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32))


def _bf16_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # bfloat16 activations and scales: a few units of bf16 rounding of the output's scale
    torch.testing.assert_close(got.float(), expected, atol=3e-2 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_repack_to_the_same_weights_and_matmul(kind):
    w = _weight()
    raw, dequantized = _gguf_blocks(w, kind)
    planes = gguf_to_int4(kind, raw)
    torch.testing.assert_close(planes.dequantize(), dequantized, atol=1e-6, rtol=1e-6)  # same values
    x = torch.randn(5, w.shape[1])
    _bf16_close(Int4Linear(planes)(x), x @ dequantized.T)


def test_fused_rows_of_different_weights_concatenate_as_blocks():
    (ra, da), (rb, db) = _gguf_blocks(_weight(64, seed=1), "Q4_1"), _gguf_blocks(_weight(32, seed=2), "Q4_1")
    fused = Int4Planes.cat([gguf_to_int4("Q4_1", ra), gguf_to_int4("Q4_1", rb)])
    torch.testing.assert_close(fused.dequantize(), torch.cat([da, db]), atol=1e-6, rtol=1e-6)


def test_int4_error_is_at_most_half_a_step_of_its_group():
    w = _weight()
    (q, scale, _), = quantize_int4(w).planes
    assert q.max() == 15 and q.min() == 0
    err = (quantize_int4(w).dequantize() - w).abs().reshape(w.shape[0], -1, GROUP_SIZE)
    assert (err <= scale[..., None] * 0.51 + 1e-6).all()  # half a step, plus the bf16 rounding of the zero


def test_int8_error_is_at_most_half_a_step_of_its_row_and_matmul_is_close():
    w = _weight()
    q, scale = quantize_int8(w)
    assert (((q.float() * scale[:, None]) - w).abs() <= scale[:, None] * 0.5 + 1e-7).all()
    x = torch.randn(5, w.shape[1])
    _bf16_close(Int8Linear(q, scale)(x), x @ w.T)


@pytest.mark.parametrize("make", ["int4", "int8"])
def test_rows_below_the_crossover_take_the_packed_kernel_and_from_it_the_dense_copy(make):
    w = _weight()
    if make == "int4":
        planes = quantize_int4(w)
        dense = planes.dequantize().bfloat16()
        linear = Int4Linear(planes, dense=dense, dense_min_rows=8)
    else:
        q, scale = quantize_int8(w)
        dense = (q.float() * scale[:, None]).bfloat16()
        linear = Int8Linear(q, scale, dense=dense, dense_min_rows=8)
    small, large = torch.randn(7, w.shape[1]), torch.randn(8, w.shape[1])
    assert torch.equal(linear(small), linear.packed_mm(small.bfloat16()).float())
    assert torch.equal(linear(large), F.linear(large.bfloat16(), dense).float())
    both = torch.cat([small, large])  # the small step's rows, now through the dense copy, agree within bf16
    _bf16_close(linear(both)[:7], linear(small))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return str(path)


def test_unsupported_gguf_block_type_names_the_type_and_the_way_out():
    with pytest.raises(ValueError, match="Q6_K.*int4 or int8"):
        gguf_to_int4("Q6_K", np.zeros((2, 210), dtype=np.uint8))


def test_gguf_quantization_of_a_model_without_gguf_blocks_is_refused(tiny_config):
    with pytest.raises(ValueError, match="not loaded from a GGUF file.*'int8' or 'int4'"):
        LLM(tiny_config, load_format="dummy", quantization="gguf", kv_cache_memory=8 << 20)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_int8_and_int4_quantize_dummy_weights_and_keep_the_embedding_tied(tiny_config, mode):
    llm = LLM(tiny_config, load_format="dummy", quantization=mode, kv_cache_memory=8 << 20)
    model = llm.engine.runner.model
    packed = [m for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert len(packed) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the LM head
    assert isinstance(model.lm_head, Int8Linear)  # int4 too: the LM head stays int8
    head, embedding = model.lm_head, model.embed_tokens.weight
    # Tied: the input embedding holds what the head computes with, in every route.
    torch.testing.assert_close(embedding, (head.q.float() * head.scale.float()[:, None]).to(embedding.dtype))
    x = torch.randn(3, embedding.shape[1])
    # The large-step route computes in its own dtype: bfloat16 where the CPU has native bfloat16 matmuls.
    dense_x, dense_w = x.to(head.dense_dtype), embedding.to(head.dense_dtype)
    tol = {} if head.dense_dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(head.dense(dense_x).float(), F.linear(dense_x.float(), dense_w.float()), **tol)
    out = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


def test_gguf_blocks_kept_packed_generate_mostly_the_float32_greedy_tokens():
    greedy = SamplingParams(temperature=0, max_tokens=24)
    ref = [o.outputs[0].token_ids for o in LLM(dtype="float32").generate(PROMPTS, greedy, use_tqdm=False)]
    llm = LLM(quantization="gguf")
    assert isinstance(llm.engine.runner.model.layers[0].mlp.gate_up_proj, Int4Linear)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    agreeing = sum(next((i for i, (a, b) in enumerate(zip(g, r, strict=False)) if a != b), len(r))
                   for g, r in zip(got, ref, strict=True))
    # Measured: 80% of the tokens come before the first divergence (7 of 9 prompts identical).
    assert agreeing / sum(map(len, ref)) >= 0.6
