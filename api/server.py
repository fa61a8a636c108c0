"""The FastAPI app: routes, API-key auth, error handlers, /metrics, and the uvicorn runner."""
from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import AppStatus

from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.core_client import MPEngineClient
from engine.engine_client import EngineClient

from .errors import EXPECTED_ERRORS, APIError, bad_request, install_error_handlers, internal_error
from .metrics import ServerMetrics
from .protocol import (
    ERROR_RESPONSES,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    generate_responses,
)
from .serving import OpenAIServing
from .serving_chat import ServingChat
from .serving_completions import ServingCompletions
from .tools import ToolRequest

logger = logging.getLogger("tokenmill.api")

# How long SIGTERM waits for in-flight requests before cancelling (and so aborting) them.
GRACEFUL_SHUTDOWN_S = 30


def _set_request_id(request: Request) -> None:
    request.state.request_id = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"


def _api_key_check(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes the same time wherever the strings differ: no timing oracle.
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")
    return check


class _Route(APIRoute):
    """Turns a bug in a handler into OpenAI's 500 object here, rather than in Starlette's outermost
    middleware, which would re-raise it and make uvicorn drop the (keep-alive) connection."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except EXPECTED_ERRORS:
                raise
            except Exception:
                return internal_error(request).response()

        return route


def build_app(engine: EngineClient, served_model_name: str | None = None, api_key: str | None = None,
              owns_engine: bool = True, sse_ping_s: float = 15.0, tool_call_parser: str | None = None) -> FastAPI:
    """An app serving `engine`. With owns_engine, the app's lifespan starts and stops the engine.
    tool_call_parser: the format of tool calls in replies (api/tool_parsers.py); by default the one the
    chat template implies."""
    model_name = served_model_name or engine.model_config.name
    metrics = ServerMetrics(lambda: engine.stats, model_name)
    serving = OpenAIServing(engine, model_name, metrics, sse_ping_s, tool_call_parser)
    # On SIGTERM, streams in flight finish (uvicorn's graceful shutdown waits for them) rather than
    # being cut by sse-starlette's default drain.
    AppStatus.disable_automatic_graceful_drain()
    completions, chat = ServingCompletions(serving), ServingChat(serving)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        if owns_engine:
            engine.shutdown()

    app = FastAPI(title="tokenmill", lifespan=lifespan, dependencies=[Depends(_set_request_id)])
    install_error_handlers(app)

    # response_class only documents the bodies (none, and Prometheus text); the handlers build their own.
    @app.get("/health", response_class=Response,
             responses={200: {"description": "The engine runs"}, 503: {"description": "The engine does not run"}})
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    api = APIRouter(dependencies=[Depends(_api_key_check(api_key))], route_class=_Route,
                    responses=ERROR_RESPONSES)
    card = ModelCard(id=model_name, created=created, root=engine.config.model,
                     max_model_len=serving.max_model_len)

    @api.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[card])

    @api.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> ModelCard:
        serving.check_model(model)
        return card

    @api.post("/v1/completions", response_model=CompletionResponse, responses=generate_responses(CompletionChunk))
    async def create_completion(req: CompletionRequest, raw: Request):
        return await completions.create(req, raw)

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses=generate_responses(ChatCompletionChunk))
    async def create_chat_completion(req: ChatCompletionRequest, raw: Request):
        return await chat.create(req, raw)

    @api.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages")
        tools = ToolRequest(req.tools, "auto", parallel=True) if req.tools else None
        tokens = (await serving.chat_prompt(req.messages, req.add_generation_prompt, tools) if req.messages is not None
                  else await engine.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=serving.max_model_len)

    @api.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        serving.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < serving.vocab_size]
        if bad:
            raise bad_request(f"tokens: token id {bad[0]} is outside the vocabulary [0, {serving.vocab_size})",
                              "tokens")
        return DetokenizeResponse(prompt=await engine.decode(req.tokens))

    app.include_router(api)
    return app


def run_server(config: EngineConfig, host: str, port: int, served_model_name: str | None = None,
               api_key: str | None = None, sse_ping_s: float = 15.0, engine_in_process: bool = False,
               tool_call_parser: str | None = None) -> int:
    """Load the model, then serve until SIGINT or SIGTERM (which drain in-flight requests first).

    The engine runs in a process of its own, or with engine_in_process on a thread of this one. Raises
    EngineStartupError if the engine cannot load the model. Returns the exit status: 0 after a clean
    stop, 1 if the engine died (so a supervisor restarts us)."""
    if engine_in_process:
        engine: EngineClient = AsyncLLMEngine.from_config(config)
    else:
        torch.set_num_threads(1)  # this process only tokenizes and serves HTTP: the cores are the engine's
        engine = MPEngineClient(config)
    app = build_app(engine, served_model_name, api_key, sse_ping_s=sse_ping_s, tool_call_parser=tool_call_parser)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))

    def stop_serving(error: Exception) -> None:  # runs on the engine's thread or reader; a plain flag
        logger.critical("shutting down: %s", error)
        server.should_exit = True  # open streams end by themselves, with the error as their last event

    engine.on_dead(stop_serving)
    # uvicorn re-raises the signal that stopped it once its graceful shutdown is done; after a
    # clean drain, SIGTERM should end the process with status 0, not die of the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 1 if engine.dead_error is not None else 0
