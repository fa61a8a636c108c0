"""Anthropic's Messages API through the official anthropic SDK against a real server: text, stop sequences,
max_tokens, system prompts, streams equal to whole messages, a tool round trip, count_tokens, the
x-api-key header, and errors in Anthropic's shape. The oracles are the OpenAI routes (chat completions,
/tokenize) over the same engine. SmolLM2 cannot follow instructions: tool calls are grammar-forced."""
from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message as SDKMessage
from api_helpers import API_KEY, ServerThread, scrape, wait_until

from tokenmill.api.output_parser import OutputDelta, ToolCallDelta
from tokenmill.api.server import build_app
from tokenmill.api.serving_messages import ContentBlocks

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
STORY = [{"role": "user", "content": "Tell me a story about a dragon."}]
WEATHER = {"name": "get_weather", "description": "The current weather in a city",
           "input_schema": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                            "properties": {"city": {"type": "string", "maxLength": 20},
                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}
TIME = {"name": "get_time", "description": "The local time in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                         "required": ["city"]}}


def as_openai_tool(tool: dict) -> dict:
    return {"type": "function", "function": {"name": tool["name"], "description": tool["description"],
                                             "parameters": tool["input_schema"]}}


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


# The SDK no longer takes sampling fields as arguments; the API still does. Greedy keeps the tests exact.
GREEDY = {"temperature": 0}


def create(claude: anthropic.Anthropic, model_name: str, messages: list, max_tokens: int = 12, **kwargs):
    return claude.messages.create(model=model_name, messages=messages, max_tokens=max_tokens, extra_body=GREEDY,
                                  **kwargs)


def streamed(claude: anthropic.Anthropic, model_name: str, messages: list, max_tokens: int = 12, **kwargs):
    """(the text deltas joined, the SDK's final message) of the same request, streamed."""
    with claude.messages.stream(model=model_name, messages=messages, max_tokens=max_tokens, extra_body=GREEDY,
                                **kwargs) as stream:
        text = "".join(stream.text_stream)
        return text, stream.get_final_message()


def without_ids(message) -> dict:
    body = message.model_dump(exclude={"id"})
    for block in body["content"]:
        block.pop("id", None) if block["type"] == "tool_use" else None
    return body


def test_a_message_has_the_text_chat_completions_gives(claude, client, model_name, http):
    message = create(claude, model_name, STORY)
    chat = client.chat.completions.create(model=model_name, messages=STORY, max_tokens=12, temperature=0)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == model_name
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == chat.choices[0].message.content
    assert message.usage.input_tokens == chat.usage.prompt_tokens == http.post(
        "/tokenize", json={"messages": STORY}).json()["count"]
    assert message.usage.output_tokens == chat.usage.completion_tokens
    assert message.stop_reason == ("max_tokens" if chat.choices[0].finish_reason == "length" else "end_turn")


def test_max_tokens_stops_with_max_tokens(claude, model_name):
    message = create(claude, model_name, STORY, max_tokens=3)
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 3


def test_a_stop_sequence_ends_the_text_before_it_and_is_named(claude, model_name):
    text = create(claude, model_name, STORY, max_tokens=24).content[0].text
    word = text.split()[3]
    message = create(claude, model_name, STORY, max_tokens=24, stop_sequences=["zzz-never", word])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == word
    assert message.content[0].text == text[:text.index(word)]


def test_system_as_a_string_or_as_text_blocks_is_the_same_prompt(claude, model_name, http):
    system = "You are a pirate."
    as_string = create(claude, model_name, STORY, system=system)
    as_blocks = create(claude, model_name, STORY, system=[{"type": "text", "text": system}])
    assert without_ids(as_string) == without_ids(as_blocks)
    want = http.post("/tokenize", json={"messages": [{"role": "system", "content": system}, *STORY]}).json()
    assert as_string.usage.input_tokens == want["count"]


def test_a_streamed_message_equals_the_whole_one(claude, model_name, http):
    whole = create(claude, model_name, STORY, max_tokens=16)
    text, final = streamed(claude, model_name, STORY, max_tokens=16)
    assert text == whole.content[0].text
    assert without_ids(final) == without_ids(whole) and final.id.startswith("msg_")
    # On the wire: named events in Anthropic's order.
    body = {"model": model_name, "messages": STORY, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/messages", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = []
    for block in raw.strip("\n").split("\n\n"):
        name, data = block.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1:-2] == ["content_block_start", *["content_block_delta"] * (len(names) - 5), "content_block_stop"]
    assert events[0][1]["message"]["content"] == [] and events[0][1]["message"]["stop_reason"] is None
    assert events[-2][1]["usage"]["output_tokens"] == 4 and events[-2][1]["delta"]["stop_reason"] == "max_tokens"


def test_keep_alives_are_ping_events_that_the_sdk_skips(engine, server, model_name):
    with ServerThread(build_app(engine, owns_engine=False, sse_ping_s=0.02)) as pinging:
        body = {"model": model_name, "messages": STORY, "max_tokens": 24, "stream": True}
        with httpx.stream("POST", f"{pinging.url}/v1/messages", json=body, timeout=60) as r:
            raw = r.read().decode()
        assert "event: ping\ndata: {\"type\": \"ping\"}\n\n" in raw
        with anthropic.Anthropic(base_url=pinging.url, api_key="unused", max_retries=0) as c:
            text, final = streamed(c, model_name, STORY, max_tokens=24)
    assert final.usage.output_tokens == 24 and text == final.content[0].text


def _fits_weather(value: dict) -> bool:
    return set(value) == {"city", "unit"} and isinstance(value["city"], str) and value["unit"] in ("celsius",
                                                                                                  "fahrenheit")


def test_a_named_tool_is_called_and_streams_the_same_call(claude, model_name, http):
    kw = dict(tools=[WEATHER, TIME], tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=60)
    whole = create(claude, model_name, ASK, **kw)
    assert whole.stop_reason == "tool_use" and [b.type for b in whole.content] == ["tool_use"]
    call = whole.content[0]
    assert call.name == "get_weather" and call.id.startswith("toolu_") and _fits_weather(call.input)
    _, final = streamed(claude, model_name, ASK, **kw)
    assert without_ids(final) == without_ids(whole)
    # The input as it streams: input_json_delta pieces that join to the same object.
    body = {"model": model_name, "messages": ASK, "stream": True, "temperature": 0, **kw}
    with http.stream("POST", "/v1/messages", json=body) as r:
        data = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line.startswith("data: ")]
    start = next(e for e in data if e["type"] == "content_block_start")
    assert start["content_block"]["input"] == {} and start["content_block"]["name"] == "get_weather"
    pieces = [e["delta"]["partial_json"] for e in data if e["type"] == "content_block_delta"]
    assert all(e["delta"]["type"] == "input_json_delta" for e in data if e["type"] == "content_block_delta")
    assert json.loads("".join(pieces)) == call.input


def test_any_tool_without_parallel_use_makes_one_call(claude, model_name):
    message = create(claude, model_name, ASK, tools=[WEATHER, TIME], max_tokens=80,
                     tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["tool_use"] and message.content[0].name in ("get_weather", "get_time")


def test_a_tool_result_goes_back_and_gets_a_reply(claude, model_name, http):
    first = create(claude, model_name, ASK, tools=[WEATHER], tool_choice={"type": "any"}, max_tokens=60)
    call = first.content[0]
    result = {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "18 celsius"}]}
    history = [*ASK, {"role": "assistant", "content": first.content}, {"role": "user", "content": [result]}]
    second = create(claude, model_name, history, tools=[WEATHER], max_tokens=8)
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use") and second.content
    # The prompt is the one chat completions renders for the same turns: the call, then its result.
    chat_turns = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": json.dumps(call.input)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 celsius"}]
    want = http.post("/tokenize", json={"messages": chat_turns, "tools": [as_openai_tool(WEATHER)]}).json()
    assert second.usage.input_tokens == want["count"]
    counted = claude.messages.count_tokens(model=model_name, messages=history, tools=[WEATHER])
    assert counted.input_tokens == want["count"]
    # A failed call's result says so: the only way a chat template can tell.
    failed = [*history[:2], {"role": "user", "content": [{**result, "content": "no such city", "is_error": True}]}]
    chat_turns[-1]["content"] = "Error: no such city"
    want = http.post("/tokenize", json={"messages": chat_turns, "tools": [as_openai_tool(WEATHER)]}).json()
    assert claude.messages.count_tokens(model=model_name, messages=failed, tools=[WEATHER]).input_tokens == \
        want["count"]


