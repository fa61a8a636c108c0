"""POST /invocations (SageMaker's route, as vLLM serves it): the body's shape picks the API; the answer
is the one the API's own route gives, streamed too; a body of no known shape is a 400 saying what fits."""
import json

import pytest

MSG = [{"role": "user", "content": "Name a color."}]


def _strip(body: dict) -> dict:
    """A response without what differs between two identical requests."""
    return {k: v for k, v in body.items() if k not in ("id", "created")}


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 5, "temperature": 0}),
    ("/v1/completions", {"prompt": "The sky is", "max_tokens": 5, "temperature": 0}),
], ids=["chat", "completions"])
def test_the_body_shape_picks_the_api(http, route, body):
    direct, invoked = http.post(route, json=body), http.post("/invocations", json=body)
    assert direct.status_code == invoked.status_code == 200
    assert _strip(invoked.json()) == _strip(direct.json())


def test_streaming_works_through_invocations(http):
    body = {"messages": MSG, "max_tokens": 5, "temperature": 0}
    with http.stream("POST", "/invocations", json={**body, "stream": True}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body,param,words", [
    ({"input": "hi"}, None, ["messages", "prompt"]),
    ({"messages": []}, "messages", ["messages"]),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens", ["max_tokens"]),
])
def test_a_body_no_api_takes_is_a_400_naming_what_fits(http, body, param, words):
    r = http.post("/invocations", json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == param
    assert all(w in error["message"] for w in words), error


def test_invocations_is_in_the_schema(http):
    operation = http.get("/openapi.json").json()["paths"]["/invocations"]["post"]
    bodies = operation["requestBody"]["content"]["application/json"]["schema"]["anyOf"]
    assert [b["$ref"].rsplit("/", 1)[1] for b in bodies] == ["ChatCompletionRequest", "CompletionRequest"]
    assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
