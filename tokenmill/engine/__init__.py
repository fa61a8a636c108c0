"""tokenmill's engine: continuous batching over a paged KV cache. Imports no web framework."""
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineOverloadedError,
    EngineStoppedError,
    RequestFailedError,
)
from tokenmill.engine.core.llm_engine import LLMEngine
from tokenmill.engine.limits import InvalidRequestError, RequestLimits
from tokenmill.engine.llm import LLM
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.sampling.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from tokenmill.engine.sampling.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "BeamSearchParams", "BeamSearchOutput",
           "BeamSearchSequence", "RequestOutput", "CompletionOutput",
           "EngineClient", "EngineDeadError", "EngineOverloadedError", "EngineStoppedError", "RequestFailedError",
           "InvalidRequestError", "RequestLimits"]
