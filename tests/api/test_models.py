"""Several models and versions in one `tokenmill serve`, driven with the OpenAI SDK while the management
API loads, switches and unloads versions: no request fails or is cut, and the right model answers each.

The server serves the packaged model four times over (smol:v1, smol:v2, other, and smol:v3 loaded at run
time), each with an engine process of its own, and a --model-dir whose files load on first use.
"""
from __future__ import annotations

import json
import os
import threading
import time

import httpx
import openai
import pytest
import torch
from api_helpers import ServeProcess, wait_until
from safetensors.torch import save_file

from tokenmill.api.args import build_parser, model_specs
from tokenmill.api.model_spec import ModelSpec, model_config
from tokenmill.api.models import estimate_memory
from tokenmill.engine.config import EngineConfig, default_model_path
from tokenmill.engine.weights.loader import load_model_files

ADMIN = "admin-secret"
PATH = default_model_path()
SETTINGS = ["--quantization", "gguf", "--kv-cache-memory", "32MiB", "--max-model-len", "512", "--num-threads", "1",
            "--enable-lora", "--max-lora-rank", "8"]


def _write_adapter(path, seed: int) -> str:
    """A PEFT LoRA folder of random q_proj and v_proj deltas for the packaged model."""
    cfg = load_model_files(PATH, load_tokenizer=False)[0]
    g, tensors = torch.Generator().manual_seed(seed), {}
    for i in range(cfg.num_hidden_layers):
        for module, out in (("q_proj", cfg.num_attention_heads), ("v_proj", cfg.num_key_value_heads)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(8, cfg.hidden_size, generator=g) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out * cfg.head_dim, 8, generator=g) * 0.05
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"}))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return str(path)


def _estimate() -> int:
    return estimate_memory(EngineConfig(model=PATH, quantization="gguf", kv_cache_memory=32 << 20))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("models")
    for name in ("tiny", "tiny2"):
        os.symlink(PATH, model_dir / f"{name}.gguf")
    # Room for four models: the three given, then v3; once v1 is unloaded, one from the directory at a time.
    budget = int(4.5 * _estimate())
    adapter = _write_adapter(tmp_path_factory.mktemp("lora") / "terse", seed=1)
    args = [f"smol:v1={PATH}", f"smol:v2={PATH}", f"other={PATH}", *SETTINGS, "--admin-key", ADMIN,
            "--memory-budget", str(budget), "--model-dir", str(model_dir), "--lora-modules", f"terse={adapter}"]
    with ServeProcess(args, tmp_path_factory.mktemp("serve") / "server.log") as server:
        admin = httpx.Client(base_url=server.client.base_url, timeout=300,
                             headers={"Authorization": f"Bearer {ADMIN}"})
        yield server, admin, openai.OpenAI(base_url=f"{server.client.base_url}/v1", api_key="x", max_retries=0)
        admin.close()


def _stream(client: openai.OpenAI, model: str, max_tokens: int, record: dict) -> None:
    """A streamed completion; records who answered, its text, finish reason and the gaps between tokens."""
    try:
        last, gaps, text = time.monotonic(), [], ""
        for chunk in client.completions.create(model=model, prompt="Count to a hundred:", max_tokens=max_tokens,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True}):
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            record["model"] = chunk.model
            text += chunk.choices[0].text
            record["finish"] = chunk.choices[0].finish_reason or record.get("finish")
        record.update(text=text, max_gap=max(gaps[1:], default=0.0))
    except Exception as e:  # noqa: BLE001 - the test asserts on it
        record["error"] = e


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def _admin_models(admin: httpx.Client) -> dict[str, dict]:
    return {m["id"]: m for m in admin.get("/admin/models").json()["data"]}


def test_model_specs_from_arguments_and_a_config_file(tmp_path):
    assert ModelSpec.parse("/m/SmolLM2.Q4_1.gguf") == ModelSpec("SmolLM2.Q4_1", None, "/m/SmolLM2.Q4_1.gguf")
    assert ModelSpec.parse("a:v2=/m/x") == ModelSpec("a", "v2", "/m/x")
    for bad in ("a:=/m/x", "=/m/x", "a="):
        with pytest.raises(ValueError):
            ModelSpec.parse(bad)
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - {model: b:v1, path: /m/y, dtype: float32, kv_cache_memory: 64MiB}\n"
                      "  - {path: /m/z/}\n")
    specs = model_specs(build_parser().parse_args(["serve", "a=/m/x", "--config", str(config)]))
    assert specs == [ModelSpec("a", None, "/m/x"), ModelSpec("b", "v1", "/m/y", {"dtype": "float32",
                                                                                 "kv_cache_memory": 64 << 20}),
                     ModelSpec("z", None, "/m/z/")]
    with pytest.raises(ValueError, match="share a name"):
        model_specs(build_parser().parse_args(["serve", "a=/m/x", "a=/m/y"]))
    with pytest.raises(ValueError, match="unknown model settings"):
        model_config(EngineConfig(), "/m/x", {"colour": "red"})


def test_requests_route_by_name_and_version(served):
    server, _, client = served
    assert {m.id for m in client.models.list().data} == {"smol:v1", "smol:v2", "other", "terse"}
    for asked, answered in [("smol", "smol:v1"), ("smol:v2", "smol:v2"), ("other", "other"), (None, "smol:v1")]:
        body = {"prompt": "Hi", "max_tokens": 2, **({"model": asked} if asked else {})}
        assert server.client.post("/v1/completions", json=body).json()["model"] == answered
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="smol:v9", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    metrics = server.client.get("/metrics").text
    assert 'tokenmill:generation_tokens_total{model_name="smol",version="v2"}' in metrics
    health = server.client.get("/health").json()["models"]
    assert health == {"smol:v1": "serving", "smol:v2": "serving", "other": "serving", "terse": "serving"}


