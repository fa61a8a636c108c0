"""A real server on a loopback port serving the default model, and clients for it.

One engine (float32, 256 MiB of KV cache) is loaded once per session and served by two apps: an
open one, and one that requires an API key under another model name.
"""
from __future__ import annotations

import httpx
import openai
import pytest
from api_helpers import API_KEY, ServerThread

from tokenmill.api.server import build_app
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core.async_engine import AsyncLLMEngine


@pytest.fixture(scope="session")
def engine():
    config = EngineConfig(dtype="float32", kv_cache_memory=256 << 20, max_num_seqs=32, max_model_len=2048)
    return AsyncLLMEngine.from_config(config)


@pytest.fixture(scope="session")
def server(engine):
    with ServerThread(build_app(engine)) as s:
        yield s


@pytest.fixture(scope="session")
def secure_server(engine, server):
    """A second app over the same engine, with an API key; it leaves the engine to the first app."""
    with ServerThread(build_app(engine, served_model_name="tm-secure", api_key=API_KEY, owns_engine=False)) as s:
        yield s


@pytest.fixture(scope="session")
def model_name(engine) -> str:
    return engine.engine.model_config.name


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def async_client(server):
    """A factory: an AsyncOpenAI client belongs to the event loop it is first used in."""
    return lambda: openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