def test_output_config_format_gives_json_that_fits_the_schema(claude, model_name):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    message = create(claude, model_name, ASK, max_tokens=40,
                     output_config={"format": {"type": "json_schema", "schema": schema}})
    value = json.loads(message.content[0].text)
    assert set(value) == {"city"} and isinstance(value["city"], str) and message.stop_reason == "end_turn"


def test_thinking_is_accepted_and_without_a_reasoning_parser_changes_nothing(claude, model_name):
    plain = create(claude, model_name, STORY, max_tokens=6)
    thinking = create(claude, model_name, STORY, max_tokens=6, thinking={"type": "enabled", "budget_tokens": 1024})
    assert without_ids(thinking) == without_ids(plain)


def test_count_tokens_is_the_prompt_that_messages_renders(claude, model_name, http):
    counted = claude.messages.count_tokens(model=model_name, messages=STORY, system="Be brief.", tools=[TIME])
    want = http.post("/tokenize", json={"messages": [{"role": "system", "content": "Be brief."}, *STORY],
                                        "tools": [as_openai_tool(TIME)]}).json()
    assert counted.input_tokens == want["count"]
    assert create(claude, model_name, STORY, system="Be brief.", tools=[TIME], max_tokens=1).usage.input_tokens == \
        want["count"]


