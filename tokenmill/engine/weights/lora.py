"""LoRA adapters served side by side on one base model, as vLLM's multi-LoRA serving does.

An adapter is a PEFT folder: adapter_config.json (r, lora_alpha, target_modules, use_rslora) and
adapter_model.safetensors (lora_A [r, in] and lora_B [out, r] per targeted linear). `load_adapter` reads
and checks one against the base model; `LoRASlots` keeps up to max_loras of them resident in slots of
stacked weights inside the model's LoRALinear wrappers, so that one batch runs tokens of several adapters
(and of none): each step, `plan` groups the batch's tokens by slot (kernels.reference.LoRAPlan).

An adapter's id is never reused while the engine lives: the prefix cache keys blocks by it, so blocks an
adapter computed can never serve another adapter, nor one loaded later under the same name.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn as nn

from tokenmill.engine.config import EngineConfig, ModelConfig
from tokenmill.engine.core.request import Sequence
from tokenmill.engine.models.layers import LoRAContext, LoRALinear
from tokenmill.kernels.reference import LoRAPlan

# A checkpoint module's place in the model: (fused linear, its slice).
_PLACES = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
           "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
           "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1), "down_proj": ("mlp.down_proj", 0)}
SUPPORTED_MODULES = tuple(_PLACES)
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (older PEFT: lora_A.default.weight)
_KEY = re.compile(r"base_model\.model\.(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)"
                  r"\.lora_([AB])(?:\.\w+)?\.weight")


@dataclass(frozen=True)
class LoRAInfo:
    """A resident adapter, as list_loras reports it."""

    name: str
    id: int
    path: str
    rank: int


@dataclass
class LoRAWeights:
    """One adapter read from disk: (A [r, in], scaling * B [out, r]) in float32 per (layer, module)."""

    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(inputs, outputs) of each linear an adapter may target."""
    q, kv, h, i = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _read_config(path: str) -> dict:
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"no adapter_config.json in {path!r}: a LoRA adapter is a PEFT folder holding "
                         "adapter_config.json and adapter_model.safetensors")
    try:
        with open(config_file) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {config_file}: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_file}: peft_type is {cfg['peft_type']!r}; only LORA adapters are served")
    r = cfg.get("r")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"{config_file}: r must be a positive integer; got {r!r}")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, list):  # a string is a regex (or "all-linear"): the weights' names are checked below
        unsupported = sorted(set(targets) - set(SUPPORTED_MODULES))
        if unsupported:
            raise ValueError(f"{config_file}: target_modules {unsupported} are not supported; an adapter may "
                             f"target {', '.join(SUPPORTED_MODULES)}")
    for key, why in (("modules_to_save", "full copies of modules"), ("use_dora", "DoRA"),
                     ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas")):
        if cfg.get(key):
            raise ValueError(f"{config_file}: {key} ({why}) is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{config_file}: bias {cfg['bias']!r} is not supported; only 'none'")
    return cfg


def load_adapter(path: str, model_config: ModelConfig, max_lora_rank: int) -> LoRAWeights:
    """Read a PEFT LoRA folder and check it against the base model; ValueError says what is wrong."""
    from safetensors import safe_open

    cfg = _read_config(path)
    rank = cfg["r"]
    if rank > max_lora_rank:
        raise ValueError(f"adapter {path!r} has rank {rank}, above max_lora_rank {max_lora_rank}; start the engine "
                         f"with max_lora_rank >= {rank}")
    scaling = cfg.get("lora_alpha", 8) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        hint = " (only adapter_model.bin: save it with safe_serialization=True)" if os.path.isfile(
            os.path.join(path, "adapter_model.bin")) else ""
        raise ValueError(f"no adapter_model.safetensors in {path!r}{hint}")
    shapes = module_shapes(model_config)
    try:
        with safe_open(file, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file raises safetensors' own error types
        raise ValueError(f"cannot read {file}: {e}") from None
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{file}: unexpected tensor {key!r}; an adapter may hold lora_A and lora_B "
                             f"of {', '.join(SUPPORTED_MODULES)} only")
        layer, module, which = int(m[1]), m[2], m[3]
        if module not in shapes:
            raise ValueError(f"{file}: {key!r} targets {module}; an adapter may target "
                             f"{', '.join(SUPPORTED_MODULES)}")
        if layer >= model_config.num_hidden_layers:
            raise ValueError(f"{file}: {key!r} is for layer {layer}, but the base model "
                             f"{model_config.name!r} has {model_config.num_hidden_layers} layers")
        inputs, outputs = shapes[module]
        want = (rank, inputs) if which == "A" else (outputs, rank)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{file}: {key!r} has shape {list(tensor.shape)}, but rank {rank} on the base "
                             f"model {model_config.name!r} needs {list(want)}: is it an adapter of another model?")
        pairs.setdefault((layer, module), {})[which] = tensor.float()
    if not pairs:
        raise ValueError(f"{file} holds no LoRA weights")
    for (layer, module), ab in pairs.items():
        if len(ab) != 2:
            raise ValueError(f"{file}: layer {layer} {module} has lora_{''.join(ab)} but not lora_"
                             f"{'B' if 'A' in ab else 'A'}")
    return LoRAWeights(rank, {place: (ab["A"], ab["B"] * scaling) for place, ab in pairs.items()})


