"""The FastAPI app: routes, API-key auth, error handlers, /metrics, and the uvicorn runner."""
from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

import torch
import uvicorn
from fastapi import APIRouter, Body, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import AppStatus

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core.async_engine import AsyncLLMEngine
from tokenmill.engine.core.core_client import MPEngineClient
from tokenmill.engine.core.engine_client import EngineClient

from .access_log import AccessLog
from .admin import admin_router
from .auth import bearer_key_check
from .body_limit import BodyLimit
from .chat_page import chat_page_router
from .errors import EXPECTED_ERRORS, bad_request, install_error_handlers, internal_error
from .http_limits import HTTPLimits
from .invocations import dispatch, openapi_request_body, openapi_responses
from .model_spec import ModelSpec
from .models import ModelRegistry, ServedModel
from .observe import RequestObserver
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
from .response_store import ResponseStore
from .serving_messages import messages_router
from .serving_responses import add_responses_routes
from .tools import ToolRequest
from .tracing import RequestTracer

logger = logging.getLogger("tokenmill.api")

# How long SIGTERM waits for in-flight requests before cancelling (and so aborting) them.
GRACEFUL_SHUTDOWN_S = 30


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


def build_app(models: ModelRegistry | EngineClient, served_model_name: str | None = None, api_key: str | None = None,
              owns_engine: bool = True, sse_ping_s: float = 15.0, tool_call_parser: str | None = None,
              admin_key: str | None = None, reasoning_parser: str | None = None,
              response_store: ResponseStore | None = None, http_limits: HTTPLimits | None = None,
              access_log: AccessLog | None = None, tracer: RequestTracer | None = None,
              webui: bool = True) -> FastAPI:
    """An app serving the registry's models, or one engine (named served_model_name, else its model's
    name). The app's lifespan starts the engines and stops those it owns. tool_call_parser: the format
    of tool calls in replies (api/tool_parsers.py), by default the one each chat template implies.
    admin_key: enables the management API under /admin/ (api/admin.py). reasoning_parser: how replies split
    into reasoning and answer (api/reasoning_parsers.py), by default not at all. response_store: where the
    Responses API keeps stored responses (default: a ResponseStore with its default bounds). http_limits: the
    bounds on a request's body, its size and how long it may take (default: HTTPLimits()'s). access_log: how requests
    are logged (default: without prompts); tracer: where their spans go (default: not traced). webui: the chat page
    at / (api/chat_page.py)."""
    if isinstance(models, EngineClient):
        engine, models = models, ModelRegistry(sse_ping_s=sse_ping_s, tool_call_parser=tool_call_parser,
                                               reasoning_parser=reasoning_parser)
        models.add(engine, served_model_name or engine.model_config.name, owns_engine=owns_engine)
    # On SIGTERM, streams in flight finish (uvicorn's graceful shutdown waits for them) rather than
    # being cut by sse-starlette's default drain.
    AppStatus.disable_automatic_graceful_drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for m in models.models.values():
            m.engine.start()
        for name, path in models.startup_loras:
            await models.add_lora(name, path)
        yield
        models.shutdown()
        if tracer is not None:
            tracer.shutdown()

    app = FastAPI(title="tokenmill", lifespan=lifespan)
    install_error_handlers(app)
    http_limits = http_limits or HTTPLimits()
    app.add_middleware(BodyLimit, max_bytes=http_limits.max_request_bytes, timeout_s=http_limits.request_body_timeout)
    # Outermost, so that what BodyLimit refuses is counted, logged and traced too.
    app.add_middleware(RequestObserver, metrics=models.metrics, access_log=access_log or AccessLog(), tracer=tracer)

    # response_class only documents the bodies (none, and Prometheus text); the handlers build their own.
    @app.get("/health", response_class=Response,
             responses={200: {"description": "At least one model serves; the body gives each model's state"},
                        503: {"description": "No model serves"}})
    async def health() -> Response:
        states = {m.id: m.state if m.engine.is_running or m.state != "serving" else "stopped"
                  for m in models.models.values()}
        serving = any(state == "serving" for state in states.values())
        return JSONResponse({"models": states}, status_code=200 if serving else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(models.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    api = APIRouter(dependencies=[Depends(bearer_key_check(api_key, x_api_key=True))], route_class=_Route,
                    responses=ERROR_RESPONSES)

    def card(m: ServedModel) -> ModelCard:
        return ModelCard(id=m.id, created=m.created, root=m.path or m.engine.config.model,
                         parent=m.base.id if m.base else None, max_model_len=m.serving.max_model_len)

    @api.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[card(m) for m in models.models.values() if m.state == "serving"])

    @api.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> ModelCard:
        async with models.using(model) as m:
            return card(m)

    @api.post("/v1/completions", response_model=CompletionResponse, responses=generate_responses(CompletionChunk))
    async def create_completion(req: CompletionRequest, raw: Request):
        async with models.using(req.model) as m:
            return await m.completions.create(req, raw)

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses=generate_responses(ChatCompletionChunk))
    async def create_chat_completion(req: ChatCompletionRequest, raw: Request):
        async with models.using(req.model) as m:
            return await m.chat.create(req, raw)

    @api.post("/invocations", responses=openapi_responses(), openapi_extra=openapi_request_body())
    async def invocations(raw: Request, body: Annotated[dict, Body()]):
        invocation, req = dispatch(body)
        async with models.using(req.model) as m:
            return await invocation.answer(m, req, raw)

    add_responses_routes(api, models, response_store or ResponseStore())

    @api.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages")
        async with models.using(req.model) as m:
            tools = ToolRequest(req.tools, "auto", parallel=True) if req.tools else None
            tokens = (await m.serving.chat_prompt(req.messages, req.add_generation_prompt, tools)
                      if req.messages is not None
                      else await m.engine.encode(req.prompt, add_special_tokens=req.add_special_tokens))
            return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=m.serving.max_model_len)

    @api.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        async with models.using(req.model) as m:
            vocab_size = m.serving.vocab_size
            bad = [t for t in req.tokens if not 0 <= t < vocab_size]
            if bad:
                raise bad_request(f"tokens: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "tokens")
            return DetokenizeResponse(prompt=await m.engine.decode(req.tokens))

    app.include_router(api)
    app.include_router(messages_router(models, api_key))
    if admin_key is not None:
        app.include_router(admin_router(models, admin_key, route_class=_Route))
    if webui:
        app.include_router(chat_page_router())
    return app


def run_server(base: EngineConfig, host: str, port: int, specs: list[ModelSpec], api_key: str | None = None,
               sse_ping_s: float = 15.0, engine_in_process: bool = False, tool_call_parser: str | None = None,
               admin_key: str | None = None, memory_budget: int | None = None, model_dir: str | None = None,
               lora_modules: list[tuple[str, str]] | None = None, reasoning_parser: str | None = None,
               response_store: ResponseStore | None = None, http_limits: HTTPLimits | None = None,
               access_log: AccessLog | None = None, tracer: RequestTracer | None = None,
               webui: bool = True) -> int:
    """Load the models, then serve until SIGINT or SIGTERM (which drain in-flight requests first).

    Each engine runs in a process of its own, or with engine_in_process on a thread of this one. Raises
    EngineStartupError if an engine cannot load its model, ValueError for a bad setting or a budget the
    models do not fit. Returns the exit status: 0 after a clean stop, 1 if every engine died (so a
    supervisor restarts us); while one model serves, the server stays up. http_limits: what one request and
    one connection may hold (api/http_limits.py)."""
    if not engine_in_process:
        torch.set_num_threads(1)  # this process only tokenizes and serves HTTP: the cores are the engines'
    factory = AsyncLLMEngine.from_config if engine_in_process else MPEngineClient
    models = ModelRegistry(factory, sse_ping_s, tool_call_parser, memory_budget, model_dir, base, reasoning_parser)
    for spec in specs:
        models.load_at_start(spec)
    models.startup_loras = list(lora_modules or [])
    http_limits = http_limits or HTTPLimits()
    app = build_app(models, admin_key=admin_key, api_key=api_key, response_store=response_store,
                    http_limits=http_limits, access_log=access_log, tracer=tracer, webui=webui)
    # Our access log replaces uvicorn's, and uvicorn's own lines go through the root logger's format (text or
    # JSON, as the CLI configured it) rather than handlers of its own.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", log_config=None,
                                           access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                                           **http_limits.uvicorn_options()))

    def stop_serving(error: Exception) -> None:  # runs on an engine's thread or reader; a plain flag
        logger.critical("shutting down, no model is left serving: %s", error)
        server.should_exit = True  # open streams end by themselves, with the error as their last event

    models.on_all_failed = stop_serving
    # uvicorn re-raises the signal that stopped it once its graceful shutdown is done; after a
    # clean drain, SIGTERM should end the process with status 0, not die of the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    failed = models.models and all(m.state == "failed" for m in models.models.values())
    return 1 if failed else 0