# ---- content blocks from parsed deltas (no server) -------------------------------------------------

# Reasoning, then text, then one call whose input streams in pieces and one that comes whole: the shapes a
# reasoning parser and a streaming tool parser give.
DELTAS = [OutputDelta(reasoning="Paris is "), OutputDelta(reasoning="in France."), OutputDelta(content="Let me "),
          OutputDelta(content="check.", tool_calls=[ToolCallDelta(0, "call_a", "get_weather", '{"city": ')]),
          OutputDelta(tool_calls=[ToolCallDelta(0, arguments='"Paris"}')]),
          OutputDelta(tool_calls=[ToolCallDelta(1, "call_b", "get_time", '{"city": "Paris"}')])]


def _sdk_fold(events: list) -> SDKMessage:
    """The message the SDK's own stream accumulator builds from our events, sent as JSON."""
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                  "model": "m", "content": [], "stop_reason": None,
                                                  "stop_sequence": None,
                                                  "usage": {"input_tokens": 1, "output_tokens": 0}}}
    snapshot = accumulate_event(event=start, current_snapshot=None, json_bufs={})
    bufs: dict = {}
    for e in events:
        snapshot = accumulate_event(event=json.loads(e.model_dump_json()), current_snapshot=snapshot, json_bufs=bufs)
    return snapshot


def test_content_blocks_stream_into_the_message_they_build():
    blocks = ContentBlocks(thinking=True)
    events = [e for d in DELTAS for e in blocks.add(d)] + blocks.close()
    assert [b.type for b in blocks.blocks] == ["thinking", "text", "tool_use", "tool_use"]
    assert blocks.blocks[0].thinking == "Paris is in France." and blocks.blocks[1].text == "Let me check."
    assert [(b.name, b.input) for b in blocks.blocks[2:]] == [("get_weather", {"city": "Paris"}),
                                                              ("get_time", {"city": "Paris"})]
    assert blocks.made_calls and all(b.id.startswith("toolu_") for b in blocks.blocks[2:])
    folded = _sdk_fold(events)
    assert [b.model_dump(exclude_none=True) for b in folded.content] == [b.model_dump() for b in blocks.blocks]
    # Each block opens, changes and closes in order; a thinking block is signed (emptily) before it closes.
    kinds = [(e.type, getattr(e, "index", None), getattr(getattr(e, "delta", None), "type", None)) for e in events]
    assert kinds[:4] == [("content_block_start", 0, None), ("content_block_delta", 0, "thinking_delta"),
                         ("content_block_delta", 0, "thinking_delta"), ("content_block_delta", 0, "signature_delta")]
    assert [k for k in kinds if k[0] != "content_block_delta"] == [
        (t, i, None) for i in range(4) for t in ("content_block_start", "content_block_stop")]


def test_reasoning_is_left_out_unless_thinking_is_asked_for():
    blocks = ContentBlocks(thinking=False)
    for d in DELTAS:
        blocks.add(d)
    blocks.close()
    assert [b.type for b in blocks.blocks] == ["text", "tool_use", "tool_use"]


def test_a_call_cut_off_mid_input_ends_with_an_empty_input():
    blocks = ContentBlocks(thinking=False)
    blocks.add(OutputDelta(tool_calls=[ToolCallDelta(0, "call_a", "get_weather", '{"city": "Pa')]))
    blocks.close()
    assert blocks.blocks[0].input == {}


# ---- auth --------------------------------------------------------------------------------------

def test_x_api_key_is_accepted_where_a_key_is_required(secure_server):
    good = anthropic.Anthropic(base_url=secure_server.url, api_key=API_KEY, max_retries=0)
    assert good.messages.create(model="tm-secure", messages=STORY, max_tokens=2).usage.output_tokens == 2
    with httpx.Client(base_url=secure_server.url, headers={"x-api-key": API_KEY}) as http:  # OpenAI's routes too
        assert http.get("/v1/models").status_code == 200
    bad = anthropic.Anthropic(base_url=secure_server.url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="tm-secure", messages=STORY, max_tokens=2)
    assert e.value.body["error"]["type"] == "authentication_error"
    with httpx.Client(base_url=secure_server.url) as http:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            resp = http.post(path, json={"messages": STORY, "max_tokens": 2})
            assert resp.status_code == 401 and resp.json()["type"] == "error"


# ---- errors ------------------------------------------------------------------------------------

IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}

