"""tokenmill's engine: continuous batching over a paged KV cache. Imports no web framework."""
from .config import EngineConfig
from .engine_client import EngineClient, EngineDeadError, EngineOverloadedError, EngineStoppedError, RequestFailedError
from .limits import InvalidRequestError, RequestLimits
from .llm import LLM
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput",
           "EngineClient", "EngineDeadError", "EngineOverloadedError", "EngineStoppedError", "RequestFailedError",
           "InvalidRequestError", "RequestLimits"]
