"""tokenmill: an LLM text-generation serving engine.

The offline API: `from tokenmill import LLM, SamplingParams` (BeamSearchParams for LLM.beam_search). The three
parts live in sub-packages that import one way, `tokenmill.api -> tokenmill.engine -> tokenmill.kernels`. Names load
on first use, so importing `tokenmill.kernels` (or the CLI's help) does not pull in the engine.
"""
from __future__ import annotations

import importlib

_ENGINE_NAMES = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "BeamSearchParams", "BeamSearchOutput",
                 "BeamSearchSequence", "RequestOutput", "CompletionOutput",
                 "EngineClient", "EngineDeadError", "EngineOverloadedError", "EngineStoppedError",
                 "RequestFailedError", "InvalidRequestError", "RequestLimits"]
__all__ = _ENGINE_NAMES


def __getattr__(name: str):
    if name not in _ENGINE_NAMES:
        raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
    value = getattr(importlib.import_module("tokenmill.engine"), name)
    globals()[name] = value  # later lookups skip this hook
    return value