ERRORS = [
    # (path, body, status, Anthropic's error type, words the message must contain)
    ("/v1/messages", {"messages": [{"role": "user", "content": [IMAGE]}], "max_tokens": 2}, 400,
     "invalid_request_error", "messages[0].content[0]: this model does not take images"),
    ("/v1/messages", {"messages": STORY}, 400, "invalid_request_error", "max_tokens: Field required"),
    ("/v1/messages", {"messages": STORY, "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ("/v1/messages", {"messages": STORY, "max_tokens": 2, "stop_sequences": [""]}, 400, "invalid_request_error",
     "stop_sequences"),
    ("/v1/messages", {"messages": STORY, "max_tokens": 2, "stop_sequences": [f"s{i}" for i in range(17)]}, 400,
     "invalid_request_error", "stop_sequences: 17 stop strings given, the limit is 16"),
    ("/v1/messages", {"messages": STORY, "max_tokens": 5000}, 400, "invalid_request_error", "context is 2048"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "word " * 300000}], "max_tokens": 2}, 400,
     "invalid_request_error", "the limit is"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "document"}]}], "max_tokens": 2}, 400,
     "invalid_request_error", "type 'document' are not supported"),
    ("/v1/messages", {"messages": [{"role": "assistant", "content": "Once"}], "max_tokens": 2}, 400,
     "invalid_request_error", "prefill"),
    ("/v1/messages", {"messages": STORY, "max_tokens": 2, "tool_choice": {"type": "any"}}, 400,
     "invalid_request_error", "needs tools"),
    ("/v1/messages", {"messages": STORY, "max_tokens": 2, "tools": [WEATHER],
                      "tool_choice": {"type": "tool", "name": "get_time"}}, 400, "invalid_request_error",
     "not among the tools"),
    ("/v1/messages", {"messages": STORY, "max_tokens": 2, "tools": [WEATHER], "tool_choice": {"type": "any"},
                      "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, 400,
     "invalid_request_error", "output_config.format cannot be combined with a tool_choice"),
    ("/v1/messages", {"messages": STORY, "max_tokens": 2, "thinking": {"type": "enabled", "budget_tokens": 10}}, 400,
     "invalid_request_error", "thinking.enabled.budget_tokens"),
    ("/v1/messages", {"messages": STORY, "max_tokens": 2, "model": "claude-opus-4"}, 404, "not_found_error",
     "does not exist"),
    ("/v1/messages", '{"messages": [', 400, "invalid_request_error", "not valid JSON"),
    ("/v1/messages/count_tokens", {"messages": []}, 400, "invalid_request_error", "at least 1"),
]


@pytest.mark.parametrize("path,body,status,kind,words", ERRORS, ids=[e[4][:30] for e in ERRORS])
def test_errors_have_anthropics_shape(http, path, body, status, kind, words):
    if isinstance(body, str):
        resp = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        resp = http.post(path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()
    assert error["type"] == "error" and set(error) == {"type", "error", "request_id"}
    assert error["error"]["type"] == kind and words in error["error"]["message"], error


def test_sdk_raises_its_own_error_classes(claude, model_name):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=model_name, max_tokens=2, messages=[{"role": "user", "content": [IMAGE]}])
    assert "does not take images" in e.value.message
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-opus-4", max_tokens=2, messages=STORY)


def test_a_full_queue_is_529_overloaded_with_retry_after(claude, model_name, engine, monkeypatch):
    from tokenmill.engine.core.engine_client import EngineOverloadedError

    async def full(*args, **kwargs):
        raise EngineOverloadedError("the queue is full (512 sequences waiting)", retry_after=3)

    monkeypatch.setattr(engine, "add_request", full)
    with pytest.raises(anthropic.InternalServerError) as e:
        create(claude, model_name, STORY)
    assert e.value.status_code == 529 and e.value.response.headers["retry-after"] == "3"
    assert e.value.body["error"] == {"type": "overloaded_error", "message": "the queue is full (512 sequences waiting)"}


def test_a_request_that_fails_in_a_stream_gets_an_error_event_and_harms_no_other(http, claude, model_name, engine,
                                                                                monkeypatch):
    from tokenmill.engine.faults import FaultInjector

    want = create(claude, model_name, STORY)
    monkeypatch.setattr(engine.engine, "faults", FaultInjector(request_marker="FAULTY"))
    body = {"model": model_name, "messages": [{"role": "user", "content": "FAULTY"}], "max_tokens": 8, "stream": True}
    with http.stream("POST", "/v1/messages", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-2] == "event: error"
    error = json.loads(lines[-1].removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "api_error" and "request msg_" in error[
        "error"]["message"]
    assert without_ids(create(claude, model_name, STORY)) == without_ids(want)
    assert wait_until(lambda: scrape(http, "num_requests_running") == 0 and scrape(http, "kv_cache_usage_perc") == 0)
