"""The fold of output deltas into a response's items and stream events (api/responses_output.py), on deltas as
the output parser makes them: reasoning, content, and tool calls whose arguments come in pieces; and an error
in the middle of a stream, as the shared SSE plumbing frames it."""
from __future__ import annotations

import asyncio

from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from tokenmill.api.output_parser import OutputDelta, ToolCallDelta
from tokenmill.api.responses_output import ResponseOutput
from tokenmill.api.serving import _sse_events
from tokenmill.api.serving_responses import sse_framing
from tokenmill.engine.core.engine_client import EngineDeadError

DELTAS = [OutputDelta(reasoning="Paris is "), OutputDelta(reasoning="in France."),
          OutputDelta(content="Let me check."),
          OutputDelta(tool_calls=[ToolCallDelta(0, "call_a", "get_weather", '{"city": ')]),
          OutputDelta(tool_calls=[ToolCallDelta(0, arguments='"Paris"}')]),
          OutputDelta(tool_calls=[ToolCallDelta(1, "call_b", "get_time", ""), ToolCallDelta(1, arguments="{}")])]


def _items(out: ResponseOutput) -> list[dict]:
    return [item.model_dump(exclude={"id"}) for item in out.items]


def test_streamed_deltas_fold_into_the_items_of_the_whole_reply():
    streamed, events = ResponseOutput(), []
    for delta in DELTAS:
        events += streamed.add(delta)
    events += streamed.finish(incomplete=False)
    whole = ResponseOutput()
    whole.add(sum(DELTAS, OutputDelta()))
    whole.finish(incomplete=False)
    assert _items(streamed) == _items(whole) == [
        {"type": "reasoning", "summary": [], "status": "completed",
         "content": [{"type": "reasoning_text", "text": "Paris is in France."}]},
        {"type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me check.", "annotations": [], "logprobs": []}]},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}',
         "status": "completed"},
        {"type": "function_call", "call_id": "call_b", "name": "get_time", "arguments": "{}", "status": "completed"}]
    # Every event parses as the SDK's, in order, and each item opens and closes once.
    sdk_events = [TypeAdapter(ResponseStreamEvent).validate_python(e.model_dump()) for e in events]
    assert [e.sequence_number for e in sdk_events] == list(range(len(events)))
    assert [(e.type, e.output_index) for e in sdk_events if e.type.startswith("response.output_item")] == [
        (f"response.output_item.{kind}", i) for i in range(4) for kind in ("added", "done")]
    arguments = [e.delta for e in sdk_events if e.type == "response.function_call_arguments.delta"]
    assert arguments == ['{"city": ', '"Paris"}', "{}"]
    reasoning = [e.delta for e in sdk_events if e.type == "response.reasoning_text.delta"]
    assert reasoning == ["Paris is ", "in France."]


def test_a_reply_cut_short_leaves_its_last_item_incomplete():
    out = ResponseOutput()
    out.add(OutputDelta(reasoning="Hmm"))
    out.add(OutputDelta(content="The answer is"))
    events = out.finish(incomplete=True)
    assert [item.status for item in out.items] == ["completed", "incomplete"]
    assert events[-1].type == "response.output_item.done" and events[-1].item.status == "incomplete"


def test_an_empty_reply_is_one_empty_message():
    out = ResponseOutput()
    events = out.finish(incomplete=False)
    assert [(item.type, item.content[0].text, item.status) for item in out.items] == [("message", "", "completed")]
    assert [e.type for e in events] == ["response.output_item.added", "response.content_part.added",
                                        "response.output_text.done", "response.content_part.done",
                                        "response.output_item.done"]


def test_an_error_after_the_status_line_is_an_error_event_in_the_sequence():
    """The shared SSE plumbing reports a dead engine in the Responses API's own event shape."""
    out = ResponseOutput()

    async def events():
        for event in out.add(OutputDelta(content="Hi")):
            yield event
        raise EngineDeadError("the engine died")

    async def frames() -> list[dict]:
        return [frame async for frame in _sse_events(events(), "resp_1", [], sse_framing(out))]

    frames = asyncio.run(frames())
    assert [f.get("event") for f in frames] == ["response.output_item.added", "response.content_part.added",
                                                "response.output_text.delta", "error"]
    error = TypeAdapter(ResponseStreamEvent).validate_json(frames[-1]["data"])
    assert error.type == "error" and error.code == "unavailable" and error.sequence_number == 3
    assert error.message == "the engine died"