class LoRASlots:
    """The adapters resident in the model: wraps each linear an adapter may target in a LoRALinear with
    max_loras slots of stacked weights, loads adapters into free slots, and plans each step."""

    def __init__(self, model: nn.Module, model_config: ModelConfig, config: EngineConfig, ops: ModuleType):
        self.model_config = model_config
        self.max_loras = config.max_loras
        self.max_rank = config.max_lora_rank
        self.context = LoRAContext()
        self.loras: dict[str, LoRAInfo] = {}
        self.slot_of: dict[int, int] = {}  # adapter id -> slot
        self._next_id = 1  # 0 is the base model
        shapes = module_shapes(model_config)
        fused: dict[str, list[str]] = {}
        for module, (linear, _) in _PLACES.items():
            fused.setdefault(linear, []).append(module)
        self.slices = {linear: [shapes[m][1] for m in modules] for linear, modules in fused.items()}
        for i, layer in enumerate(model.layers):
            for linear, modules in fused.items():
                name = f"layers.{i}.{linear}"
                wrapped = LoRALinear(layer.get_submodule(linear), shapes[modules[0]][0], sum(self.slices[linear]),
                                     len(modules), self.max_loras, self.max_rank, self.context, ops)
                model.set_submodule(name, wrapped)
        self.model = model
        self.ops = ops

    def add(self, name: str, path: str) -> int:
        """Load the adapter at path under name; returns its id. ValueError if it cannot be served."""
        if name in self.loras:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded; remove it first")
        free = sorted(set(range(self.max_loras)) - set(self.slot_of.values()))
        if not free:
            raise ValueError(f"{self.max_loras} LoRA adapters are loaded, as many as max_loras allows; remove one "
                             "first, or start the engine with a larger max_loras")
        adapter = load_adapter(path, self.model_config, self.max_rank)
        slot = free[0]
        self._write(slot, adapter)
        info = LoRAInfo(name, self._next_id, path, adapter.rank)
        self._next_id += 1
        self.loras[name] = info
        self.slot_of[info.id] = slot
        return info.id

    def remove(self, name: str) -> LoRAInfo:
        info = self.loras.pop(name)
        del self.slot_of[info.id]  # the slot's weights are overwritten by the next add
        return info

    @torch.no_grad()
    def _write(self, slot: int, adapter: LoRAWeights) -> None:
        r, big_r = adapter.rank, self.max_rank
        for i, layer in enumerate(self.model.layers):
            for linear, sizes in self.slices.items():
                wrapped: LoRALinear = layer.get_submodule(linear)
                wrapped.lora_a[slot].zero_()
                wrapped.lora_b[slot].zero_()
                for module, (place, s) in _PLACES.items():
                    if place != linear or (i, module) not in adapter.weights:
                        continue
                    a, b = adapter.weights[(i, module)]
                    offset = sum(sizes[:s])
                    wrapped.lora_a[slot, s * big_r:s * big_r + r] = a
                    wrapped.lora_b[slot, offset:offset + sizes[s], s * big_r:s * big_r + r] = b

    def warm_up(self, device: torch.device) -> None:
        """Compile the LoRA kernels now (a variant per linear's shape), not in the first step that needs them."""
        plan = LoRAPlan.build({0: [0]}, device)
        for linear in self.slices:
            wrapped: LoRALinear = self.model.layers[0].get_submodule(linear)
            a, b = wrapped.lora_a, wrapped.lora_b
            y = torch.zeros(1, b.shape[1], dtype=b.dtype, device=device)
            self.ops.add_lora(y, torch.zeros(1, a.shape[2], dtype=a.dtype, device=device), a, b, plan)

    def plan(self, seqs: list[Sequence], num_tokens: list[int], device: torch.device) -> LoRAPlan | None:
        """This step's token rows grouped by adapter slot; None when no scheduled sequence has an adapter."""
        rows_by_slot: dict[int, list[int]] = {}
        row = 0
        for seq, n in zip(seqs, num_tokens, strict=True):
            if seq.lora_id:
                rows_by_slot.setdefault(self.slot_of[seq.lora_id], []).extend(range(row, row + n))
            row += n
        return LoRAPlan.build(rows_by_slot, device) if rows_by_slot else None
