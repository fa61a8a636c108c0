"""LoRA adapters: an adapter runs as its weights merged into the base model would (transformers is the oracle),
batches mix adapters and the base model, the prefix cache keeps adapters apart, and bad folders are refused
with a message that says what is wrong."""
import asyncio
import copy
import json
import math

import pytest
import torch
from hf_oracle import assert_matches_transformers
from safetensors.torch import save_file

from tokenmill.engine import LLM, SamplingParams
from tokenmill.engine.core.async_engine import AsyncLLMEngine
from tokenmill.engine.core.block_manager import BlockManager
from tokenmill.engine.core.core_client import MPEngineClient
from tokenmill.engine.core.request import Sequence
from tokenmill.engine.executor.cuda_graph import DecodeGraphs
from tokenmill.engine.limits import InvalidRequestError
from tokenmill.engine.models.layers import LoRAContext, LoRALinear
from tokenmill.engine.weights.lora import SUPPORTED_MODULES
from tokenmill.engine.weights.quantization import Int8Linear, quantize_int8
from tokenmill.kernels import reference

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.25,
            tie_word_embeddings=False)
PROMPTS = [[1, 17, 42, 99, 7, 300, 12, 5, 77, 201, 3, 9, 64, 128, 255, 400, 11, 22, 33],
           [5, 6, 7], [400, 300, 200, 100, 50, 25], [9, 9, 9, 9, 1]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)


def _linear(hf, layer: int, module: str) -> torch.nn.Linear:
    block = hf.model.layers[layer]
    return getattr(block.self_attn if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else block.mlp,
                   module)


def write_adapter(path, hf, targets, rank: int, alpha: float, seed: int, rslora: bool = False, **config):
    """A PEFT LoRA folder of random A and B (PEFT starts B at zero; here it must matter) for hf; returns hf
    with the adapter merged into its weights, W + scaling * B @ A: the oracle."""
    g = torch.Generator().manual_seed(seed)
    tensors, merged = {}, copy.deepcopy(hf)
    scaling = alpha / (math.sqrt(rank) if rslora else rank)
    for i in range(len(hf.model.layers)):
        for module in targets:
            w = _linear(hf, i, module).weight
            a = torch.randn(rank, w.shape[1], generator=g) * 0.3
            b = torch.randn(w.shape[0], rank, generator=g) * 0.3
            prefix = f"base_model.model.model.layers.{i}.{'self_attn' if module[0] in 'qkvo' else 'mlp'}.{module}"
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
            with torch.no_grad():
                _linear(merged, i, module).weight += scaling * b @ a
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
        bias="none", **config)))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return merged


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, checkpoint folder, adapters: name -> (folder, merged transformers model))."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).float().eval()
    root = tmp_path_factory.mktemp("lora")
    hf.save_pretrained(root / "base")
    adapters = {
        "qv": (root / "qv", write_adapter(root / "qv", hf, ["q_proj", "v_proj"], 8, 16, seed=1)),
        "all": (root / "all", write_adapter(root / "all", hf, SUPPORTED_MODULES, 16, 8, seed=2, rslora=True)),
    }
    return hf, str(root / "base"), adapters


def make_llm(path: str, **kwargs) -> LLM:
    return LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory=16 << 20, enable_lora=True,
               **kwargs)


def run_mixed_batch(llm: LLM, tiny) -> tuple[list, list]:
    """Both adapters loaded, then a batch of adapters and the base model; each output is checked against its
    merged weights in transformers. Returns the batch's adapter names and outputs."""
    hf, _, adapters = tiny
    for name, (folder, _) in adapters.items():
        llm.add_lora(name, str(folder))
    names = ["qv", "all", None, "qv"]
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_name=names)
    oracles = {None: hf} | {name: merged for name, (_, merged) in adapters.items()}
    for prompt, name, out in zip(PROMPTS, names, outs, strict=True):
        assert_matches_transformers(oracles[name], prompt, out.outputs[0], GREEDY.max_tokens, top_n=3)
    return names, outs


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu-ops", "reference"])
def test_mixed_batch_runs_each_adapter_as_its_merged_weights(tiny, cpu_kernels):
    """Two adapters and the base model in one batch; small steps, so prefill chunks run beside decodes."""
    llm = make_llm(tiny[1], max_num_batched_tokens=16, cpu_kernels=cpu_kernels)
    names, outs = run_mixed_batch(llm, tiny)
    # Each alone gives what it gave in the mixed batch: the same tokens, and logprobs equal to float32 noise
    # (a GEMM's reduction order follows its row count, so a batch and one row differ in the last bits;
    # measured up to 1.2e-5 over ten steps, so 5e-5 still catches an adapter applied to the wrong rows).
    for prompt, name, out in zip(PROMPTS, names, outs, strict=True):
        alone = llm.generate([prompt], GREEDY, use_tqdm=False, lora_name=name)[0].outputs[0]
        assert alone.token_ids == out.outputs[0].token_ids
        for got, want in zip(alone.logprobs, out.outputs[0].logprobs, strict=True):
            assert got.keys() == want.keys()
            assert all(got[t] == pytest.approx(want[t], abs=5e-5) for t in got)
    # The adapters matter: each changes the greedy tokens of some prompt.
    base = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    for name in tiny[2]:
        tuned = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_name=name)]
        assert tuned != base


