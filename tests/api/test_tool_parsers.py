"""Tool calls read out of replies, whole and streamed, and tools written into the conversation."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.api.errors import APIError
from tokenmill.api.output_parser import OutputParser
from tokenmill.api.protocol import ChatCompletionRequest
from tokenmill.api.tool_parsers import (
    ForcedCallsParser,
    HermesParser,
    Llama3JsonParser,
    NamedCallParser,
    format_for_template,
)
from tokenmill.api.tools import ToolRequest, conversation, template_knows_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def _parse(parser, text: str) -> tuple[str | None, list[tuple[str, dict]]]:
    reply = OutputParser(parser).parse(text)
    return reply.content, _calls(reply.tool_calls)


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', None, [("f", {"a": 1})]),
    ('Let me look.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", '
     '"parameters": {"b": "x"}}', "Let me look.", [("f", {}), ("g", {"b": "x"})]),  # the last one unclosed
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>', None, [("f", {"a": 2})]),
    ('<tool_call>{"name": "f"}</tool_call>', None, [("f", {})]),
    ('<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>', None, [("f", {"a": 1})]),
    ("no calls here", "no calls here", []),
    # A call stands once its name is read; text after the calls that is not a call is dropped.
    ('<tool_call>{"name": "f"}</tool_call> and more', None, [("f", {})]),
    ('<tool_call>{"name": "f"}</tool_call><tool_call>{"name": "g"} x</tool_call> y', None, [("f", {}), ("g", {})]),
    ('<tool_call>{"name": "f"}</tool_call> x <tool_call>{"name": "g"}</tool_call>', None, [("f", {})]),
    # A first call that goes wrong before its name is read was not a call.
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('Hm <tool_call>{"name": 1}</tool_call>', 'Hm <tool_call>{"name": 1}</tool_call>', []),
    ("<tool_call>never a call", "<tool_call>never a call", []),
])
def test_hermes_calls_stand_once_named(text, content, calls):
    assert _parse(HermesParser(), text) == (content, calls)


def test_a_call_that_stops_keeps_the_arguments_read_so_far():
    reply = OutputParser(HermesParser()).parse('<tool_call>{"name": "f", "arguments": {"a": 1, "b": [2, {oops')
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("f", '{"a": 1')]
    assert reply.content is None


@pytest.mark.parametrize("text,content,calls", [
    ('{"name": "f", "parameters": {"a": 1}}', None, [("f", {"a": 1})]),
    ('<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "arguments": {"b": 2}}', None,
     [("f", {}), ("g", {"b": 2})]),
    ('It is {"name": "f"}', 'It is {"name": "f"}', []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "f", "parameters": {"a": 1}} trailing', None, [("f", {"a": 1})]),
])
def test_llama3_json_calls_parse(text, content, calls):
    assert _parse(Llama3JsonParser(), text) == (content, calls)


def test_forced_and_named_replies_parse():
    forced = ForcedCallsParser("arguments")
    assert _parse(forced, '[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]') == (
        None, [("f", {"a": 1}), ("g", {})])
    cut = OutputParser(forced).parse('[{"name": "f", "argu')
    assert [(c.name, c.arguments) for c in cut.tool_calls] == [("f", "")]
    assert OutputParser(forced).parse('[{"nam').content == '[{"nam'
    assert _parse(NamedCallParser("f"), '{"a": 1}') == (None, [("f", {"a": 1})])


def test_parallel_tool_calls_false_keeps_the_first_call():
    reply = OutputParser(HermesParser(), max_calls=1).parse(
        '<tool_call>{"name": "f"}</tool_call><tool_call>{"name": "g"}</tool_call>')
    assert [c.name for c in reply.tool_calls] == ["f"]


REPLIES = [
    'Sure.  \n<tool_call>\n{"name": "f", "arguments": {"a": [1, 2], "b": "x,}\\"{", "c": {"d": 1.5e3}}}\n</tool_call>\n'
    '<tool_call>{"name": "g"}</tool_call>',
    "plain text with a < sign and <tool trailing spaces   ",
    '<tool_call>{"name": "f", "arguments": {oops}}</tool_call>',
    '<tool_call>{"arguments": {"z": true, "y": null}, "name": "h"}</tool_call>',
    '<tool_call>{"name": "f", "\\q": {"a": 1}}</tool_call>',  # a key with a bad escape
    '<tool_call>{"name": "f", "arguments": {"a": 1, "b": True}}</tool_call>',  # a later member goes wrong
    '<tool_call>{"name": "f", "arguments": {"x": NaN, "y": 2}}</tool_call>',  # no JSON has NaN
    '  {"name": "f", "parameters": {"x": "<tool_call>", "n": -12}}; {"name": "g", "parameters": {}}',
    '[{"name": "f", "arguments": {"a": 1, "b": "é"}}, {"name": "g", "arguments": {"c": [3, 4]}}]',
    '{"city": "Paris", "unit": "celsius"}',
    "<|python_tag|>not json",
    "<|python",
    "",
]
PARSERS = [HermesParser, Llama3JsonParser, lambda: ForcedCallsParser("arguments"), lambda: NamedCallParser("f")]


def _fold(parser, text: str, cuts: list[int], max_calls: int | None):
    """(content, [(name, arguments)], each call's argument pieces) of the text fed in pieces cut at cuts."""
    stream = OutputParser(parser, max_calls)
    cuts = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    deltas = [stream.feed(text[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)] + [stream.finish()]
    content = "".join(d.content for d in deltas)
    pieces: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    for d in (c for delta in deltas for c in delta.tool_calls):
        if d.name is not None:
            assert d.index == len(names) and d.id.startswith("call_")  # each call opens once, in order
            names[d.index] = d.name
        pieces[d.index].append(d.arguments) if d.index in pieces else pieces.setdefault(d.index, [d.arguments])
    return content, [(names[i], "".join(pieces[i])) for i in sorted(names)], pieces


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(REPLIES), st.sampled_from(PARSERS), st.lists(st.integers(0, 140), max_size=12),
       st.sampled_from([None, 1]))
def test_streamed_deltas_fold_into_the_whole_reply(text, make_parser, cuts, max_calls):
    """For any split points, the content and each call's argument pieces, joined, are the whole reply's."""
    content, calls, _ = _fold(make_parser(), text, cuts, max_calls)
    whole = OutputParser(make_parser(), max_calls).parse(text)
    assert content == (whole.content or "")
    assert calls == [(c.name, c.arguments) for c in whole.tool_calls]
    if max_calls is not None:
        assert len(calls) <= max_calls


def test_arguments_stream_member_by_member():
    _, calls, pieces = _fold(HermesParser(), REPLIES[0], list(range(len(REPLIES[0]))), None)
    assert pieces[0] == ["", "{", '"a": [1, 2]', ', "b": "x,}\\"{"', ', "c": {"d": 1.5e3}}']
    assert json.loads(calls[0][1]) == {"a": [1, 2], "b": 'x,}"{', "c": {"d": 1500.0}}


def test_arguments_that_go_wrong_keep_the_members_sent_before():
    text = '<tool_call>{"name": "f", "arguments": {"a": 1, "b": True}}</tool_call>'
    _, calls, _ = _fold(HermesParser(), text, list(range(len(text))), None)
    assert calls == [("f", '{"a": 1')] == [(c.name, c.arguments) for c in OutputParser(HermesParser()).parse(text)
                                           .tool_calls]


def test_content_before_a_call_streams_before_the_call_ends():
    stream = OutputParser(HermesParser())
    assert stream.feed("Checking the ").content == "Checking the"  # the space waits: it may precede a call
    assert stream.feed("weather <tool").content == " weather"
    first = stream.feed('_call>{"name": "f", "arguments": {')
    assert first.content == "" and [(c.index, c.name, c.arguments) for c in first.tool_calls] == [(0, "f", "{")]
    assert stream.feed('"a": 1, "b"').tool_calls[0].arguments == '"a": 1'
    assert [c.arguments for c in (stream.feed(": 2}}</tool_call>") + stream.finish()).tool_calls] == [', "b": 2}']


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
    from tokenmill.engine.config import default_model_path
    from tokenmill.engine.weights.gguf_tokenizer import load_gguf_tokenizer

    req = _request(tools=[WEATHER], messages=HISTORY)
    turns, tools = conversation(req.messages, ToolRequest.from_request(req), NATIVE, format_for_template(NATIVE))
    text = load_gguf_tokenizer(default_model_path()).apply_chat_template(
        turns, tools=tools, chat_template=NATIVE, add_generation_prompt=True, tokenize=False)
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]  # the tools, in the template's system turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in text
    assert "<|im_start|>tool\n25 C<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
