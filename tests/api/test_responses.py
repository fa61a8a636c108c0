"""The Responses API (POST /v1/responses and the stored responses) through the official OpenAI SDK against
a real server: text, the stream and its events, instructions, max_output_tokens, text.format, a tool
round trip inline and through previous_response_id, the store, and the 400s and 404s. Replies are
greedy (temperature 0); tool calls are forced by grammar, which SmolLM2 could not be trusted to make."""
import json

import httpx
import jsonschema
import openai
import pytest
from api_helpers import API_KEY, ServerThread
from openai.types.responses import Response as SDKResponse

from tokenmill.api.response_store import ResponseStore
from tokenmill.api.server import build_app
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core.async_engine import AsyncLLMEngine

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object",
                          "properties": {"city": {"type": "string", "maxLength": 30},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False},
           "strict": True}
ASK = "What is the weather in Paris?"


def _create(client, model_name, **kwargs):
    kwargs.setdefault("max_output_tokens", 16)
    return client.responses.create(model=model_name, temperature=0, **kwargs)


def _comparable(response: dict) -> dict:
    """A response without what differs between two runs of one request: ids, timestamps, and how much of the
    prompt the prefix cache held (the second run finds the first's blocks)."""
    response = {k: v for k, v in response.items() if k not in ("id", "created_at")}
    response["output"] = [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in response["output"]]
    if response.get("usage"):
        response["usage"] = {**response["usage"], "input_tokens_details": None}
    return response