def test_decode_graphs_replay_base_model_steps_and_adapter_steps_run_eagerly(tiny):
    """The graphs hold no adapter: a decode step with an adapter token must not replay them. (On CPU the
    graphs run uncaptured, through the same static buffers.)"""
    hf, path, adapters = tiny
    llm = make_llm(path)
    llm.add_lora("qv", str(adapters["qv"][0]))
    runner = llm.engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, llm.config.max_num_seqs,
                          llm.engine.max_model_len // llm.config.block_size, runner.device, capture=False)
    replays = []
    replay = graphs.run
    graphs.run = lambda *args: replays.append(len(args[0])) or replay(*args)
    runner.decode_graphs = graphs
    mixed = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False, lora_name=["qv", None])
    assert replays == []
    base = llm.generate(PROMPTS[1:2], GREEDY, use_tqdm=False)[0]
    assert len(replays) == GREEDY.max_tokens - 1
    for prompt, oracle, out in [(PROMPTS[0], adapters["qv"][1], mixed[0]), (PROMPTS[1], hf, mixed[1]),
                                (PROMPTS[1], hf, base)]:
        assert_matches_transformers(oracle, prompt, out.outputs[0], GREEDY.max_tokens, top_n=3)


def test_lora_adds_its_delta_on_top_of_a_quantized_linear():
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(7, 64)
    base = Int8Linear(*quantize_int8(w))
    context = LoRAContext()
    linear = LoRALinear(base, 64, 96, num_slices=1, max_loras=2, max_rank=8, context=context, ops=reference)
    linear.lora_a[1], linear.lora_b[1] = torch.randn(8, 64), torch.randn(96, 8)
    assert torch.equal(linear(x), base(x))  # no plan: the base alone
    context.plan = reference.LoRAPlan.build({1: [0, 2, 3]}, torch.device("cpu"))
    want = base(x).double()
    want[[0, 2, 3]] += x[[0, 2, 3]].double() @ linear.lora_a[1].double().T @ linear.lora_b[1].double().T
    assert torch.allclose(linear(x).double(), want, rtol=1e-4, atol=1e-3)


def _seq(name: str, tokens: list[int], lora_id: int) -> Sequence:
    return Sequence(name, name, 0, tokens, SamplingParams(), None, None, 0.0, lora_id)


def test_prefix_cache_keys_blocks_by_adapter():
    bm = BlockManager(32, 16)
    tokens = list(range(40))
    seqs = [_seq(f"s{i}", tokens, lora_id) for i, lora_id in enumerate([0, 1, 2])]
    chains = [bm._full_block_hashes(s, 2) for s in seqs]
    assert len({h for chain in chains for h in chain}) == 6  # no block digest shared across adapters
    assert bm.allocate(seqs[1], 40, bm.find_cached_prefix(seqs[1]))
    assert bm.find_cached_prefix(seqs[0]) == [] and bm.find_cached_prefix(seqs[2]) == []
    again = _seq("again", tokens, 1)
    assert bm.find_cached_prefix(again) == seqs[1].block_ids[:2]


def test_prefix_cache_hits_only_under_the_same_adapter(tiny):
    _, path, adapters = tiny
    llm = make_llm(path)
    llm.add_lora("qv", str(adapters["qv"][0]))
    llm.add_lora("all", str(adapters["all"][0]))
    prompt = list(range(1, 50))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def cached(name):
        return llm.generate([prompt], params, use_tqdm=False, lora_name=name)[0].num_cached_tokens

    assert cached("qv") == 0
    assert cached("all") == 0 and cached(None) == 0
    assert cached("qv") == 48 and cached("all") == 48 and cached(None) == 48
    # A new adapter under an old name gets a new id: the old one's blocks do not serve it.
    llm.remove_lora("qv")
    llm.add_lora("qv", str(adapters["all"][0]))
    assert cached("qv") == 0


def _break(folder, what):
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    if what == "no config":
        cfg_file.unlink()
    elif what == "no weights":
        (folder / "adapter_model.safetensors").unlink()
    else:
        cfg.update(what)
        cfg_file.write_text(json.dumps(cfg))


