"""Schema fuzzing: schemathesis draws requests, valid and invalid, from the server's own OpenAPI schema
and checks that no answer is a 5xx and every answer matches what the schema declares for it
(status code, content type, headers, body; event streams event by event).

schemathesis's pytest integration (`from_fixture`) does not run under pytest 9, so each operation
gets a plain Hypothesis test over schemathesis's strategy for it.
"""
from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

# Every operation in the schema; test_every_operation_is_fuzzed keeps the list complete.
OPERATIONS = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/{model}"),
              ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
              ("POST", "/detokenize"), ("POST", "/invocations"), ("POST", "/v1/messages"),
              ("POST", "/v1/messages/count_tokens"), ("POST", "/v1/responses"), ("GET", "/v1/responses/{response_id}"),
              ("DELETE", "/v1/responses/{response_id}"), ("POST", "/v1/responses/{response_id}/cancel")]
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance]

# Request fields whose size sets a generation's cost: the number of choices and of tokens.
_COST_FIELDS = ("n", "best_of", "max_tokens", "max_completion_tokens", "max_output_tokens")
_CHEAP = 2


def cheap_generation(body: Any, max_model_len: int) -> Any:
    """Lower costly sizes to _CHEAP, so a generation takes milliseconds on a CPU. Sizes the server
    rejects (not positive integers, or past the context) are kept, so their 400s are still fuzzed."""
    if not isinstance(body, dict):
        return body
    for field in _COST_FIELDS:
        value = body.get(field)
        if type(value) is int and _CHEAP < value <= max_model_len:
            body[field] = _CHEAP
    # Chat without a limit generates up to the end of the context.
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = _CHEAP
    if "input" in body and body.get("max_output_tokens") is None:  # so does a response
        body["max_output_tokens"] = _CHEAP
    return body


@pytest.fixture(scope="module")
def api_schema(server, engine) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    max_model_len = engine.engine.max_model_len

    @schema.hook
    def map_body(context: schemathesis.HookContext, body: Any) -> Any:
        return cheap_generation(body, max_model_len)

    return schema


def test_every_operation_is_fuzzed(api_schema) -> None:
    declared = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert declared == set(OPERATIONS)


# Valid requests for every operation; invalid ones where there is something to break: a JSON body
# (the other operations' only parameter is a free string). Valid generations once more as event
# streams: few valid requests happen to ask for one.
CASES = ([(method, path, GenerationMode.POSITIVE, False) for method, path in OPERATIONS]
         + [(method, path, GenerationMode.NEGATIVE, False) for method, path in OPERATIONS
            if method == "POST" and "{" not in path]
         + [("POST", path, GenerationMode.POSITIVE, True)
            for path in ("/v1/completions", "/v1/chat/completions", "/v1/messages", "/v1/responses")])


@pytest.mark.parametrize(("method", "path", "mode", "stream"), CASES,
                         ids=[f"{m} {p} {g.value}{' stream' * s}" for m, p, g, s in CASES])
def test_schema_fuzz(api_schema, method: str, path: str, mode: GenerationMode, stream: bool) -> None:
    @given(case=api_schema[path][method].as_strategy(mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
    def fuzz(case: schemathesis.Case) -> None:
        if stream:
            case.body = {**case.body, "stream": True}
        case.call_and_validate(checks=CHECKS, timeout=60)

    fuzz()