def _streamed(client, model_name, **kwargs) -> tuple[list, SDKResponse]:
    events = list(_create(client, model_name, stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    return events, events[-1].response


def test_plain_text_parses_into_the_sdk_response(client, http, model_name):
    response = _create(client, model_name, input="Tell me a story.")
    raw = http.get(f"/v1/responses/{response.id}").json()
    SDKResponse.model_validate(raw)  # strictly: every required field there, of its type
    assert response.id.startswith("resp_") and response.object == "response" and response.model == model_name
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.output_text == message.content[0].text != ""
    usage = response.usage
    assert usage.output_tokens == 16 and usage.total_tokens == usage.input_tokens + 16
    assert usage.input_tokens_details.cached_tokens >= 0 and usage.output_tokens_details.reasoning_tokens == 0
    assert response.store and response.parallel_tool_calls and response.tools == [] and response.tool_choice == "auto"
    assert response.text.format.type == "text" and response.temperature == 0 and response.max_output_tokens == 16


def test_the_reply_equals_the_chat_completions_reply(client, model_name):
    """Both render the same conversation through the chat template: the same greedy text."""
    response = _create(client, model_name, input="Tell me a story.", instructions="You are a poet.")
    chat = client.chat.completions.create(model=model_name, temperature=0, max_tokens=16, messages=[
        {"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Tell me a story."}])
    assert response.output_text == chat.choices[0].message.content
    assert response.instructions == "You are a poet."
    plain = _create(client, model_name, input="Tell me a story.")
    assert plain.output_text != response.output_text


def test_streamed_events_build_the_non_streamed_response(client, http, model_name):
    kwargs = dict(input=[{"role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}],
                  max_output_tokens=12, metadata={"run": "7"})
    whole = _create(client, model_name, **kwargs)
    events, final = _streamed(client, model_name, **kwargs)
    assert events[-1].type == "response.incomplete"
    assert _comparable(final.model_dump()) == _comparable(whole.model_dump())
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert done.text == text and done.item_id == final.output[0].id
    assert [e.type for e in events if "delta" not in e.type] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete"]
    # The stored response is the one the stream ended with; the raw stream names each event.
    assert http.get(f"/v1/responses/{final.id}").json() == json.loads(final.model_dump_json(exclude_unset=True))
    with http.stream("POST", "/v1/responses", json={"input": "Hi", "max_output_tokens": 2, "stream": True}) as r:
        blocks = r.read().decode().split("\n\n")[:-1]
    assert blocks[0].startswith("event: response.created\ndata: {")
    assert blocks[-1].startswith("event: response.incomplete\ndata: {")  # the terminal event, no [DONE]


def test_json_schema_format_gives_json_that_fits(client, model_name):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    text = {"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}}
    response = _create(client, model_name, input="Invent a person.", text=text, max_output_tokens=60)
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema" and response.text.format.schema_ == schema


def _forced_call(client, model_name, **kwargs):
    response = _create(client, model_name, input=ASK, tools=[WEATHER], tool_choice="required",
                       max_output_tokens=60, **kwargs)
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    return response, call


def test_tool_round_trip_through_previous_response_id(client, model_name):
    first, call = _forced_call(client, model_name)
    assert first.status == "completed" and first.tool_choice == "required" and first.tools[0].name == "get_weather"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}
    second = _create(client, model_name, previous_response_id=first.id, input=[result], tools=[WEATHER],
                     max_output_tokens=20)
    assert second.previous_response_id == first.id and second.output_text
    # The same conversation sent whole renders the same prompt: the same reply.
    inline = _create(client, model_name, tools=[WEATHER], max_output_tokens=20, input=[
        {"role": "user", "content": ASK},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        result])
    assert inline.output_text == second.output_text
    assert second.usage.input_tokens == inline.usage.input_tokens > first.usage.input_tokens


def test_streamed_tool_call_equals_the_whole_call(client, model_name):
    whole, call = _forced_call(client, model_name)
    events, final = _streamed(client, model_name, input=ASK, tools=[WEATHER], tool_choice="required",
                              max_output_tokens=60)
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert arguments == done.arguments == call.arguments and done.name == "get_weather"
    assert _comparable(final.model_dump()) == _comparable(whole.model_dump())
    named = _create(client, model_name, input=ASK, tools=[WEATHER], max_output_tokens=60,
                    tool_choice={"type": "function", "name": "get_weather"})
    assert [item.name for item in named.output] == ["get_weather"]


def test_store_get_delete_and_unknown_ids(client, http, model_name):
    response = _create(client, model_name, input="Hello", max_output_tokens=4)
    assert client.responses.retrieve(response.id).output_text == response.output_text
    deleted = http.delete(f"/v1/responses/{response.id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": response.id, "object": "response", "deleted": True}
    for request in (lambda: client.responses.retrieve(response.id), lambda: client.responses.delete(response.id),
                    lambda: client.responses.cancel(response.id),
                    lambda: _create(client, model_name, input="Hi", previous_response_id=response.id)):
        with pytest.raises(openai.NotFoundError) as e:
            request()
        assert e.value.body["type"] == "invalid_request_error" and response.id in e.value.body["message"]
    unstored = _create(client, model_name, input="Hello", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_cancel_refuses_a_response_that_was_not_run_in_the_background(client, model_name):
    response = _create(client, model_name, input="Hello", max_output_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.cancel(response.id)
    assert e.value.body["message"] == "Cannot cancel a synchronous response."


@pytest.mark.parametrize("body,param", [
    ({"input": "Hi", "background": True}, "background"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].message.content"),
    ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "input[0]"),
    ({"input": []}, "input"),
    ({"input": "Hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"input": "Hi", "response_format": {"type": "json_object"}}, "response_format"),
    ({"input": "Hi", "n": 2}, "n"),
    ({"input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "Hi", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"input": "Hi", "stop": ["x"] * 17}, "stop"),
    ({"input": "x" * 100_000, "max_output_tokens": 1}, "input"),
    ({"input": "Hi", "max_output_tokens": 100_000}, "input"),
])
def test_bad_requests_are_400s_naming_the_field(http, body, param):
    r = http.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert "messages" not in error["message"] and "max_tokens" not in error["message"]  # the Responses API's names


def test_the_api_key_guards_every_responses_route(secure_server):
    with httpx.Client(base_url=secure_server.url) as http:
        for method, path in [("POST", "/v1/responses"), ("GET", "/v1/responses/resp_1"),
                             ("DELETE", "/v1/responses/resp_1"), ("POST", "/v1/responses/resp_1/cancel")]:
            r = http.request(method, path, json={"input": "Hi"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
        r = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 1},
                      headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200 and r.json()["model"] == "tm-secure"


@pytest.fixture(scope="module")
def faulty_server():
    """An engine whose requests fail when their prompt says FAULTY."""
    config = EngineConfig(dtype="float32", kv_cache_memory=64 << 20, max_model_len=512,
                          fault_injection="request:FAULTY")
    with ServerThread(build_app(AsyncLLMEngine.from_config(config))) as s:
        yield s


def test_a_request_that_fails_in_the_engine_fails_alone(faulty_server):
    client = openai.OpenAI(base_url=faulty_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    events = list(client.responses.create(input="FAULTY", max_output_tokens=4, stream=True))
    assert events[-1].type == "response.failed" and "injected request fault" in events[-1].response.error.message
    assert events[-1].response.status == "failed"
    with pytest.raises(openai.InternalServerError):
        client.responses.create(input="FAULTY", max_output_tokens=4)
    assert client.responses.create(input="Hello", max_output_tokens=4).status == "incomplete"


def test_the_store_evicts_the_oldest_past_its_bounds():
    from tokenmill.api.protocol_responses import MessageItem, Response, TextConfig

    now = [0.0]
    store = ResponseStore(max_entries=2, max_bytes=20_000, ttl_s=60, clock=lambda: now[0])

    def response(i: int, text: str = "") -> Response:
        return Response(id=f"resp_{i}", model="m", status="completed", output=[], instructions=text or None,
                        max_output_tokens=None, metadata=None, parallel_tool_calls=True, previous_response_id=None,
                        store=True, temperature=None, text=TextConfig(), tool_choice="none", tools=[], top_p=None,
                        usage=None, user=None)

    for i in range(3):
        store.put(response(i), [MessageItem(role="user", content="hi")])
    assert list(store.entries) == ["resp_1", "resp_2"]  # by count
    store.put(response(3, "x" * 19_500), [])
    assert list(store.entries) == ["resp_3"] and store.bytes <= 20_000  # by bytes
    store.put(response(4, "x" * 40_000), [])
    assert store.get("resp_4") is None  # larger than the whole store: not kept
    now[0] = 61.0
    assert store.get("resp_3") is None and store.bytes == 0  # by age
