"""A response's output items, folded from the output parser's deltas, and the stream events each step of
the fold makes.

Reasoning text opens a `reasoning` item, answer text a `message` item, a tool-call delta with an id a
`function_call` item; later argument text goes to its call. An item is done when the next one opens or
the reply ends. The streamed and the whole response both come out of this one fold, so they are equal
by construction: a whole reply is the fold of one delta.
"""
from __future__ import annotations

import uuid

from pydantic import BaseModel

from .output_parser import OutputDelta, ToolCallDelta
from .protocol import ErrorInfo
from .protocol_responses import (
    ContentPartEvent,
    ErrorEvent,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    OutputFunctionCall,
    OutputItemEvent,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ReasoningText,
    ReasoningTextDeltaEvent,
    ReasoningTextDoneEvent,
    Response,
    ResponseLifecycleEvent,
)


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseOutput:
    """The output items of one response and the sequence numbers of its stream's events."""

    def __init__(self) -> None:
        self.items: list[OutputMessage | OutputFunctionCall | OutputReasoning] = []
        self.sequence_number = 0
        self._open: OutputMessage | OutputFunctionCall | OutputReasoning | None = None
        self._calls: dict[int, int] = {}  # tool-call index -> output index

    def next_sequence_number(self) -> int:
        self.sequence_number += 1
        return self.sequence_number - 1

    def lifecycle(self, kind: str, response: Response) -> ResponseLifecycleEvent:
        """response.created, .in_progress, .completed, .incomplete or .failed."""
        return ResponseLifecycleEvent(type=f"response.{kind}", sequence_number=self.next_sequence_number(),
                                      response=response.model_copy(deep=True))

    def error(self, info: ErrorInfo) -> ErrorEvent:
        """The `error` event of a failure outside the request itself (overload, a dead engine, a bug)."""
        return ErrorEvent(sequence_number=self.next_sequence_number(), code=info.code or info.type,
                          message=info.message, param=info.param)

    def add(self, delta: OutputDelta) -> list[BaseModel]:
        """Fold in what a piece of generated text added; returns its events."""
        events: list[BaseModel] = []
        if delta.reasoning:
            events += self._text(OutputReasoning, delta.reasoning)
        if delta.content:
            events += self._text(OutputMessage, delta.content)
        for call in delta.tool_calls:
            events += self._call(call)
        return events

    def finish(self, incomplete: bool) -> list[BaseModel]:
        """Close the last item: incomplete when the reply was cut short. A reply with nothing in it is one
        empty message, so that every response has its text."""
        events = [] if self.items else self._open_item(OutputMessage)
        return events + self._close("incomplete" if incomplete else "completed")

    # ---- items -----------------------------------------------------------------------------

    def _open_item(self, kind: type) -> list[BaseModel]:
        events = self._close("completed")
        if kind is OutputMessage:
            item, part = OutputMessage(id=_item_id("msg"), status="in_progress", content=[]), OutputText(text="")
        else:
            item, part = OutputReasoning(id=_item_id("rs"), status="in_progress", content=[]), ReasoningText(text="")
        self.items.append(item)
        self._open = item
        events.append(self._item_event("added", item))
        item.content.append(part)
        events.append(ContentPartEvent(type="response.content_part.added", sequence_number=self.next_sequence_number(),
                                       item_id=item.id, output_index=len(self.items) - 1, content_index=0,
                                       part=part.model_copy()))
        return events

    def _text(self, kind: type, text: str) -> list[BaseModel]:
        events = [] if isinstance(self._open, kind) else self._open_item(kind)
        item = self._open
        item.content[-1].text += text
        fields = dict(sequence_number=self.next_sequence_number(), item_id=item.id,
                      output_index=len(self.items) - 1, content_index=len(item.content) - 1, delta=text)
        events.append(OutputTextDeltaEvent(**fields) if kind is OutputMessage else ReasoningTextDeltaEvent(**fields))
        return events

    def _call(self, call: ToolCallDelta) -> list[BaseModel]:
        events: list[BaseModel] = []
        if call.id is not None:  # a call's first piece: a new item
            events += self._close("completed")
            item = OutputFunctionCall(id=_item_id("fc"), call_id=call.id, name=call.name or "", arguments="",
                                      status="in_progress")
            self.items.append(item)
            self._open = item
            self._calls[call.index] = len(self.items) - 1
            events.append(self._item_event("added", item))
        output_index = self._calls[call.index]
        item = self.items[output_index]
        if call.arguments:
            item.arguments += call.arguments
            events.append(FunctionCallArgumentsDeltaEvent(sequence_number=self.next_sequence_number(),
                                                          item_id=item.id, output_index=output_index,
                                                          delta=call.arguments))
        return events

    def _close(self, status: str) -> list[BaseModel]:
        """The open item's done events."""
        item, self._open = self._open, None
        if item is None:
            return []
        index, events = self.items.index(item), []
        if isinstance(item, OutputFunctionCall):
            events.append(FunctionCallArgumentsDoneEvent(sequence_number=self.next_sequence_number(), item_id=item.id,
                                                         output_index=index, name=item.name,
                                                         arguments=item.arguments))
        else:
            part = item.content[-1]
            fields = dict(sequence_number=self.next_sequence_number(), item_id=item.id, output_index=index,
                          content_index=len(item.content) - 1, text=part.text)
            events.append(OutputTextDoneEvent(**fields) if isinstance(item, OutputMessage)
                          else ReasoningTextDoneEvent(**fields))
            events.append(ContentPartEvent(type="response.content_part.done",
                                           sequence_number=self.next_sequence_number(), item_id=item.id,
                                           output_index=index, content_index=len(item.content) - 1,
                                           part=part.model_copy()))
        item.status = status
        events.append(self._item_event("done", item))
        return events

    def _item_event(self, kind: str, item: BaseModel) -> OutputItemEvent:
        return OutputItemEvent(type=f"response.output_item.{kind}", sequence_number=self.next_sequence_number(),
                               output_index=self.items.index(item), item=item.model_copy(deep=True))