@pytest.mark.parametrize("what, message", [
    ("no config", "no adapter_config.json"),
    ("no weights", "no adapter_model.safetensors"),
    ({"r": 32}, "rank 32, above max_lora_rank 16"),
    ({"target_modules": ["q_proj", "lm_head"]}, "target_modules ['lm_head'] are not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "only LORA"),
], ids=str)
def test_bad_adapter_folder_is_refused_with_a_reason(tiny, tmp_path, what, message):
    hf, path, _ = tiny
    folder = tmp_path / "bad"
    write_adapter(folder, hf, ["q_proj"], 8, 16, seed=3)
    _break(folder, what)
    llm = make_llm(path)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        llm.add_lora("bad", str(folder))
    assert llm.list_loras() == []


def test_adapter_of_another_model_is_refused(tiny, tmp_path):
    _, path, _ = tiny
    torch.manual_seed(0)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(TINY | dict(hidden_size=32)))).eval()
    write_adapter(tmp_path / "other", other, ["q_proj"], 8, 16, seed=3)
    with pytest.raises(ValueError, match="is it an adapter of another model"):
        make_llm(path).add_lora("other", str(tmp_path / "other"))


def test_adapter_with_an_unknown_tensor_is_refused(tiny, tmp_path):
    hf, path, _ = tiny
    write_adapter(tmp_path / "emb", hf, ["q_proj"], 8, 16, seed=3)
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 512)},
              str(tmp_path / "emb" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor"):
        make_llm(path).add_lora("emb", str(tmp_path / "emb"))


def test_loading_unloading_and_naming_adapters(tiny):
    _, path, adapters = tiny
    llm = make_llm(path, max_loras=1)
    folder = str(adapters["qv"][0])
    first = llm.add_lora("a", folder)
    assert [(i.name, i.id, i.rank) for i in llm.list_loras()] == [("a", first, 8)]
    with pytest.raises(ValueError, match="already loaded"):
        llm.add_lora("a", folder)
    with pytest.raises(ValueError, match="as many as max_loras allows"):
        llm.add_lora("b", folder)
    with pytest.raises(ValueError, match="unknown LoRA adapter 'b'; loaded: a"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False, lora_name="b")
    llm.engine.add_request("r", [1, 2, 3], GREEDY, lora_name="a")
    with pytest.raises(ValueError, match="serves 1 request"):
        llm.remove_lora("a")
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    llm.remove_lora("a")
    assert llm.list_loras() == [] and llm.add_lora("a", folder) > first  # ids are never reused


def test_lora_off_refuses_adapters(tiny):
    _, path, adapters = tiny
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory=16 << 20)
    with pytest.raises(ValueError, match="enable_lora=True"):
        llm.add_lora("qv", str(adapters["qv"][0]))
    with pytest.raises(ValueError, match="enable_lora=True"):
        llm.generate([[1, 2]], GREEDY, use_tqdm=False, lora_name="qv")


@pytest.mark.parametrize("transport", ["thread", "process"])
def test_engine_client_loads_adapters_and_runs_requests_with_them(tiny, transport):
    _, path, adapters = tiny
    llm = make_llm(path)
    client = AsyncLLMEngine(llm.engine) if transport == "thread" else MPEngineClient(llm.config)
    client.start()
    prompt = PROMPTS[0]

    async def run():
        lora_id = await client.add_lora("qv", str(adapters["qv"][0]))
        assert [(i.name, i.id) for i in client.list_loras()] == [("qv", lora_id)]
        with pytest.raises(InvalidRequestError, match="unknown LoRA adapter"):
            await client.add_request("x", prompt, GREEDY, lora_name="nope")
        with pytest.raises(ValueError, match="no adapter_config.json"):
            await client.add_lora("bad", path)
        tokens = []
        async for out in await client.add_request("r", prompt, GREEDY, lora_name="qv"):
            tokens += out.outputs[0].token_ids
        await client.remove_lora("qv")
        assert client.list_loras() == []
        with pytest.raises(ValueError, match="unknown LoRA adapter"):
            await client.remove_lora("qv")
        return tokens

    try:
        tokens = asyncio.run(run())
    finally:
        client.shutdown()
    want = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids  # the base model
    merged = adapters["qv"][1].generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert tokens == merged[0, len(prompt):].tolist() != want


def test_speculative_decoding_runs_each_adapter_as_its_merged_weights(tiny):
    """n-gram drafts verified under each sequence's adapter give that adapter's greedy tokens and logprobs."""
    llm = make_llm(tiny[1], speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                "prompt_lookup_min": 1, "prompt_lookup_max": 2})
    run_mixed_batch(llm, tiny)
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0
