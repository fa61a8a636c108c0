"""POST /invocations, the route SageMaker calls and vLLM serves: one URL for the generate APIs, the body's
shape saying which. INVOCATIONS is tried in order and the first API whose marking field the body has
takes it; an API joins by adding a row (its field, request and response models, and how a served model
answers it)."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from .errors import bad_request
from .models import ServedModel
from .protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    generate_responses,
)


@dataclass(frozen=True)
class Invocation:
    """One API /invocations dispatches to: a body with `field` is its `request`."""

    field: str
    api: str
    request: type[BaseModel]
    response: type[BaseModel]
    chunk: type[BaseModel]
    answer: Callable[[ServedModel, Any, Request], Awaitable[Any]]


INVOCATIONS = [
    Invocation("messages", "chat completions", ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk,
               lambda m, req, raw: m.chat.create(req, raw)),
    Invocation("prompt", "completions", CompletionRequest, CompletionResponse, CompletionChunk,
               lambda m, req, raw: m.completions.create(req, raw)),
]


def dispatch(body: dict[str, Any]) -> tuple[Invocation, BaseModel]:
    """The API the body is for and its request, validated as that API's; a 400 naming what was expected
    when the body is none of them."""
    for invocation in INVOCATIONS:
        if invocation.field in body:
            try:
                return invocation, invocation.request.model_validate(body)
            except ValidationError as e:
                raise RequestValidationError(e.errors()) from None
    expected = ", ".join(f"{i.field} ({i.api})" for i in INVOCATIONS)
    raise bad_request(f"/invocations could not tell the API from the body: give one of the fields {expected}")


def openapi_request_body() -> dict[str, Any]:
    """The route's request body for the schema: any of the APIs' requests."""
    schemas = [{"$ref": f"#/components/schemas/{i.request.__name__}"} for i in INVOCATIONS]
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"anyOf": schemas}}}}}


def openapi_responses() -> dict[int | str, dict[str, Any]]:
    """The route's responses for the schema: any of the APIs' responses, or an event stream of their chunks."""
    responses = generate_responses(*(i.chunk for i in INVOCATIONS))
    whole = {"anyOf": [{"$ref": f"#/components/schemas/{i.response.__name__}"} for i in INVOCATIONS]}
    responses[200]["content"]["application/json"] = {"schema": whole}
    return responses
