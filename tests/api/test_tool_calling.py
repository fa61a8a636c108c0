"""Tool calling through the official OpenAI SDK against a real server: each tool_choice, calls streamed as
they are generated and equal to the whole ones, a tool result sent back, and the 400s. SmolLM2's chat
template knows no tools, so these run through the fallback prompt and the Hermes format."""
import json

import openai
import pytest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris and what time is it there?"}]


def _shot(i: int, city: str) -> list[dict]:
    call = {"id": f"call_{i}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}
    return [{"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]}]


# Earlier turns in which the assistant called the tool: even a 135M model then calls it of its own accord.
FEW_SHOT = [*_shot(1, "Paris"), *_shot(2, "Rome"), {"role": "user", "content": "What is the weather in London?"}]


def _create(client, model_name, messages, **kwargs):
    return client.chat.completions.create(model=model_name, messages=messages, temperature=0,
                                          max_tokens=kwargs.pop("max_tokens", 120), **kwargs)


def _streamed(client, model_name, messages, **kwargs) -> tuple[str, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish_reason) of a streamed reply, put together as SDKs do. Each call
    opens with its id, type and name, then its arguments come in pieces: several for several arguments."""
    content, calls, finish = "", {}, None
    for chunk in _create(client, model_name, messages, stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id.startswith("call_") and d.type == "function" and d.function.name, d
                    calls[d.index] = {"name": d.function.name, "arguments": "", "pieces": 0}
                else:
                    assert d.id is None and d.function.name is None, d
                calls[d.index]["arguments"] += d.function.arguments or ""
                calls[d.index]["pieces"] += bool(d.function.arguments)
            finish = choice.finish_reason or finish
    for call in calls.values():
        assert call["pieces"] > 1 or len(json.loads(call["arguments"])) < 2, call
    return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())], finish


def _whole(response) -> tuple[str, list[tuple[str, str]], str]:
    choice = response.choices[0]
    calls = choice.message.tool_calls or []
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    return choice.message.content or "", [(c.function.name, c.function.arguments) for c in calls], choice.finish_reason


@pytest.mark.parametrize("choice,messages", [
    ("auto", FEW_SHOT),
    ("required", ASK),
    ({"type": "function", "function": {"name": "get_time"}}, ASK),
], ids=["auto", "required", "named"])
def test_each_tool_choice_calls_and_streams_the_same_calls(client, model_name, choice, messages):
    whole = _whole(_create(client, model_name, messages, tools=[WEATHER, TIME], tool_choice=choice))
    content, calls, finish = whole
    assert calls and finish == "tool_calls" and content == ""
    for name, arguments in calls:
        args = json.loads(arguments)
        if name == "get_weather":
            assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
        else:
            assert name == "get_time" and isinstance(args["city"], str)
    if isinstance(choice, dict):
        assert [name for name, _ in calls] == ["get_time"]
    assert _streamed(client, model_name, messages, tools=[WEATHER, TIME], tool_choice=choice) == whole


def test_required_without_parallel_calls_makes_exactly_one(client, model_name):
    response = _create(client, model_name, ASK, tools=[WEATHER, TIME], tool_choice="required",
                       parallel_tool_calls=False)
    assert len(response.choices[0].message.tool_calls) == 1


def test_tool_choice_none_answers_in_text(client, model_name):
    content, calls, finish = _whole(_create(client, model_name, FEW_SHOT, tools=[WEATHER], tool_choice="none",
                                            max_tokens=20))
    assert calls == [] and content and finish in ("stop", "length")


def test_a_tool_result_goes_back_into_the_conversation(client, model_name, http, engine):
    first = _create(client, model_name, ASK, tools=[WEATHER], tool_choice="required")
    message = first.choices[0].message
    results = [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature": 18, "unit": "celsius"})}
               for c in message.tool_calls]
    history = [*ASK, message, *results]  # the SDK's own message object, as agents append it
    second = _create(client, model_name, history, tools=[WEATHER], max_tokens=30)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # /tokenize renders the same prompt: the tools, the call in the assistant's turn, and its result.
    body = {"messages": [*ASK, message.model_dump(exclude_none=True), *results], "tools": [WEATHER]}
    tokens = http.post("/tokenize", json=body).json()["tokens"]
    assert len(tokens) == second.usage.prompt_tokens
    text = engine.engine.get_tokenizer().decode(tokens)
    assert '"name": "get_weather"' in text and '"temperature": 18' in text
    call = json.dumps({"name": "get_weather", "arguments": json.loads(message.tool_calls[0].function.arguments)})
    assert text.index(f"<tool_call>\n{call}\n</tool_call>") < text.index("<tool_response>")


def test_a_custom_role_reaches_the_template(client, model_name):
    messages = [{"role": "critic", "content": "Be harsh."}, {"role": "user", "content": "Rate this: hi"}]
    response = _create(client, model_name, messages, max_tokens=5)
    assert response.choices[0].message.content


@pytest.mark.parametrize("fields,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
])
def test_tool_requests_that_cannot_be_met_are_400s(client, model_name, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, model_name, ASK, **fields)
    assert e.value.body["param"] == param, e.value.body
