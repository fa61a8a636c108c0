"""Tool calls read out of replies, whole and streamed, and tools written into the conversation."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.api.errors import APIError
from tokenmill.api.protocol import ChatCompletionRequest
from tokenmill.api.tool_parsers import (
    ForcedCallsParser,
    HermesParser,
    Llama3JsonParser,
    NamedCallParser,
    ToolCallStream,
    format_for_template,
)
from tokenmill.api.tools import ToolRequest, conversation, template_knows_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', None, [("f", {"a": 1})]),
    ('Let me look.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", '
     '"parameters": {"b": "x"}}', "Let me look.", [("f", {}), ("g", {"b": "x"})]),  # the last one unclosed
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>', None, [("f", {"a": 2})]),
    ('<tool_call>{"name": "f"}</tool_call>', None, [("f", {})]),
    ("no calls here", "no calls here", []),
    # Any call that does not parse leaves the whole reply as content.
    ('<tool_call>{"name": "f", "arguments": {</tool_call>', '<tool_call>{"name": "f", "arguments": {</tool_call>', []),
    ('<tool_call>{"name": "f"}</tool_call> and more', '<tool_call>{"name": "f"}</tool_call> and more', []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
])
def test_hermes_calls_parse_all_or_nothing(text, content, calls):
    got_content, got_calls = HermesParser().parse(text)
    assert (got_content, _calls(got_calls)) == (content, calls)


@pytest.mark.parametrize("text,content,calls", [
    ('{"name": "f", "parameters": {"a": 1}}', None, [("f", {"a": 1})]),
    ('<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "arguments": {"b": 2}}', None,
     [("f", {}), ("g", {"b": 2})]),
    ('It is {"name": "f"}', 'It is {"name": "f"}', []),
    ('{"name": "f", "parameters": {"a": 1}} trailing', '{"name": "f", "parameters": {"a": 1}} trailing', []),
])
def test_llama3_json_calls_parse(text, content, calls):
    got_content, got_calls = Llama3JsonParser().parse(text)
    assert (got_content, _calls(got_calls)) == (content, calls)


def test_forced_and_named_replies_parse():
    forced = ForcedCallsParser("arguments")
    assert _calls(forced.parse('[{"name": "f", "arguments": {"a": 1}}]')[1]) == [("f", {"a": 1})]
    assert ForcedCallsParser("arguments").parse('[{"name": "f", "argu') == ('[{"name": "f", "argu', [])
    content, calls = NamedCallParser("f").parse('{"a": 1}')
    assert content is None and _calls(calls) == [("f", {"a": 1})]


REPLIES = [
    'Sure.  \n<tool_call>\n{"name": "f", "arguments": {"a": [1, 2]}}\n</tool_call>\n'
    '<tool_call>{"name": "g"}</tool_call>',
    "plain text with a < sign and <tool trailing spaces   ",
    '<tool_call>{"name": "f", "arguments": {oops}}</tool_call>',
    '  {"name": "f", "parameters": {"x": "<tool_call>"}}; {"name": "g", "parameters": {}}',
    "<|python_tag|>not json",
    "<|python",
    "",
]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(REPLIES), st.sampled_from([HermesParser, Llama3JsonParser]),
       st.lists(st.integers(0, 120), max_size=12))
def test_a_streamed_reply_gives_the_same_content_and_calls_as_the_whole(text, parser_cls, cuts):
    parser = parser_cls()
    stream, cuts = ToolCallStream(parser), sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    content = "".join(stream.feed(text[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))
    rest, calls = stream.finish()
    whole_content, whole_calls = parser.parse(text)
    assert content + rest == (whole_content or "")
    assert _calls(calls) == _calls(whole_calls)


def test_content_before_a_call_streams_before_the_call_ends():
    stream = ToolCallStream(HermesParser())
    assert stream.feed("Checking the ") == "Checking the"  # the space waits: it may precede a call
    assert stream.feed("weather <tool") == " weather"
    assert stream.feed('_call>{"name": "f"') == ""
    assert stream.feed("}</tool_call>") == ""
    assert _calls(stream.finish()[1]) == [("f", {})]


def test_the_tool_format_follows_the_chat_template():
    assert format_for_template("{% if tools %}<tool_call>{% endif %}").name == "hermes"
    assert format_for_template("{{ '<|python_tag|>' }}{% for t in tools %}{% endfor %}").name == "llama3_json"
    assert format_for_template(None).name == "hermes"
    assert template_knows_tools({"default": "x", "tool_use": "{{ tools }}"})
    assert not template_knows_tools("{{ messages }}")


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_forced_tool_choices_become_constraints():
    required = ToolRequest.from_request(_request(tools=[WEATHER, TIME], tool_choice="required",
                                                 parallel_tool_calls=False)).constraint("arguments")["json"]
    assert required["maxItems"] == 1 and required["minItems"] == 1
    names = [c["properties"]["name"]["const"] for c in required["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert required["items"]["anyOf"][1]["properties"]["arguments"] == {"type": "object"}
    named = ToolRequest.from_request(_request(tools=[WEATHER, TIME], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}))
    assert named.constraint("arguments") == {"json": WEATHER["function"]["parameters"]}
    assert ToolRequest.from_request(_request(tools=[WEATHER])).constraint("arguments") is None
    assert ToolRequest.from_request(_request(tool_choice="auto")) is None


@pytest.mark.parametrize("fields,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"functions": [WEATHER["function"]]}, "functions"),
])
def test_tool_choices_the_tools_cannot_meet_are_400s(fields, param):
    with pytest.raises(APIError) as e:
        ToolRequest.from_request(_request(**fields))
    assert e.value.status == 400 and e.value.param == param


HISTORY = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "25 C"},
]


def test_without_template_support_tools_calls_and_results_are_written_into_the_turns():
    req = _request(tools=[WEATHER])
    req.messages = _request(messages=HISTORY).messages
    turns, tools = conversation(req.messages, ToolRequest.from_request(req), "{{ messages }}", HermesParser())
    assert tools is None and [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[0]["content"].startswith("Be brief.\n\n") and '"name": "get_weather"' in turns[0]["content"]
    assert turns[2]["content"].count("<tool_call>") == 2 and '"arguments": {"city": "Rome"}' in turns[2]["content"]
    assert turns[3]["content"] == "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n25 C\n</tool_response>"


def test_a_template_that_knows_tools_gets_them_and_the_calls_as_objects():
    req = _request(tools=[WEATHER], messages=HISTORY)
    turns, tools = conversation(req.messages, ToolRequest.from_request(req), "{{ tools }}", HermesParser())
    assert tools == [WEATHER] and [t["role"] for t in turns] == ["system", "user", "assistant", "tool", "tool"]
    assert turns[2]["tool_calls"][1] == {"id": "c2", "type": "function",
                                         "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
    assert turns[4] == {"role": "tool", "content": "25 C", "tool_call_id": "c2"}
    none = _request(tools=[WEATHER], messages=HISTORY, tool_choice="none")
    assert conversation(none.messages, ToolRequest.from_request(none), "{{ tools }}", HermesParser())[1] is None


# A Qwen2.5-like template: tools in the system turn, calls as <tool_call> JSON, results in a tool turn.
NATIVE = ("{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.tool_calls or [] %}<tool_call>\n"
          "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}"
          "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_knows_tools_renders_them_through_transformers():
    from tokenmill.engine.weights.loader import default_model_path, load_gguf_tokenizer

    req = _request(tools=[WEATHER], messages=HISTORY)
    turns, tools = conversation(req.messages, ToolRequest.from_request(req), NATIVE, format_for_template(NATIVE))
    text = load_gguf_tokenizer(default_model_path()).apply_chat_template(
        turns, tools=tools, chat_template=NATIVE, add_generation_prompt=True, tokenize=False)
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]  # the tools, in the template's system turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in text
    assert "<|im_start|>tool\n25 C<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
