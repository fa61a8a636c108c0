"""Which models a server serves: NAME[:VERSION], a path, and the model's own engine settings, as the
command line, --config and the management API give them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill.engine.config import EngineConfig

# Engine settings a model may set for itself (--config, POST /admin/models); the rest are the server's.
MODEL_SETTINGS = ("dtype", "quantization", "load_format", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                  "kv_cache_memory", "block_size", "enable_prefix_caching", "enforce_eager", "num_threads", "seed",
                  "device", "tensor_parallel_size")


def model_id(name: str, version: str | None) -> str:
    return f"{name}:{version}" if version else name


@dataclass
class ModelSpec:
    """A model to serve: NAME[:VERSION], its path, and its own engine settings (MODEL_SETTINGS)."""

    name: str
    version: str | None
    path: str
    settings: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str, settings: dict | None = None) -> ModelSpec:
        """`PATH`, `NAME=PATH` or `NAME:VERSION=PATH`. A path alone is named after its file (without
        .gguf) or folder."""
        label, sep, path = spec.partition("=")
        if not sep:
            path, label = spec, default_name(spec)
        return cls.named(label, path, settings)

    @classmethod
    def named(cls, label: str, path: str, settings: dict | None = None) -> ModelSpec:
        """label NAME or NAME:VERSION."""
        name, colon, version = label.partition(":")
        if not name or (colon and not version) or not path:
            raise ValueError(f"model {label}={path}: give PATH, NAME=PATH or NAME:VERSION=PATH")
        return cls(name, version or None, path, dict(settings or {}))


def default_name(path: str) -> str:
    p = Path(path.rstrip("/"))
    return p.stem if p.suffix == ".gguf" else p.name


def model_config(base: EngineConfig, path: str, settings: dict) -> EngineConfig:
    """base with the model's path and its own settings; ValueError naming an unknown or bad one."""
    unknown = sorted(set(settings) - set(MODEL_SETTINGS))
    if unknown:
        raise ValueError(f"unknown model settings {unknown}; a model may set {', '.join(MODEL_SETTINGS)}")
    return dataclasses.replace(base, model=path, **settings)