def test_lora_adapters_are_models_of_their_own_batched_with_their_base(served, tmp_path):
    server, admin, client = served
    card = next(m for m in server.client.get("/v1/models").json()["data"] if m["id"] == "terse")
    assert card["parent"] == "smol:v1"
    loaded = admin.post("/v1/load_lora_adapter", json={"lora_name": "chatty",
                                                       "lora_path": _write_adapter(tmp_path / "chatty", seed=2)})
    assert loaded.status_code == 200, loaded.text
    assert server.client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"}).status_code == 401
    bad = admin.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path / "missing")})
    assert bad.status_code == 400

    def complete(model: str) -> tuple[str, str]:
        r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
        return r.model, r.choices[0].text

    # Base and both adapters at once, in the base engine's batches: each gets what it gets alone.
    alone = {m: complete(m) for m in ("smol:v1", "terse", "chatty")}
    together: dict = {}
    threads = [threading.Thread(target=lambda m=m: together.update({m: complete(m)})) for m in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone and [model for model, _ in alone.values()] == ["smol:v1", "terse", "chatty"]
    assert len({text for _, text in alone.values()}) == 3  # the adapters change what the model says
    assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "chatty"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="chatty", prompt="Hi", max_tokens=2)
    assert admin.delete("/admin/models/smol:v1").status_code == 409  # terse runs on it
    assert admin.delete("/admin/models/terse").status_code == 200
    assert wait_until(lambda: "terse" not in _admin_models(admin), timeout=30)


def test_the_admin_api_needs_its_key(served):
    server, _, _ = served
    assert server.client.get("/admin/models").status_code == 401
    bad = server.client.get("/admin/models", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"


def test_load_switch_and_unload_under_concurrent_streams(served):
    server, admin, client = served
    records = {m: {} for m in ("smol", "smol:v2", "other")}
    threads = [threading.Thread(target=_stream, args=(client, m, 120, r)) for m, r in records.items()]
    for t in threads:
        t.start()
    assert wait_until(lambda: all("model" in r for r in records.values()), timeout=60)

    # Load v3 while the three stream: it answers once v3 serves; their tokens keep coming meanwhile.
    loaded = admin.post("/admin/models", json={"model": "smol:v3", "path": PATH, "max_num_seqs": 4})
    assert loaded.status_code == 200 and loaded.json()["state"] == "serving", loaded.text
    assert admin.post("/admin/models", json={"model": "smol:v3", "path": PATH}).status_code == 409
    bad = admin.post("/admin/models", json={"model": "smol:v4", "path": "/no/such/model.gguf"})
    assert bad.status_code == 400 and "does not exist" in bad.json()["error"]["message"]
    assert admin.post("/admin/models", json={"model": "smol:v4", "path": PATH, "colour": 1}).status_code == 400

    # Switch smol's default to v3 while smol's first stream is still on v1.
    switch = admin.put("/admin/models/smol/default", json={"version": "v3"})
    assert switch.status_code == 200
    assert client.completions.create(model="smol", prompt="Hi", max_tokens=2).model == "smol:v3"
    assert admin.delete("/admin/models/smol:v3").status_code == 409  # the default, while smol has others

    # Unload v1: new requests get 404 at once; the stream on it finishes.
    before = _tree_rss(server.proc.pid)
    v1 = _admin_models(admin)["smol:v1"]
    assert admin.delete("/admin/models/smol:v1").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="smol:v1", prompt="Hi", max_tokens=2)
    for t in threads:
        t.join()
    for model, r in records.items():
        assert "error" not in r, (model, r)
        assert r["finish"] == "length" and r["max_gap"] < 2.0, (model, r["max_gap"])
    assert records["smol"]["model"] == "smol:v1" and records["other"]["model"] == "other"
    # Its engine process ends once the stream is done, and the server's process tree shrinks by about its size.
    assert wait_until(lambda: "smol:v1" not in _admin_models(admin), timeout=60)
    assert wait_until(lambda: before - _tree_rss(server.proc.pid) > 0.5 * v1["memory_bytes"], timeout=30)

    # Roll back: smol goes to v2.
    assert admin.put("/admin/models/smol/default", json={"version": "v2"}).status_code == 200
    assert client.completions.create(model="smol", prompt="Hi", max_tokens=2).model == "smol:v2"
    assert admin.put("/admin/models/smol/default", json={"version": "v1"}).status_code == 404


def test_models_in_the_directory_load_on_first_use_within_the_budget(served):
    _, admin, client = served
    assert client.completions.create(model="tiny", prompt="Hi", max_tokens=2).model == "tiny"
    assert _admin_models(admin)["tiny"]["on_demand"]
    # No room for a second one: the idle tiny makes way for tiny2.
    assert client.completions.create(model="tiny2", prompt="Hi", max_tokens=2).model == "tiny2"
    assert wait_until(lambda: "tiny" not in _admin_models(admin), timeout=30)
    # A model that would not fit even without the idle ones is a 507, and unloads nothing.
    big = admin.post("/admin/models", json={"model": "big", "path": PATH, "kv_cache_memory": 64 << 30})
    assert big.status_code == 507, big.text
    assert "tiny2" in _admin_models(admin)


def test_a_model_whose_engine_dies_fails_alone(served):
    server, admin, client = served
    victim = _admin_models(admin)["other"]
    os.kill(victim["engine_pid"], 9)
    assert wait_until(lambda: server.client.get("/health").json()["models"].get("other") == "failed", timeout=30)
    assert server.client.get("/health").status_code == 200  # the others serve
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="other", prompt="Hi", max_tokens=2)
    assert e.value.status_code == 503
    assert client.completions.create(model="smol", prompt="Hi", max_tokens=2).model == "smol:v2"
